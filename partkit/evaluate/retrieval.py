"""The retrieval family: keypoint-patch retrieval on frozen features."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import fields, metrics as M
from ..errors import PartkitError
from ..grid import image_to_cell_index
from ._registry import Pass, _pct, fmt, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


class _Retrieval:
    def __init__(self, o: EvalOptions):
        self.o = o
        self.features: list[np.ndarray] = []
        self.names: list[str] = []
        self.source = fields.FeatureSource("eval retrieval")

    def prepare(self, v: SampleView):
        feat, meta = v.features
        self.source.check(v.sample, meta, feat.shape[0])
        objects, names = v.keypoints
        x, y, kpt = v.visible_keypoints()
        # Keypoints are in image pixels; the cell covering a pixel comes from feat.json's geometry.
        height, width = v.shape
        rows, cols = image_to_cell_index(meta, height, width)
        gh, gw = feat.shape[1:]
        lo, hi = (self.o.patch - 1) // 2, self.o.patch // 2 + 1
        pooled = []
        for r, c in zip(rows[y], cols[x]):
            window = feat[:, max(r - lo, 0):min(r + hi, gh), max(c - lo, 0):min(c + hi, gw)]
            pooled.append(window.reshape(feat.shape[0], -1).mean(1))
        return pooled, [names[k] for k in kpt]

    def commit(self, payload) -> None:
        pooled, names = payload
        self.features.extend(pooled)
        self.names.extend(names)

    def result(self) -> dict:
        if len(self.features) < 2:
            raise PartkitError("retrieval needs at least 2 visible keypoints in the input")
        ap = M.retrieval_ap(np.stack(self.features), self.names, exclude_self=self.o.exclude_self)
        names = np.asarray(self.names)
        scored = ~np.isnan(ap)
        per_part = {n: ap[(names == n) & scored].mean() for n in sorted(set(self.names))
                    if ((names == n) & scored).any()}
        return {"value": _pct(ap[scored].mean()), "map": _pct(np.mean(list(per_part.values()))),
                "per_part": {n: _pct(v) for n, v in per_part.items()}, "queries": int(scored.sum()), "skipped_queries": int((~scored).sum()),
                "exclude_self": self.o.exclude_self, "patch": self.o.patch}


register_accumulator("retrieval", lambda o, names: _Retrieval(o))


def _summary(r: dict) -> str:
    self_ = "excluded" if r["exclude_self"] else "included"
    return f"mAP over parts {fmt(r['map'])}; {r['queries']} queries, self {self_}"


@register_metric("retrieval", accumulator="retrieval", summary=_summary,
                 options=("feat", "gt_field", "exclude_self", "kpt_min_visibility"), at_least_1=("patch",))
def retrieval(p: Pass) -> dict:
    """Mean AP of keypoint patches retrieving patches of the same keypoint name."""
    return p.accumulators["retrieval"].result()
