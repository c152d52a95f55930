"""The retrieval family: keypoint-patch retrieval on frozen features.

``--retrieval-features patches`` reads ``kpt_feat.npy`` (Zhu et al.: a crop around each keypoint run
through the backbone, from ``extract --patches-at keypoints``); ``pooled-cells`` pools a window of
``feat.npy`` cells around each keypoint's cell.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import fields, metrics as M
from ..errors import PartkitError
from ..grid import image_to_cell_index
from ._registry import Pass, _pct, fmt, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


RETRIEVAL_FEATURES = ("pooled-cells", "patches")


class _Retrieval:
    def __init__(self, o: EvalOptions):
        self.o = o
        self.features: list[np.ndarray] = []
        self.names: list[str] = []
        self.source = fields.FeatureSource("eval retrieval")
        self.skipped_kpts = 0  # keypoints extract could not crop (kpt_feat.json "skipped")

    def prepare(self, v: SampleView):
        if self.o.retrieval_features == "patches":
            return self._patches(v)
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

    def _patches(self, v: SampleView):
        feat, meta = fields.keypoint_features(v.sample, self.o.kpt_feat)
        rows = [i for i, r in enumerate(meta["keypoints"]) if int(r.get("v", 2)) >= self.o.kpt_min_visibility]
        if rows:
            self.source.check(v.sample, meta, feat.shape[1])
        self.skipped_kpts += len(meta.get("skipped", ()))
        return [feat[i] for i in rows], [str(meta["keypoints"][i]["name"]) for i in rows]

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
                "exclude_self": self.o.exclude_self, "features": self.o.retrieval_features,
                **({"patch": self.o.patch} if self.o.retrieval_features == "pooled-cells" else
                   {"field": self.o.kpt_feat, "uncropped_keypoints": self.skipped_kpts})}


register_accumulator("retrieval", lambda o, names: _Retrieval(o))


def _summary(r: dict) -> str:
    self_ = "excluded" if r["exclude_self"] else "included"
    what = "keypoint crops" if r.get("features") == "patches" else f"{r.get('patch')}x{r.get('patch')} cells"
    return f"mAP over parts {fmt(r['map'])}; {r['queries']} queries ({what}), self {self_}"


@register_metric("retrieval", accumulator="retrieval", summary=_summary,
                 options=("feat", "gt_field", "exclude_self", "kpt_min_visibility", "kpt_feat"), at_least_1=("patch",),
                 choices={"retrieval_features": RETRIEVAL_FEATURES})
def retrieval(p: Pass) -> dict:
    """Mean AP of keypoint patches retrieving patches of the same keypoint name."""
    return p.accumulators["retrieval"].result()
