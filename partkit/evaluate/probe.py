"""The probe family: probes on frozen features.

``probe``: scikit-learn logistic regressions on feature cells (a fast check, no paper's protocol);
``part-cls`` and ``linear-seg``: Zhu et al.'s linear part classification and linear part
segmentation, trained by gradient descent with the paper's optimisers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import fields, metrics as M
from ..errors import BadSample, PartkitError
from ..grid import grid_to_image, image_to_cell_index, sample_on_grid
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


# ---------------------------------------------------------------------------------------------
# Zhu et al. (part-aware SSL, Sec. 4 and App. A.5): probes trained by gradient descent on frozen
# features, with the paper's optimisers. Scores are on the images after the first --probe-train.

ZHU_CLS = {"optimizer": "SGD", "lr": 0.4, "momentum": 0.9, "weight_decay": 0.0, "epochs": 90, "batch_size": 1024}
ZHU_SEG = {"optimizer": "AdamW", "lr": 4e-4, "iterations": 160_000, "batch_size": 16, "upsampling": "bilinear x4",
           "head": "1x1 conv"}


class _PartClassification:
    """Linear part classification (Zhu et al.): keypoint-patch features (``kpt_feat.npy``) -> part name."""

    def __init__(self, o: EvalOptions):
        self.o = o
        self.train: list[tuple[np.ndarray, str]] = []
        self.test: list[tuple[np.ndarray, str]] = []
        self.images = 0
        self.source = fields.FeatureSource("eval part-cls")

    def prepare(self, v: SampleView):
        feat, meta = fields.keypoint_features(v.sample, self.o.kpt_feat)
        rows = [i for i, r in enumerate(meta["keypoints"]) if int(r.get("v", 2)) >= self.o.kpt_min_visibility]
        if rows:
            self.source.check(v.sample, meta, feat.shape[1])
        return [(feat[i], str(meta["keypoints"][i]["name"])) for i in rows]

    def commit(self, payload) -> None:
        (self.train if self.images < self.o.probe_train else self.test).extend(payload)
        self.images += 1

    def result(self) -> dict:
        import torch

        if not self.train or not self.test:
            raise PartkitError(f"part-cls trains on the keypoints of the first {self.o.probe_train} images and scores "
                               f"the rest, but {self.images} images gave {len(self.train)} training and "
                               f"{len(self.test)} test keypoints; lower --probe-train or give more images")
        names = sorted({n for _, n in self.train})
        index = {n: i for i, n in enumerate(names)}
        x = np.stack([f for f, _ in self.train])
        y = np.asarray([index[n] for _, n in self.train])
        lr = self.o.probe_lr or ZHU_CLS["lr"]
        batch = min(self.o.probe_batch or ZHU_CLS["batch_size"], len(x))
        mean, std = x.mean(0), x.std(0) + 1e-6  # a BatchNorm without affine, at the training set's statistics
        gen = torch.Generator().manual_seed(self.o.seed)
        head = torch.nn.Linear(x.shape[1], len(names))
        with torch.no_grad():  # seeded init, independent of the global RNG
            head.weight.normal_(0, 0.01, generator=gen)
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=ZHU_CLS["momentum"], weight_decay=0.0)
        steps_per_epoch = int(np.ceil(len(x) / batch))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.o.probe_epochs * steps_per_epoch)
        xt, yt = torch.from_numpy((x - mean) / std).float(), torch.from_numpy(y)
        for _ in range(self.o.probe_epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), batch):
                idx = perm[s:s + batch]
                loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        test_x = torch.from_numpy((np.stack([f for f, _ in self.test]) - mean) / std).float()
        with torch.no_grad():
            pred = np.asarray(names)[head(test_x).argmax(1).numpy()]
        true = np.asarray([n for _, n in self.test])
        per_part = {n: float(np.mean(pred[true == n] == n)) for n in sorted(set(true))}
        return {"value": _pct(np.mean(pred == true)), "balanced_accuracy": _pct(np.mean(list(per_part.values()))),
                "per_part": {n: _pct(a) for n, a in per_part.items()}, "train_keypoints": len(self.train),
                "test_keypoints": len(self.test), "train_images": min(self.images, self.o.probe_train),
                "unseen_test_parts": sorted(set(true) - set(names)), "lr": lr, "batch_size": batch,
                "epochs": self.o.probe_epochs, "paper": ZHU_CLS}


register_accumulator("part-cls", lambda o, names: _PartClassification(o))


def _cls_summary(r: dict) -> str:
    return (f"linear part classification acc (balanced {fmt(r['balanced_accuracy'])}); {r['train_keypoints']} "
            f"train / {r['test_keypoints']} test keypoint patches, SGD lr {r['lr']:g}, {r['epochs']} epochs")


@register_metric("part-cls", accumulator="part-cls", summary=_cls_summary,
                 options=("kpt_feat", "kpt_min_visibility", "seed", "probe_lr", "probe_batch"),
                 at_least_1=("probe_train", "probe_epochs"))
def part_cls(p: Pass) -> dict:
    """Zhu et al.'s linear part classification on keypoint-patch features (``extract --patches-at keypoints``)."""
    return p.accumulators["part-cls"].result()


class _LinearSegmentation:
    """Linear part segmentation (Zhu et al.): 1x1 conv on frozen ``feat.npy``, logits upsampled x4 bilinearly."""

    FACTOR = 4

    def __init__(self, o: EvalOptions):
        self.o = o
        self.train: list[tuple[np.ndarray, np.ndarray]] = []
        self.head = None
        self.table = M.Contingency()
        self.images = 0
        self.classes = 0
        self.source = fields.FeatureSource("eval linear-seg")

    def prepare(self, v: SampleView):
        feat, meta = v.features
        self.source.check(v.sample, meta, feat.shape[0])
        gt = v.gt
        ignore = v.ignore_id
        target = sample_on_grid(gt, meta, self.FACTOR, fill=ignore).astype(np.int64)
        target[target == ignore] = -1
        return feat.astype(np.float32), target, (gt, v.valid, meta)

    def commit(self, payload) -> None:
        feat, target, label_map = payload
        self.images += 1
        if self.images <= self.o.probe_train:
            self.train.append((feat, target))
            self.classes = max(self.classes, int(target.max(initial=-1)) + 1)
            if self.images == self.o.probe_train:
                self._fit()
            return
        self._score(feat, label_map)

    def _logits(self, feat):
        import torch
        import torch.nn.functional as F

        x = feat if isinstance(feat, torch.Tensor) else torch.from_numpy(feat)
        logits = F.conv2d(x[None], self.head[0][:, :, None, None], self.head[1])
        return F.interpolate(logits, scale_factor=self.FACTOR, mode="bilinear", align_corners=False)[0]

    def _fit(self) -> None:
        import torch
        import torch.nn.functional as F

        if self.classes < 2:
            raise PartkitError("linear-seg: the training images have fewer than 2 labels; give more images or "
                               "raise --probe-train")
        gen = torch.Generator().manual_seed(self.o.seed)
        c = self.train[0][0].shape[0]
        weight = torch.nn.Parameter(torch.randn(self.classes, c, generator=gen) * 0.01)
        bias = torch.nn.Parameter(torch.zeros(self.classes))
        self.head = (weight, bias)
        lr = self.o.probe_lr or ZHU_SEG["lr"]
        batch = min(self.o.probe_batch or ZHU_SEG["batch_size"], len(self.train))
        opt = torch.optim.AdamW([weight, bias], lr=lr)
        data = [(torch.from_numpy(f), torch.from_numpy(t)) for f, t in self.train]
        for step in range(self.o.probe_iters):
            idx = torch.randint(len(data), (batch,), generator=gen).tolist()
            total = torch.zeros(())
            count = 0
            for i in idx:
                feat, target = data[i]
                total = total + F.cross_entropy(self._logits(feat)[None], target[None], ignore_index=-1,
                                                reduction="sum")
                count += int((target >= 0).sum())
            loss = total / max(count, 1)  # the mean over the batch's labelled pixels
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.lr, self.batch, self.final_loss = lr, batch, float(loss.detach())

    def _score(self, feat, label_map) -> None:
        import torch

        gt, valid, meta = label_map
        with torch.no_grad():
            fine = self._logits(feat).argmax(0).numpy()
        gh, gw = meta["grid"]
        fine_meta = {**meta, "grid": [gh * self.FACTOR, gw * self.FACTOR], "stride": meta["stride"] / self.FACTOR}
        pred = grid_to_image(fine, fine_meta, *gt.shape)
        if valid is not None:
            gt, pred = gt[valid], pred[valid]
        self.table.update(gt, pred)

    def result(self) -> dict:
        if self.head is None or self.images <= self.o.probe_train:
            raise PartkitError(f"linear-seg trains on the first {self.o.probe_train} images and scores the rest, but "
                               f"the input has {self.images}; lower --probe-train or give more images")
        ignore = (0,) if self.o.region == "fg" else ()
        iou, _ = M.matched_iou(self.table.table_, "none", ignore_true=ignore, ignore_pred=ignore)
        present = np.flatnonzero(~np.isnan(iou))
        return {"value": _pct(np.nanmean(iou)), "iou": {str(i): _pct(iou[i]) for i in present},
                "region": self.o.region, "train_images": self.o.probe_train,
                "test_images": self.images - self.o.probe_train, "iterations": self.o.probe_iters, "lr": self.lr,
                "batch_size": self.batch, "final_loss": self.final_loss, "paper": ZHU_SEG}


register_accumulator("linear-seg", lambda o, names: _LinearSegmentation(o))


def _seg_summary(r: dict) -> str:
    return (f"linear part segmentation mIoU ({r['region']}); 1x1 conv + x4 bilinear, AdamW lr {r['lr']:g}, "
            f"{r['iterations']} iterations; {r['train_images']} train / {r['test_images']} test images")


@register_metric("linear-seg", accumulator="linear-seg", summary=_seg_summary,
                 options=("feat", "gt_field", "seed", "probe_lr", "probe_batch"), choices={"region": REGIONS},
                 at_least_1=("probe_train", "probe_iters"))
def linear_seg(p: Pass) -> dict:
    """Zhu et al.'s linear part segmentation on frozen features, trained on the first images."""
    return p.accumulators["linear-seg"].result()
