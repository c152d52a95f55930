"""The shape family: miou-3d, per-shape part mIoU of point labels (ShapeNetPart)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import metrics as M
from ..errors import BadSample, PartkitError
from ._registry import MATCHES, Pass, _pct, fmt, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


class _Shapes:
    """Per-shape point contingency (kept sparse) and per-category pooled tables for matching."""

    def __init__(self, o: EvalOptions):
        self.o = o
        self.shapes: list[tuple[Optional[str], np.ndarray, np.ndarray, np.ndarray]] = []
        self.by_class: dict[Optional[str], M.Contingency] = {}

    def prepare(self, v: SampleView):
        gt = v.npy_labels(self.o.gt_field or "gt_parts.npy")
        pred = v.npy_labels(self.o.pred or "pred_parts.npy")
        if gt.shape != pred.shape:
            raise BadSample(v.key, f"'{self.o.pred or 'pred_parts.npy'}' has {pred.size} points but "
                                   f"'{self.o.gt_field or 'gt_parts.npy'}' {gt.size}")
        table = M.Contingency().update(gt, pred).table_
        t, p = np.nonzero(table)
        return v.category, t, p, table[t, p]

    def commit(self, payload) -> None:
        cat, t, p, n = payload
        self.shapes.append(payload)
        self.by_class.setdefault(cat, M.Contingency()).add(_dense(t, p, n))

    def result(self, fit: Optional["_Shapes"]) -> dict:
        if not self.shapes:
            raise PartkitError("no shapes to score")
        parts_of, mappings = {}, {}
        for cat, table in self.by_class.items():
            given = (self.o.category_parts or {}).get("(none)" if cat is None else cat)
            parts_of[cat] = sorted(int(i) for i in given) if given is not None else \
                np.flatnonzero(table.table_.sum(1)).tolist()
            fit_table = table.table_
            if fit is not None:
                if cat not in fit.by_class:
                    raise PartkitError(f"category {cat!r} has no shapes in the --match-on shards to fit on")
                fit_table = fit.by_class[cat].table_
            mappings[cat] = M.match_clusters(fit_table, self.o.match)
        per_shape: dict[Optional[str], list[float]] = {}
        for cat, t, p, n in self.shapes:
            per_shape.setdefault(cat, []).append(M.shape_miou(_dense(t, p, n), parts_of[cat], mappings[cat]))
        per_class = {("(none)" if c is None else c): float(np.mean(v)) for c, v in sorted(
            per_shape.items(), key=lambda kv: (kv[0] is None, str(kv[0])))}
        all_shapes = [x for v in per_shape.values() for x in v]
        return {"value": _pct(np.mean(all_shapes)), "class_miou": _pct(np.mean(list(per_class.values()))),
                "per_class": {c: _pct(v) for c, v in per_class.items()}, "shapes": len(all_shapes),
                "match": self.o.match, "parts": {("(none)" if c is None else c): p for c, p in parts_of.items()}}


def _dense(t, p, n) -> np.ndarray:
    out = np.zeros((int(t.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1), np.int64)
    out[t, p] = n
    return out


register_accumulator("shapes", lambda o, names: _Shapes(o))


def _summary(r: dict) -> str:
    return f"instance mIoU; class mIoU {fmt(r['class_miou'])} over {len(r['per_class'])} categories, " \
           f"{r['shapes']} shapes, match {r['match']}"


@register_metric("miou-3d", accumulator="shapes", summary=_summary, options=("pred", "gt_field", "category_parts"),
                 choices={"match": MATCHES}, fit="shapes")
def miou_3d(p: Pass) -> dict:
    """Mean over shapes of the part IoU of point labels, after matching predicted ids per category."""
    return p.accumulators["shapes"].result(p.fit.get("shapes"))
