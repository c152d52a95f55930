"""The probe family: linear probes (segmentation and classification) on frozen features."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import fields, metrics as M
from ..errors import BadSample, PartkitError
from ..grid import grid_to_image, image_to_cell_index
from ._registry import REGIONS, Pass, _pct, fmt, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


class _Probe:
    """Linear probes on frozen features: the first ``probe_train`` images train, the rest score."""

    def __init__(self, o: EvalOptions):
        self.o = o
        self.train: list[tuple] = []
        self.seg = self.cls = None
        self.seg_table = M.Contingency()
        self.cls_true: list[np.ndarray] = []
        self.cls_pred: list[np.ndarray] = []
        self.source = fields.FeatureSource("eval probe")

    def prepare(self, v: SampleView):
        feat, meta = v.features
        self.source.check(v.sample, meta, feat.shape[0])
        x = feat.reshape(feat.shape[0], -1).T  # cells x C
        if self.o.probe_target == "category":
            if v.category is None:
                raise BadSample(v.key, "has no 'category' in its 'json'; --probe-target category needs one per image")
            target = v.category
        else:
            target = None
        gt = v.gt
        rows, cols = image_to_cell_index(meta, *gt.shape)
        cell = rows[:, None] * feat.shape[2] + cols[None, :]
        keep = v.valid if v.valid is not None else np.ones(gt.shape, bool)
        labels = gt[keep].astype(np.int64)
        cell = cell[keep]
        k = int(labels.max(initial=0)) + 1
        hist = np.bincount(cell * k + labels, minlength=x.shape[0] * k).reshape(x.shape[0], k)
        return feat.shape[0], x, hist, target, (gt, v.valid, meta)

    def commit(self, payload) -> None:
        _, x, hist, target, label_map = payload
        if len(self.train) < self.o.probe_train:
            self.train.append((x, hist, target))
            if len(self.train) == self.o.probe_train:
                self._fit()
            return
        self._score(x, hist, target, label_map)

    def _fit(self) -> None:
        xs, ys, ws, cls_x, cls_y = [], [], [], [], []
        for x, hist, target in self.train:
            cells, labels = np.nonzero(hist)
            xs.append(x[cells]), ys.append(labels), ws.append(hist[cells, labels])
            if target is None:
                scored = hist.sum(1) > 0
                cls_x.append(x[scored]), cls_y.append(hist[scored].argmax(1))
            else:
                cls_x.append(x.mean(0, keepdims=True)), cls_y.append(np.asarray([target]))
        w = np.concatenate(ws).astype(np.float64)
        # Each cell is trained on the label histogram of the pixels it covers: exactly the pixel
        # loss of nearest-upsampled logits, normalised so a cell weighs 1 on average.
        self.seg = M.fit_linear_probe(np.concatenate(xs), np.concatenate(ys), sample_weight=w / w.mean(),
                                      c=self.o.probe_c, seed=self.o.seed)
        self.cls = M.fit_linear_probe(np.concatenate(cls_x), np.concatenate(cls_y), c=self.o.probe_c,
                                      seed=self.o.seed)

    def _score(self, x, hist, target, label_map) -> None:
        gt, valid, meta = label_map
        cell_pred = self.seg.predict(x).reshape(meta["grid"])
        pred = grid_to_image(cell_pred, meta, *gt.shape)
        if valid is not None:
            gt, pred = gt[valid], pred[valid]
        self.seg_table.update(gt, pred)
        if target is None:
            scored = hist.sum(1) > 0
            self.cls_true.append(hist[scored].argmax(1))
            self.cls_pred.append(self.cls.predict(x[scored]))
        else:
            self.cls_true.append(np.asarray([target]))
            self.cls_pred.append(self.cls.predict(x.mean(0, keepdims=True)))

    def result(self, n_samples: int) -> dict:
        if self.seg is None or not self.cls_true:
            raise PartkitError(f"probe trains on the first {self.o.probe_train} images and scores the rest, but the "
                               f"input has {n_samples}; lower --probe-train or give more images")
        ignore = (0,) if self.o.region == "fg" else ()
        iou, _ = M.matched_iou(self.seg_table.table_, "none", ignore_true=ignore, ignore_pred=ignore)
        true, pred = np.concatenate(self.cls_true), np.concatenate(self.cls_pred)
        recalls = [np.mean(pred[true == c] == c) for c in np.unique(true)]
        present = np.flatnonzero(~np.isnan(iou))
        return {"value": _pct(np.nanmean(iou)), "seg_iou": {str(i): _pct(iou[i]) for i in present},
                "cls_accuracy": _pct(np.mean(true == pred)), "cls_balanced_accuracy": _pct(np.mean(recalls)),
                "target": self.o.probe_target, "region": self.o.region, "train_images": len(self.train),
                "test_images": n_samples - len(self.train), "cls_items": int(true.size)}


register_accumulator("probe", lambda o, names: _Probe(o))


def _summary(r: dict) -> str:
    return f"linear seg mIoU ({r['region']}); {r['target']} classification acc {fmt(r['cls_accuracy'])}, " \
           f"balanced {fmt(r['cls_balanced_accuracy'])}; {r['train_images']} train / {r['test_images']} test images"


@register_metric("probe", accumulator="probe", summary=_summary, options=("feat", "gt_field", "seed"),
                 choices={"region": REGIONS, "probe_target": ("part", "category")}, at_least_1=("probe_train",),
                 positive=("probe_c",))
def probe(p: Pass) -> dict:
    """Linear probes trained on the first images' features, scored on the rest."""
    return p.accumulators["probe"].result(p.samples)
