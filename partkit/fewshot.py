"""``partkit fewshot-seg``: PARTICLE's few-shot part segmentation evaluation of a backbone.

The whole network (registry backbone + a light upsampling decoder on its last feature map) is
fine-tuned on the first ``train_images`` labelled images with Adam and a pixel-wise cross-entropy
(Saha & Maji, "PARTICLE", 2023, Sec. 5.4 "Part Segmentation"). Every ``eval_every`` epochs the
network labels the held-out images; the held-out images are cut into ``folds`` folds and, for each
fold in turn, the fold picks the epoch (best mIoU) and the other folds score it. The result is the
mean and standard deviation of those test mIoUs, as the official ``evaluation/test_miou.py`` does.

>>> report = fewshot_seg(["ccp.tar"], model="efficientnet_lite0", train_images=10, folds=5)  # doctest: +SKIP
>>> report["value"], report["std"]  # doctest: +SKIP
(61.2, 1.3)
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fields
from ._log import log
from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import BadSample, Handler, PartkitError, stop
from .io import iter_loaded
from .metrics import confusion_iou
from .training import Trainer, check_count, check_rate, epoch_batch_indices

__all__ = ["fewshot_seg", "FewShotTrainer", "SegNet", "PartMap", "load_part_map", "cross_validate", "PAPER"]

# PARTICLE Sec. 5.4 (CNN / ViT) and the official evaluation code, for the README and the report
PAPER = {"optimizer": "Adam", "lr": {"cnn": 1e-4, "vit": 1e-5}, "epochs": 200, "batch_size": 8, "size": 256,
         "loss": "cross-entropy", "augment": "flip + colour jitter", "folds": 5}
DEFAULT_LR = PAPER["lr"]
JITTER = 0.4  # brightness, contrast, saturation: a factor drawn in [1 - 0.4, 1 + 0.4] (the paper gives no values)
IGNORE = 255


# --------------------------------------------------------------------------------------------
# Labels: ground-truth ids, optionally grouped into coarse parts


@dataclass
class PartMap:
    """Ground-truth ids -> coarse part ids (0..K-1, in the file's order); unlisted ids are ignored."""

    names: list[str]
    groups: list[list]  # per coarse part: ids (int) or ground-truth names (str, from the samples' part_names)

    def lut(self, part_names: dict[int, str], key: str) -> np.ndarray:
        by_name = {name: i for i, name in part_names.items()}
        lut = np.full(65536, IGNORE, np.uint8)
        for coarse, members in enumerate(self.groups):
            for m in members:
                if isinstance(m, str):
                    if m not in by_name:
                        raise BadSample(key, f"--part-map names part {m!r}, which the sample's part_names do not "
                                             f"have; pack with --label-names or use ids in the map")
                    m = by_name[m]
                lut[m] = coarse
        return lut


def load_part_map(path: str) -> PartMap:
    """Read ``{"coarse part": [id or name, ...], ...}``; a one-line error when the file is not that."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise PartkitError(f"cannot read --part-map {path!r}: {e}") from None
    fix = "write {\"coarse part\": [ids or names], ...}"
    if not isinstance(doc, dict) or not doc:
        raise PartkitError(f"--part-map {path!r} must be a non-empty JSON object; {fix}")
    if len(doc) > IGNORE:
        raise PartkitError(f"--part-map {path!r} has {len(doc)} coarse parts; at most {IGNORE} fit")
    seen: dict = {}
    for name, members in doc.items():
        if not isinstance(members, list) or not members:
            raise PartkitError(f"--part-map {path!r}: part {name!r} must list ids or names; {fix}")
        for m in members:
            ok = (isinstance(m, int) and not isinstance(m, bool) and 0 <= m < 65535) or isinstance(m, str)
            if not ok:
                raise PartkitError(f"--part-map {path!r}: part {name!r} lists {m!r}, not an id (0..65534) or a name")
            if m in seen:
                raise PartkitError(f"--part-map {path!r}: {m!r} is in both {seen[m]!r} and {name!r}")
            seen[m] = name
    return PartMap(list(doc), [list(v) for v in doc.values()])


@dataclass
class _Item:
    key: str
    image: torch.Tensor  # 3 x S x S uint8
    labels: torch.Tensor  # S x S int64 (IGNORE: not scored)
    unmapped: int  # labelled pixels whose id the part map does not list
    names: dict  # the sample's part_names ({id: name})


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    mode = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size, size), mode))


def _loader(size: int, gt_field: str, part_map: Optional[PartMap]):
    def load(sample: dict) -> _Item:
        key = sample["__key__"]
        rgb = fields.image(sample)
        gt = fields.gt_parts(sample, gt_field, size=rgb.shape[:2])
        ignore = fields.ignore_id(gt)
        unmapped = 0
        if part_map is not None:
            mapped = part_map.lut(fields.part_names(sample), key)[gt]
            unmapped = int(((mapped == IGNORE) & (gt != ignore)).sum())
            gt = mapped
        else:
            if int(gt[gt != ignore].max(initial=0)) >= IGNORE:
                raise BadSample(key, f"'{gt_field}' has ids of {IGNORE} or more; group them with --part-map")
            gt = np.where(gt == ignore, IGNORE, gt).astype(np.uint8)
        image = torch.from_numpy(_resize(rgb, size, False).copy()).permute(2, 0, 1).contiguous()
        labels = torch.from_numpy(_resize(gt, size, True).astype(np.int64))
        return _Item(key, image, labels, unmapped, {} if part_map else fields.part_names(sample))

    return load


# --------------------------------------------------------------------------------------------
# The network: backbone + upsampling decoder (PARTICLE's FCN head)


class _UpBlock(nn.Sequential):
    """x2 bilinear upsampling, then conv(s) + BatchNorm + ReLU (1x1 for CNNs, two 3x3 for ViTs)."""

    def __init__(self, cin: int, cout: int, convs3x3: bool):
        layers: list = [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
        if convs3x3:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class SegNet(nn.Module):
    """``backbone``'s last feature map -> 4 (CNN) or 3 (ViT) upsampling blocks -> 1x1 conv to
    ``classes`` logits, bilinearly resized to the input size."""

    def __init__(self, backbone, classes: int):
        super().__init__()
        self.backbone = backbone
        self.layer = backbone.num_layers - 1
        vit = backbone.family == "vit"
        widths = (256, 128, 64) if vit else (256, 128, 64, 32)
        blocks, c = [], backbone.channels[self.layer]
        for w in widths:
            blocks.append(_UpBlock(c, w, convs3x3=vit))
            c = w
        self.decoder = nn.Sequential(*blocks, nn.Conv2d(c, classes, 1))
        self.facet = "key" if vit else None  # PARTICLE: the last layer's keys for DINO ViTs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, _ = self.backbone.forward_features(x, [self.layer], facet=self.facet)
        return F.interpolate(self.decoder(feats[0]), size=x.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# Cross-validation over the saved evaluations


def _miou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    iou = confusion_iou(confusion)
    return (float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")), iou


def cross_validate(confusions: np.ndarray, folds: int) -> list[dict]:
    """Per fold: the evaluation (axis 0) with the best mIoU on the fold picks, the other folds score it.

    ``confusions``: ``evaluations x images x C x C`` (rows true, columns predicted). Folds are
    contiguous runs of ``images // folds`` images (the remainder is never a validation fold), as in
    PARTICLE's ``test_miou.py``; ties go to the earliest evaluation.
    """
    n = confusions.shape[1]
    size = n // folds
    if size < 1:
        raise PartkitError(f"{n} held-out images cannot make {folds} folds; lower --folds or give more images")
    out = []
    for f in range(folds):
        val = np.zeros(n, bool)
        val[f * size:(f + 1) * size] = True
        val_scores = [_miou(c[val].sum(0))[0] for c in confusions]
        best = int(np.nanargmax(val_scores)) if np.isfinite(val_scores).any() else 0
        test_miou, iou = _miou(confusions[best][~val].sum(0))
        out.append({"fold": f, "val_images": int(val.sum()), "test_images": int((~val).sum()), "evaluation": best,
                    "val_miou": val_scores[best], "test_miou": test_miou, "test_iou": iou})
    return out


# --------------------------------------------------------------------------------------------
# Training


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of ``B x 3 x H x W`` images in [0, 1], per image."""
    b = x.shape[0]

    def factor():
        return (1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * JITTER).to(x.device)

    x = x * factor()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
    x = (x - grey) * factor() + grey
    return x.clamp(0, 1)


class FewShotTrainer(Trainer):
    """Fine-tunes :class:`SegNet` on the training images, labelling the held-out ones every
    ``eval_every`` epochs; ``fit()`` trains, :meth:`report` cross-validates. Options: :func:`fewshot_seg`'s."""

    command = "fewshot-seg"

    def __init__(self, train: Sequence[_Item], held_out: Sequence[_Item], classes: int, *, model: str,
                 weights: Optional[str], epochs: int, eval_every: int, batch_size: int, lr: float,
                 augment: bool, device, seed: int):
        from .models import create_backbone

        self.setup_run(None, device=device, log_every=10 ** 9, checkpoint_every=10 ** 9)
        seed_everything(seed)
        backbone = create_backbone(model, weights)
        self.family = backbone.family
        self.net = SegNet(backbone, classes).to(self.dev)
        self.mean = torch.tensor(backbone.mean, device=self.dev).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std, device=self.dev).view(1, 3, 1, 1)
        self.train_items, self.held_out, self.classes = list(train), list(held_out), classes
        self.batch_size, self.augment, self.seed = min(batch_size, len(self.train_items)), augment, seed
        self.per_epoch = math.ceil(len(self.train_items) / self.batch_size)
        self.steps, self.eval_steps = epochs * self.per_epoch, eval_every * self.per_epoch
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)  # constant, as the paper's code
        self.config = {"backbone_weights": backbone.weights}
        self.evaluations: list[int] = []  # epoch of each evaluation
        self.confusions: list[np.ndarray] = []  # images x C x C per evaluation

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def train_step(self, step: int) -> dict:
        idx = epoch_batch_indices(step, len(self.train_items), self.batch_size, self.seed)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.stack([self.train_items[i].image for i in idx]).to(self.dev).float() / 255
        y = torch.stack([self.train_items[i].labels for i in idx]).to(self.dev)
        if self.augment:
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(self.dev)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            x = _jitter(x, gen)
        loss = F.cross_entropy(self.net(self._normalise(x)), y, ignore_index=IGNORE)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"step": step + 1, "loss": float(loss.detach())}

    def after_log(self, done: int) -> None:
        if done % self.eval_steps == 0 or done == self.steps:
            self.evaluate(done // self.per_epoch)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> None:
        self.net.eval()
        c = self.classes
        out = np.zeros((len(self.held_out), c, c), np.int64)
        for s in range(0, len(self.held_out), self.batch_size):
            chunk = self.held_out[s:s + self.batch_size]
            x = torch.stack([it.image for it in chunk]).to(self.dev).float() / 255
            pred = self.net(self._normalise(x)).argmax(1).cpu()
            for j, (it, p) in enumerate(zip(chunk, pred)):
                keep = it.labels != IGNORE
                codes = it.labels[keep] * c + p[keep]
                out[s + j] = torch.bincount(codes, minlength=c * c).reshape(c, c).numpy()
        self.net.train()
        self.evaluations.append(epoch)
        self.confusions.append(out)

    def checkpoint(self, step: int) -> None:
        pass  # nothing is saved: the evaluations are kept in memory

    def state(self, step: int) -> dict:
        return {}


def _check(train_images, eval_images, folds, epochs, eval_every, batch_size, lr, size):
    check_count("--train-images", train_images)
    check_count("--eval-images", eval_images)
    check_count("--folds", folds, 2, fix="pass --folds 2 or more (PARTICLE uses 5)")
    check_count("--epochs", epochs)
    check_count("--eval-every", eval_every)
    check_count("--batch-size", batch_size)
    check_count("--size", size, 32, fix="pass --size 32 or more (PARTICLE uses 256)")
    check_rate("--lr", lr, fix="pass a learning rate such as --lr 1e-4")
    if eval_images is not None and eval_images < folds:
        raise PartkitError(f"--eval-images {eval_images} cannot make {folds} folds; pass at least --folds images")


def fewshot_seg(inputs: Sequence[str], *, model: str = "efficientnet_lite0", weights: Optional[str] = None,
                train_images: int = 10, eval_images: Optional[int] = None, folds: int = 5, epochs: int = 200,
                eval_every: int = 5, batch_size: int = 8, lr: Optional[float] = None, size: int = 256,
                part_map: Optional[str] = None, gt_field: str = "gt_parts.png", augment: bool = True,
                repeats: int = 1, device: str = "auto", seed: int = 0, handler: Handler = stop) -> dict:
    """Few-shot part segmentation as PARTICLE evaluates a backbone; returns the report.

    The first ``train_images`` samples (images + ``gt_field``) train; the next ``eval_images``
    (default: all the rest) are held out. Images and labels are resized to ``size`` x ``size``.
    ``part_map``: a JSON file grouping ground-truth ids or names into coarse parts (the first part
    gets id 0; ids it does not list are ignored). ``lr`` defaults to the paper's (1e-4 CNN, 1e-5 ViT).
    ``repeats`` > 1 trains again with seeds ``seed + 1, ...`` (decoder init, batch order, augmentation):
    ``value``/``std`` are then the mean and std over the runs' means, each run in ``runs``.
    """
    _check(train_images, eval_images, folds, epochs, eval_every, batch_size, lr, size)
    check_count("--repeats", repeats)
    from .models import get_spec

    spec = get_spec(model)
    if spec.family == "pixels":
        raise PartkitError(f"{model!r} has no network to fine-tune; pick a CNN or ViT backbone (see `partkit models`)")
    groups = load_part_map(part_map) if part_map else None
    dev = resolve_device(device)
    wanted = train_images + (eval_images if eval_images is not None else 10 ** 12)
    items: list[_Item] = []
    for item in iter_loaded(inputs, _loader(size, gt_field, groups), handler=handler):
        items.append(item)
        if len(items) == wanted:
            break
    train, held_out = items[:train_images], items[train_images:]
    if len(train) < train_images or len(held_out) < folds:
        raise PartkitError(f"fewshot-seg needs {train_images} training images and at least {folds} held-out ones "
                           f"(one per fold), but the input has {len(items)}; lower --train-images/--folds or give "
                           f"more images")
    classes = len(groups.names) if groups else max(int(it.labels.numpy()[it.labels.numpy() != IGNORE].max(initial=0))
                                                   for it in items) + 1
    family = spec.family
    lr = lr if lr is not None else DEFAULT_LR["vit" if family == "vit" else "cnn"]
    log(f"fewshot-seg: {model} ({weights or 'default weights'}), {len(train)} training images, {len(held_out)} "
        f"held out in {folds} folds, {classes} parts, {epochs} epochs at {size}x{size}, lr {lr:g}")
    names = groups.names if groups else _names(items, classes)
    runs = [_run(train, held_out, classes, folds, seed + r, names, model=model, weights=weights, epochs=epochs,
                 eval_every=eval_every, batch_size=batch_size, lr=lr, augment=augment, device=dev)
            for r in range(repeats)]
    first = runs[0]
    report = {k: first[k] for k in ("value", "std", "folds", "per_part", "last_epoch_miou")}
    if repeats > 1:  # the mean over seeds; std: over the seeds' means (the fold std stays per run)
        means = np.array([r["value"] for r in runs], np.float64)
        report = {"value": round(float(means.mean()), 4), "std": round(float(means.std()), 4),
                  "fold_std": round(float(np.mean([r["std"] for r in runs])), 4),
                  "runs": [{k: r[k] for k in ("seed", "value", "std", "folds", "last_epoch_miou")} for r in runs],
                  "per_part": {n: _mean([r["per_part"][n] for r in runs]) for n in names}}
    trainer = first["trainer"]
    return {
        **report,
        "model": model, "weights": weights, "backbone_weights": trainer.config["backbone_weights"],
        "parts": names, "part_map": part_map, "train_keys": [it.key for it in train],
        "held_out_images": len(held_out), "unmapped_pixels": int(sum(it.unmapped for it in items)),
        "protocol": {"train_images": train_images, "folds": folds, "epochs": epochs, "eval_every": eval_every,
                     "batch_size": trainer.batch_size, "lr": lr, "optimizer": "Adam", "loss": "cross-entropy",
                     "size": size, "augment": augment, "decoder_blocks": len(trainer.net.decoder) - 1,
                     "layer": trainer.net.layer, "repeats": repeats, "paper": PAPER},
        "final_loss": first["final_loss"], "seed": seed, "device": str(dev),
        "partkit_version": __version__,
    }


def _run(train, held_out, classes, folds, seed, names, **options) -> dict:
    """One fine-tuning run (seed ``seed``) and its cross-validated scores."""
    trainer = FewShotTrainer(train, held_out, classes, seed=seed, **options)
    history = trainer.fit()["losses"]
    results = cross_validate(np.stack(trainer.confusions), folds)
    scores = np.array([r["test_miou"] for r in results], np.float64)
    last_miou, _ = _miou(trainer.confusions[-1].sum(0))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a part absent from every fold's test images: null
        per_part = np.nanmean(np.stack([r["test_iou"] for r in results]), 0)
    pct = _pct
    return {
        "seed": seed, "trainer": trainer,
        "value": pct(scores.mean()), "std": pct(scores.std()),  # population std, as test_miou.py's np.std
        "folds": [{**{k: v for k, v in r.items() if k not in ("test_iou", "evaluation")},
                   "epoch": trainer.evaluations[r["evaluation"]], "val_miou": pct(r["val_miou"]),
                   "test_miou": pct(r["test_miou"])} for r in results],
        "per_part": {names[i]: pct(v) for i, v in enumerate(per_part)},
        "last_epoch_miou": pct(last_miou), "final_loss": history[-1] if history else None,
    }


def _mean(values) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def _pct(x) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else round(float(x) * 100, 4)


def _names(items: Sequence[_Item], classes: int) -> list[str]:
    """Each id's name in the samples' part_names (the first sample naming it), else the id."""
    names: dict = {}
    for it in items:
        for i, name in it.names.items():
            names.setdefault(i, name)
    return [names.get(i, str(i)) for i in range(classes)]
