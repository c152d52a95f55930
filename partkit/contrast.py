"""``self-train --objective part-contrast``: PARTICLE's part-contrastive fine-tuning of a backbone.

Each round clusters every image's discovery features into parts (per-image k-means of CNN
hypercolumns or ViT keys; later rounds continue the previous round's partition), then fine-tunes
the backbone so that a part's pooled features **of the network's last feature map** (CNN: before
global pooling; ViT: the output patch tokens) agree across two augmented views of its image and
differ from the other parts of the image and of the batch (Saha & Maji, "PARTICLE: Part Discovery
and Contrastive Learning for Fine-grained Recognition", 2023; the loss is DetCon's, Henaff et al.
2021). ViTs add the DINO loss on the CLS token with equal weight (Sec. 5.2). A long first stage is
followed by short rounds, each with its own learning rate (Sec. 5.4, 6.6).

Nothing holds every image: a scan counts the images and reports bad ones; each round's discovery
streams them in batches into a part shard in the run folder (the resized image and its part-id
grid, ``parts-round{r}.tar``); training streams that shard through :mod:`partkit.streaming`.

>>> part_contrast(["cihp.tar"], "runs/pc", epochs=40, round_epochs=5)  # doctest: +SKIP
>>> create_backbone("efficientnet_lite0", "runs/pc")  # doctest: +SKIP  (the fine-tuned weights)
"""
from __future__ import annotations

import copy
import glob
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fields
from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import BadSample, Handler, PartkitError, recorded, stop
from .extract import FeatureExtractor
from .io import iter_loaded, iter_samples
from .streaming import SampleStream, StreamLoader, default_workers, seeded_generator
from .training import Trainer, check_count, check_rate, digest, require, to_device

__all__ = ["part_contrast", "PartContrastTrainer", "part_contrast_loss", "dino_loss", "mask_pool", "part_masks",
           "cell_masks", "PartContrastNet", "DINOHead", "make_views", "sample_views", "discover_parts", "discovery_pass",
           "Phase", "plan_phases",
           "FAMILY_DEFAULTS", "DEFAULT_K"]

# The paper's settings per backbone family (Sec. 5.1-5.4, 6.3, 6.6; the official code where the paper
# is silent). Every option left at None takes its family's value; the README lists them beside ours.
FAMILY_DEFAULTS = {
    "cnn": {"k": 25, "facet": None, "optimizer": "sgd", "lr": 0.005, "round_lr": 0.05, "min_lr": 0.0,
            "weight_decay": 1.5e-6, "batch_size": 320, "epochs": 600, "round_epochs": 20, "warmup": 10,
            "momentum": 0.996, "momentum_end": 0.996, "tau": 0.1, "proj_dim": 256, "proj_hidden": 4096,
            "dino_weight": 0.0, "clip_grad": 0.0},
    "vit": {"k": 6, "facet": "key", "optimizer": "adamw", "lr": 1e-7, "round_lr": 1e-8, "min_lr": 1e-8,
            "weight_decay": 0.4, "batch_size": 64, "epochs": 100, "round_epochs": 60, "warmup": 10,
            "momentum": 0.996, "momentum_end": 1.0, "tau": 0.1, "proj_dim": 256, "proj_hidden": 2048,
            "dino_weight": 1.0, "clip_grad": 3.0},
}
DEFAULT_K = {family: d["k"] for family, d in FAMILY_DEFAULTS.items()}  # PARTICLE: 25 hypercolumn parts, 5-7 ViT
KMEANS_ITERS = 500  # sklearn k-means with 500 iterations, first round and warm-started rounds (Sec. 5.1, 6.3)
SGD_MOMENTUM = 0.9
# DINO (Caron et al. 2021) as PARTICLE's ViT script runs it: head 2048 hidden / 256 bottleneck, student
# temperature 0.1, teacher temperature 0.04 -> 0.07 over 20 epochs, centre momentum 0.9, the head's last
# layer frozen during the first epoch
DINO_HIDDEN, DINO_BOTTLENECK, DINO_OUT_DIM = 2048, 256, 65536
DINO_STUDENT_TEMP, DINO_TEACHER_TEMP, DINO_TEMP_EPOCHS = 0.1, (0.04, 0.07), 20
DINO_CENTER_MOMENTUM, DINO_FREEZE_LAST_EPOCHS = 0.9, 1
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (BYOL / PARTICLE)
# (blur, solarize) probability of the first and second view: BYOL's asymmetric pair
VIEW_PROBS = ((1.0, 0.0), (0.1, 0.2))
_PROBE = 0x9E3779B9  # generator word of the fixed probe views
# options that must match to --resume a run (the rest, e.g. stop_at or log_every, may change)
RESUME_KEYS = ("model", "weights", "layers", "facet", "rounds", "k", "epochs", "round_epochs", "batch_size",
               "optimizer", "lr", "round_lr", "min_lr", "weight_decay", "warmup", "size", "momentum", "momentum_end",
               "tau", "proj_dim", "proj_hidden", "dino_weight", "dino_out_dim", "clip_grad", "kmeans_iters", "seed",
               "shuffle_buffer", "images_digest")


# --------------------------------------------------------------------------------------------
# Schedule: a long first stage, then short rounds, each with its own learning rate


@dataclass(frozen=True)
class Phase:
    """One round of training: ``steps`` steps from ``start``, peak ``lr`` after ``warmup`` steps."""
    round: int  # 1-based
    start: int
    steps: int
    epochs: int
    lr: float
    warmup: int


def plan_phases(rounds: int, epochs: int, round_epochs: int, steps_per_epoch: int, lr: float, round_lr: float,
                warmup: int) -> list[Phase]:
    """Round 1 trains ``epochs`` epochs at ``lr``; rounds 2.. train ``round_epochs`` at ``round_lr``.

    Each phase warms up linearly for ``warmup`` epochs (at most half the phase), then decays with a
    cosine (PARTICLE reruns its training script for every round, so every phase has its own schedule).
    """
    phases, start = [], 0
    for r in range(rounds):
        ep = epochs if r == 0 else round_epochs
        steps = ep * steps_per_epoch
        phases.append(Phase(r + 1, start, steps, ep, lr if r == 0 else round_lr,
                            min(warmup * steps_per_epoch, steps // 2)))
        start += steps
    return phases


def _cosine(start: float, end: float, t: float) -> float:
    """``start`` at ``t = 0`` to ``end`` at ``t = 1`` along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))


def phase_lr(phase: Phase, s: int, min_lr: float) -> float:
    """The learning rate of step ``s`` of ``phase``: linear warm-up to ``phase.lr``, cosine to ``min_lr``."""
    if s < phase.warmup:
        return phase.lr * (s + 1) / phase.warmup
    return _cosine(phase.lr, min_lr, (s - phase.warmup) / max(1, phase.steps - phase.warmup))


# --------------------------------------------------------------------------------------------
# Losses and model


def part_contrast_loss(pred1: torch.Tensor, target1: torch.Tensor, pred2: torch.Tensor, target2: torch.Tensor,
                       tau: float = 0.1) -> torch.Tensor:
    """PARTICLE's Eq. 3 (DetCon's InfoNCE over parts), symmetrised over the two views.

    Row i of every ``N x d`` input is the same part (of some image in the batch). Latents are
    L2-normalised and scaled to norm ``1/sqrt(tau)``; the online prediction of part i in one view
    is scored against the target latents of all N parts in the other view: part i is the
    positive, the other parts of its image and of the other images are the negatives.
    """
    def nce(pred, target):
        p = F.normalize(pred.float(), dim=-1) * tau ** -0.5
        t = F.normalize(target.float(), dim=-1) * tau ** -0.5
        return F.cross_entropy(p @ t.T, torch.arange(len(p), device=p.device))

    return 0.5 * (nce(pred1, target2) + nce(pred2, target1))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float,
              student_temp: float = DINO_STUDENT_TEMP) -> torch.Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student, across views.

    ``student`` and ``teacher`` are ``2B x D`` head outputs of view 1 then view 2; the teacher of
    each view teaches the student of the other view; the two terms are averaged.
    """
    s = (student.float() / student_temp).chunk(2)
    t = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    return 0.5 * sum((-t[a] * F.log_softmax(s[1 - a], dim=-1)).sum(-1).mean() for a in (0, 1))


def part_masks(labels: torch.Tensor, k: int, cell: int) -> torch.Tensor:
    """``B x S x S`` part ids -> ``B x k x S/cell x S/cell`` soft masks (fraction of each cell)."""
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, cell) if cell > 1 else onehot


def cell_masks(labels: torch.Tensor, k: int, size: Sequence[int]) -> torch.Tensor:
    """``B x S x S`` part ids -> ``B x k x h x w`` binary masks on an ``h x w`` feature map: each cell
    goes to the part covering most of it (ties: the lower id), as PARTICLE's code downsamples."""
    frac = F.adaptive_avg_pool2d(F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float(), tuple(size))
    return F.one_hot(frac.argmax(1), k).permute(0, 3, 1, 2).float()


def mask_pool(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PARTICLE's Eq. 1: the average of ``B x C x h x w`` features under each of ``B x K x h x w`` masks."""
    area = masks.sum((2, 3)).clamp_min(1e-6)
    return torch.einsum("bkhw,bchw->bkc", masks, feats.float()) / area[..., None]


class MLP(nn.Sequential):
    """Linear-LayerNorm-ReLU-Linear, the projector/predictor of PARTICLE's code (batch-independent)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class DINOHead(nn.Module):
    """DINO's head: a 3-layer GELU MLP to a 256-d bottleneck, L2-normalised, then a weight-normalised
    linear layer (direction ``v``, norm ``g`` per output, ``g`` starting at 1 and trained)."""

    def __init__(self, dim: int, out_dim: int, hidden: int = DINO_HIDDEN, bottleneck: int = DINO_BOTTLENECK):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach().clone())
        self.last_g = nn.Parameter(torch.ones(out_dim, 1))

    def last_layer(self) -> list:
        return [self.last_v, self.last_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ (self.last_g * F.normalize(self.last_v, dim=1)).T


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # small batches: keep the pretrained running statistics


class PartContrastNet(nn.Module):
    """Online backbone + projector + predictor (+ DINO head), and the momentum (EMA) copy of backbone,
    projector (and head).

    ``forward(x1, x2, l1, l2)`` takes two batches of views and their ``B x S x S`` part ids and
    returns ``(loss, number of parts present in both views, contrast loss, DINO loss or None)``. The
    parts are pooled on the backbone's last feature map (``Backbone.forward_last``); a part is in a
    view when it is the majority part of at least one cell of that map.
    """

    def __init__(self, backbone: nn.Module, k: int, *, proj_dim: int = 256, proj_hidden: int = 4096,
                 tau: float = 0.1, dino_weight: float = 0.0, dino_out_dim: int = DINO_OUT_DIM):
        super().__init__()
        self.k, self.tau, self.dino_weight = k, tau, dino_weight
        self.backbone = backbone
        channels = backbone.last_channels
        self.projector = MLP(channels, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)
        target = {"backbone": copy.deepcopy(self.backbone), "projector": copy.deepcopy(self.projector)}
        self.head = None
        if dino_weight > 0:
            self.head = DINOHead(channels, dino_out_dim)
            target["head"] = copy.deepcopy(self.head)
            self.register_buffer("center", torch.zeros(1, dino_out_dim))
        self.target = nn.ModuleDict(target)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        _freeze_batchnorm(self)
        return self

    def last_map(self, backbone: nn.Module, x: torch.Tensor):
        """The contrasted features: ``(B x C x h x w`` last feature map, CLS token or None)."""
        if backbone.family == "cnn":
            x = x.contiguous(memory_format=torch.channels_last)
        return backbone.forward_last(x)

    def forward(self, x1, x2, l1, l2, teacher_temp: Optional[float] = None, update_center: bool = False):
        b = len(x1)
        x = torch.cat([x1, x2])
        fmap, cls = self.last_map(self.backbone, x)
        masks = cell_masks(torch.cat([l1, l2]), self.k, fmap.shape[-2:])
        present = masks.sum((2, 3)) > 0
        both = present[:b] & present[b:]  # B x K
        sel = torch.cat([both, both])
        n = int(both.sum())
        with torch.no_grad():
            tmap, tcls = self.last_map(self.target["backbone"], x)
        if n:
            q = self.predictor(self.projector(mask_pool(fmap, masks)[sel]))
            with torch.no_grad():
                t = self.target["projector"](mask_pool(tmap, masks)[sel])
            contrast = part_contrast_loss(q[:n], t[:n], q[n:], t[n:], self.tau)
        else:
            contrast = fmap.sum() * 0.0  # no part survives both crops: a zero loss that keeps the graph
        loss, dino = contrast, None
        if self.head is not None and teacher_temp is not None:
            student = self.head(cls)
            with torch.no_grad():
                teacher = self.target["head"](tcls)
            dino = dino_loss(student, teacher, self.center, teacher_temp)
            loss = loss + self.dino_weight * dino
            if update_center:
                self._update_center(teacher)
        return loss, n, contrast, dino

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        total, count = teacher.float().sum(0, keepdim=True), len(teacher)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            count *= torch.distributed.get_world_size()
        self.center.mul_(DINO_CENTER_MOMENTUM).add_(total / count, alpha=1 - DINO_CENTER_MOMENTUM)

    def student_modules(self) -> list:
        return [self.backbone, self.projector] + ([self.head] if self.head is not None else [])

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- momentum * target + (1 - momentum) * online (backbone, projector, head)."""
        for name in self.target:
            online, target = getattr(self, name), self.target[name]
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.lerp_(po.detach(), 1.0 - momentum)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)


# --------------------------------------------------------------------------------------------
# Augmentation: two views of an image and its part map, cropped and flipped together


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _crop_box(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, height, width)`` drawn from ``gen``."""
    area = h * w
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(gen, *CROP_SCALE)
        aspect = math.exp(_uniform(gen, *log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    ratio = w / h  # fallback: the central crop of the nearest allowed aspect
    if ratio < CROP_RATIO[0]:
        cw, ch = w, round(w / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        ch, cw = h, round(h * CROP_RATIO[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _colour(img: torch.Tensor, gen: torch.Generator, blur_p: float, solarize_p: float) -> torch.Tensor:
    """BYOL's photometric augmentations on a ``3 x S x S`` image in [0, 1]."""
    import torchvision.transforms.v2.functional as TF

    if _uniform(gen) < 0.8:
        b, c, s, h = JITTER
        ops = [lambda x, f=_uniform(gen, 1 - b, 1 + b): TF.adjust_brightness(x, f),
               lambda x, f=_uniform(gen, 1 - c, 1 + c): TF.adjust_contrast(x, f),
               lambda x, f=_uniform(gen, 1 - s, 1 + s): TF.adjust_saturation(x, f),
               lambda x, f=_uniform(gen, -h, h): TF.adjust_hue(x, f)]
        for i in torch.randperm(4, generator=gen).tolist():
            img = ops[i](img)
    if _uniform(gen) < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _uniform(gen) < blur_p:
        sigma = _uniform(gen, 0.1, 2.0) * img.shape[-1] / 224  # BYOL's range, given for 224 px
        radius = max(1, math.ceil(3 * sigma))
        img = TF.gaussian_blur(img, [2 * radius + 1] * 2, [sigma, sigma])
    if _uniform(gen) < solarize_p:
        img = TF.solarize(img, 0.5)
    return img.clamp(0, 1)


def _view(rgb: torch.Tensor, grid_labels: torch.Tensor, cell: int, size: int, gen: torch.Generator,
          blur_p: float, solarize_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of a ``3 x h x w`` uint8 image: (``3 x S x S`` float in [0, 1], ``S x S`` part ids)."""
    top, left, ch, cw = _crop_box(rgb.shape[1], rgb.shape[2], gen)
    crop = rgb[None, :, top:top + ch, left:left + cw].float().div_(255)
    img = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    # part id of the image pixel under each output pixel's centre: the part map follows the crop
    dev = grid_labels.device
    ys = (((torch.arange(size, device=dev) + 0.5) * (ch / size)).long().clamp_max(ch - 1) + top) // cell
    xs = (((torch.arange(size, device=dev) + 0.5) * (cw / size)).long().clamp_max(cw - 1) + left) // cell
    labels = grid_labels[ys[:, None], xs[None, :]]
    if _uniform(gen) < 0.5:
        img, labels = img.flip(-1), labels.flip(-1)
    return _colour(img, gen, blur_p, solarize_p), labels


def sample_views(rgb: torch.Tensor, labels: torch.Tensor, *, cell: int, size: int, gen: torch.Generator):
    """The two augmented views of one image: ``((img1, labels1), (img2, labels2))``, images in [0, 1].

    ``rgb`` is a ``3 x h x w`` uint8 tensor, ``labels`` its part-id grid (one id per feature cell of
    ``cell`` pixels). Both views crop image and part map consistently (scale 0.08-1) and flip them
    together; colour jitter (p 0.8), grayscale (p 0.2), blur (p 1.0 / 0.1) and solarize (p 0 / 0.2)
    follow BYOL, as PARTICLE. All randomness comes from ``gen``.
    """
    return tuple(_view(rgb, labels, cell, size, gen, blur_p, solarize_p) for blur_p, solarize_p in VIEW_PROBS)


def _normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, 3, 1, 1) if x.dim() == 4 else (3, 1, 1)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


def make_views(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], *, cell: int, size: int,
               mean, std, gen: torch.Generator):
    """:func:`sample_views` of each image, drawn from one generator, stacked: ``(x1, x2, labels1, labels2)``,
    images normalised with ``mean`` / ``std``."""
    pairs = [sample_views(im, lab, cell=cell, size=size, gen=gen) for im, lab in zip(images, labels)]
    x1, x2 = (_normalized(torch.stack([p[v][0] for p in pairs]), mean, std) for v in (0, 1))
    l1, l2 = (torch.stack([p[v][1] for p in pairs]) for v in (0, 1))
    return x1, x2, l1, l2


# --------------------------------------------------------------------------------------------
# Data: a scan of the input, then one part shard per round in the run folder, streamed to training

ROUND_SHARD = "parts-round{}.tar"  # in the run folder: each image resized, and its part-id grid
IMAGE_FIELD, PARTS_FIELD = "png", "parts.png"  # the resized uint8 image; the part id of each feature cell
_STREAM = 0x5EED5  # generator word of a round's stream order


def _resized(fx: FeatureExtractor, rgb: np.ndarray) -> np.ndarray:
    """The image resized as ``extract`` resizes it (longer side ``--size``), as ``h x w x 3`` uint8."""
    x, geom = fx.preprocess(rgb)
    rh, rw = geom["resized"]
    # undo the normalisation: the exact resized uint8 pixels (preprocess maps them back bit for bit)
    out = ((x[:, :rh, :rw] * fx.std + fx.mean) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).numpy().copy()


def _scan(inputs: Sequence[str], fx: FeatureExtractor, handler: Handler) -> tuple[list, list, frozenset]:
    """One serial pass that decodes every image once, before anything is written: ``(keys, skipped records,
    bad keys)``. Bad samples go to ``handler`` here, once; later passes leave them out silently."""
    skipped: list = []
    bad: list = []
    record = recorded(handler, skipped)

    def on_bad(b: BadSample) -> None:
        record(b)
        bad.append(b.key)

    def load(sample: dict) -> str:
        fields.image(sample, min_size=fx.min_size)
        return sample["__key__"]

    keys = list(iter_loaded(inputs, load, handler=on_bad))
    return keys, skipped, frozenset(k for k in bad if k is not None)


def _ignore(bad: BadSample) -> None:
    """The handler of the passes after the scan, which reported every bad sample already."""


def _input_images(inputs: Sequence[str], fx: FeatureExtractor, bad: frozenset) -> Iterator[tuple]:
    """``(key, resized rgb, None)`` of every good input image, in file order (round 1's discovery)."""
    def load(sample: dict) -> tuple:
        if sample["__key__"] in bad:
            raise BadSample(sample["__key__"], "reported by the scan")
        return sample["__key__"], _resized(fx, fields.image(sample, min_size=fx.min_size)), None

    return iter_loaded(inputs, load, handler=_ignore)


def _read_round(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """A round shard's sample: (resized ``h x w x 3`` uint8 image, int64 part-id grid)."""
    from .io import decode_image, decode_label_map

    return decode_image(sample), decode_label_map(sample, PARTS_FIELD).astype(np.int64)


def _round_images(path: str) -> Iterator[tuple]:
    """``(key, resized rgb, part-id grid)`` of a round shard, in order (the next round's warm start)."""
    for sample in iter_samples([path]):
        yield (sample["__key__"], *_read_round(sample))


def discover_parts(fx: FeatureExtractor, images: Sequence[np.ndarray], k: int, *, prev=None, seed: int = 0,
                   first: int = 0, max_iter: int = KMEANS_ITERS):
    """Per-image k-means (cosine) of the discovery features of one batch: ``(part-id grids, inertias)``.

    ``images`` are resized ``h x w x 3`` uint8 images (:func:`_resized`); image ``i`` of the batch is image
    ``first + i`` of the round. Round 1 (``prev=None``): k-means++ with seed ``(seed, first + i)``, so the
    result does not depend on how images are batched. Later rounds continue the previous partition
    ``prev`` (one part-id grid per image, PARTICLE Sec. 6.3): k-means starts from the means of the
    current features under the old parts (``kmeans.partition_centers``, as ``cluster --warm-start
    parts``), so part ids keep their meaning; a part that vanished stays gone.
    """
    from .kmeans import batched_kmeans, normalize_rows, partition_centers

    with torch.inference_mode():
        x = [fx.preprocess(rgb) for rgb in images]
        feats, _ = fx.forward(torch.stack([xi for xi, _ in x]))
    problems, grids = [], []
    for (_, geom), f in zip(x, feats):
        gh, gw = fx.valid_grid(geom, (fx.input_size // fx.cell,) * 2)
        grids.append((gh, gw))
        problems.append(normalize_rows(f[:, :gh, :gw].reshape(f.shape[0], -1).T.cpu().numpy(), "cosine"))
    seeds = [[seed, first + i] for i in range(len(images))]
    if prev is None:
        results = batched_kmeans(problems, k, metric="cosine", random_state=seeds, device=fx.device,
                                 max_iter=max_iter)
        ids = [np.arange(r.n_clusters) for r in results]
    else:
        starts = [partition_centers(X, np.asarray(lab)) for X, lab in zip(problems, prev)]
        ids = [i for _, i in starts]
        results = batched_kmeans(problems, [len(i) for i in ids], metric="cosine", init=[c for c, _ in starts],
                                 random_state=seeds, device=fx.device, max_iter=max_iter)
    labels = [i[r.labels].reshape(g) for r, i, g in zip(results, ids, grids)]
    return labels, [float(r.inertia) for r in results]


def discovery_pass(fx: FeatureExtractor, images: Iterator[tuple], path: str, k: int, *, warm: bool, seed: int = 0,
                   batch_size: int = 16, max_iter: int = KMEANS_ITERS) -> tuple[int, float]:
    """One round's part discovery, streamed: ``(key, resized rgb, previous grid or None)`` in, read
    ``batch_size`` at a time, and a shard at ``path`` out (``png``: the resized image, ``parts.png``:
    its part-id grid), written under a temporary name and renamed when complete. ``warm``: continue the
    previous grids. Returns ``(images, total inertia)``; holds one batch at a time."""
    from .io import TarSampleWriter, encode_png
    from .io.codecs import encode_image_png
    from .io.sink import atomic_file

    count, inertia = 0, 0.0
    batch: list = []

    def flush(writer):
        nonlocal count, inertia
        grids, inert = discover_parts(fx, [b[1] for b in batch], k, prev=[b[2] for b in batch] if warm else None,
                                      seed=seed, first=count, max_iter=max_iter)
        for (key, rgb, _), grid in zip(batch, grids):
            writer.write({"__key__": key, IMAGE_FIELD: encode_image_png(rgb), PARTS_FIELD: encode_png(grid)})
        count += len(batch)
        inertia += sum(inert)
        batch.clear()

    with atomic_file(path) as f:
        writer = TarSampleWriter(f)
        try:
            for item in images:
                batch.append(item)
                if len(batch) == batch_size:
                    flush(writer)
            if batch:
                flush(writer)
            writer.close()
        except BaseException:
            writer.discard()
            raise
    return count, inertia


def _seed_word(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint32)[0])


def _round_sample(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A round shard's sample as tensors: (``3 x h x w`` uint8 image, part-id grid)."""
    rgb, grid = _read_round(sample)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), torch.from_numpy(grid)  # writable


class _Views:
    """The training stream's ``transform`` (runs in the loader's workers): a round shard's ``(image, part map)``
    to its two normalised views and their part maps, drawn from the sample position's own generator
    (:meth:`partkit.streaming.SampleStream.generator`; the stream's seed holds ``(seed, round)``)."""

    def __init__(self, *, cell: int, size: int, mean, std, k: int):
        self.cell, self.size, self.mean, self.std = cell, size, tuple(mean), tuple(std)
        self.small = k <= 256

    def __call__(self, item: tuple, gen: torch.Generator):
        rgb, grid = item
        (x1, l1), (x2, l2) = sample_views(rgb, grid, cell=self.cell, size=self.size, gen=gen)
        dtype = torch.uint8 if self.small else torch.int64  # ids < k: an eighth of the bytes to the trainer
        return (_normalized(x1, self.mean, self.std), _normalized(x2, self.mean, self.std), l1.to(dtype),
                l2.to(dtype))


@torch.no_grad()
def _probe_loss(net: PartContrastNet, probe: list, fx: FeatureExtractor, seed: int, device) -> float:
    """The contrast loss on one fixed batch of views (of the first images, ``probe``: ``(rgb, grid)`` pairs):
    unlike the training loss, comparable from step to step."""
    x1, x2, l1, l2 = make_views([p[0] for p in probe], [p[1] for p in probe], cell=fx.cell,
                                size=fx.input_size, mean=fx.backbone.mean, std=fx.backbone.std,
                                gen=seeded_generator(seed, _PROBE))
    return float(net(*(t.to(device) for t in (x1, x2, l1, l2)))[2])


# --------------------------------------------------------------------------------------------
# Weights export


def _export_state(backbone: nn.Module, clip_model: Optional[nn.Module]) -> dict:
    """The backbone's weights in the layout ``create_backbone(name, file)`` loads."""
    module = clip_model if clip_model is not None else backbone.net
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _build(model: str, weights: Optional[str]):
    """(backbone, full open_clip model or None): open_clip's loader expects both towers' weights."""
    from .models import create_backbone, create_clip, get_spec

    if get_spec(model).source.startswith("open_clip:"):
        backbone, clip_model, _ = create_clip(model, weights)
        return backbone, clip_model
    backbone = create_backbone(model, weights)
    if not isinstance(getattr(backbone, "net", None), nn.Module):
        raise PartkitError(f"{model!r} is built by a custom builder whose weights cannot be saved for "
                           f"create_backbone; fine-tune a timm or open_clip backbone")
    return backbone, None


# --------------------------------------------------------------------------------------------
# Training


def _check_options(o: dict, family: str) -> None:
    for option, key in (("--rounds", "rounds"), ("--epochs", "epochs"), ("--round-epochs", "round_epochs"),
                        ("--batch-size", "batch_size"), ("--size", "size"), ("--proj-dim", "proj_dim"),
                        ("--proj-hidden", "proj_hidden"), ("--dino-out-dim", "dino_out_dim"),
                        ("--kmeans-iters", "kmeans_iters")):
        check_count(option, o[key])
    check_count("-k", o["k"], 2, fix="pass at least 2 parts per image, e.g. -k 8")
    check_count("--warmup", o["warmup"], 0, fix="pass the warm-up epochs of each round, e.g. --warmup 10")
    check_rate("--lr", o["lr"], fix="pass a learning rate such as --lr 0.005")
    check_rate("--round-lr", o["round_lr"], fix="pass a learning rate such as --round-lr 0.05")
    check_rate("--min-lr", o["min_lr"], strict=False, fix="pass the final learning rate, e.g. --min-lr 0")
    check_rate("--weight-decay", o["weight_decay"], strict=False, fix="pass e.g. --weight-decay 1.5e-6")
    for option, key in (("--momentum", "momentum"), ("--momentum-end", "momentum_end")):
        check_rate(option, o[key], high=1.0, strict=False,
                   fix="pass the EMA decay of the momentum encoder, e.g. --momentum 0.996")
    check_rate("--tau", o["tau"], fix="pass a temperature such as --tau 0.1")
    check_rate("--dino-weight", o["dino_weight"], strict=False, fix="pass 1 (the paper's equal weight) or 0 (off)")
    check_rate("--clip-grad", o["clip_grad"], strict=False, fix="pass a gradient-norm bound, or 0 for none")
    require(o["optimizer"] in ("sgd", "adamw"), "--optimizer", o["optimizer"], "sgd or adamw",
            "pass --optimizer sgd (PARTICLE's CNN setting) or adamw (its ViT setting)")
    if o["dino_weight"] > 0 and family != "vit":
        raise PartkitError(f"--dino-weight {o['dino_weight']:g}: the DINO loss needs a ViT's CLS token and "
                           f"{o['model']!r} is a {family}; pass --dino-weight 0 or a ViT --model")


class PartContrastTrainer(Trainer):
    """PARTICLE's rounds on :class:`partkit.training.Trainer`: a step re-discovers the parts when a round
    starts, then takes one optimiser step on the part-contrastive loss (+ DINO for ViTs) and moves
    the momentum encoder.

    The options are :func:`part_contrast`'s; ``fit()`` runs it.
    """

    command = "part-contrast"
    loss_keys = ("loss", "contrast", "dino")

    def __init__(self, inputs: Sequence[str], out: str, *, model: str = "efficientnet_lite0",
                 weights: Optional[str] = None, layers: Optional[Sequence[int]] = None, facet: Optional[str] = None,
                 rounds: int = 3, k: Optional[int] = None, epochs: Optional[int] = None,
                 round_epochs: Optional[int] = None, batch_size: Optional[int] = None,
                 optimizer: Optional[str] = None, lr: Optional[float] = None, round_lr: Optional[float] = None,
                 min_lr: Optional[float] = None, weight_decay: Optional[float] = None, warmup: Optional[int] = None,
                 size: int = 224, momentum: Optional[float] = None, momentum_end: Optional[float] = None,
                 tau: Optional[float] = None, proj_dim: Optional[int] = None, proj_hidden: Optional[int] = None,
                 dino_weight: Optional[float] = None, dino_out_dim: int = DINO_OUT_DIM,
                 clip_grad: Optional[float] = None, kmeans_iters: int = KMEANS_ITERS, device: str = "auto",
                 seed: int = 0, resume: bool = False, stop_at: Optional[int] = None, log_every: int = 10,
                 checkpoint_every: int = 100, handler: Handler = stop, log: str = "jsonl", workers: Optional[int] = None,
                 shuffle_buffer: int = 256):
        from .models import get_spec

        family = get_spec(model).family
        if family not in FAMILY_DEFAULTS:
            raise PartkitError(f"{model!r} has no weights to fine-tune; pick a CNN or ViT backbone "
                               "(see `partkit models`)")
        given = dict(k=k, facet=facet, optimizer=optimizer, lr=lr, round_lr=round_lr, min_lr=min_lr,
                     weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, round_epochs=round_epochs,
                     warmup=warmup, momentum=momentum, momentum_end=momentum_end, tau=tau, proj_dim=proj_dim,
                     proj_hidden=proj_hidden, dino_weight=dino_weight, clip_grad=clip_grad)
        o = {**FAMILY_DEFAULTS[family], **{key: v for key, v in given.items() if v is not None}}
        o.update(model=model, rounds=rounds, size=size, dino_out_dim=dino_out_dim, kmeans_iters=kmeans_iters,
                 shuffle_buffer=shuffle_buffer)
        _check_options(o, family)
        check_count("--workers", workers, 0, fix="pass --workers 0 to decode in the training process")
        check_count("--shuffle-buffer", shuffle_buffer, fix="pass the samples a shuffle buffer holds, e.g. 256")
        self.setup_run(out, device=resolve_device(device), resume=resume, stop_at=stop_at, log_every=log_every,
                       checkpoint_every=checkpoint_every, log_to=log)
        dev = self.dev
        seed_everything(seed)
        backbone, self.clip_model = _build(model, weights)
        fx = self.fx = FeatureExtractor(backbone, layers=layers, facet=o["facet"], size=size, device=str(dev))
        keys, skipped, self.bad = _scan(inputs, fx, handler)  # the only pass that reports bad samples
        if skipped:
            self.say(f"part-contrast: skipped {len(skipped)} bad samples")
        if not keys:
            raise PartkitError("part-contrast: the input holds no images; pack some with `partkit pack`")
        n = self.n_images = len(keys)
        batch = o["batch_size"]
        if batch > n:
            self.say(f"part-contrast: --batch-size {batch} is more than the {n} images; using {n}")
            batch = n
        self.inputs, self.workers = list(inputs), default_workers(workers, self.dev)
        self.backbone, self.batch_size, self.seed, self.k = backbone, batch, seed, o["k"]
        self.o, self.rounds = o, rounds
        self.steps_per_epoch = math.ceil(n / (batch * self.dist.world))
        self.phases = plan_phases(rounds, o["epochs"], o["round_epochs"], self.steps_per_epoch, o["lr"],
                                  o["round_lr"], o["warmup"])
        net = self.net = PartContrastNet(backbone, o["k"], proj_dim=o["proj_dim"], proj_hidden=o["proj_hidden"],
                                         tau=o["tau"], dino_weight=o["dino_weight"],
                                         dino_out_dim=dino_out_dim).to(dev)
        self.ddp = self.dist.wrap(net)
        params = [p for p in net.parameters() if p.requires_grad]
        # the schedule sets every step's rate: the optimiser's base rate is 1 and the scheduler's factor is the rate
        if o["optimizer"] == "sgd":
            self.opt = torch.optim.SGD(params, lr=1.0, momentum=SGD_MOMENTUM, weight_decay=o["weight_decay"])
        else:
            self.opt = torch.optim.AdamW(params, lr=1.0, weight_decay=o["weight_decay"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_at)
        total = self.steps = self.phases[-1].start + self.phases[-1].steps
        self.config = {"command": "self-train", "objective": "part-contrast", "inputs": list(inputs),
                       **{key: o[key] for key in RESUME_KEYS if key in o}, "weights": weights,
                       "backbone_weights": backbone.weights, "layers": fx.layers, "facet": fx.facet, "family": family,
                       "batch_size": batch, "steps": total, "steps_per_epoch": self.steps_per_epoch,
                       "phases": [asdict(ph) for ph in self.phases], "contrast_features": "last feature map",
                       "contrast_channels": backbone.last_channels, "seed": seed, "world": self.dist.world,
                       "images": n, "images_digest": digest(keys), "cell": fx.cell,
                       "workers": self.workers, "shuffle_buffer": shuffle_buffer,
                       "input_size": fx.input_size, "mean": list(backbone.mean), "std": list(backbone.std),
                       "skipped_samples": skipped, "partkit_version": __version__, "torch": torch.__version__}
        # what training holds between steps: the round's stream (a shuffle buffer), the probe set (the first
        # batch of images and their part maps), the model; never the whole dataset
        self.loader, self.label_round, self.probe, self.probe_set = None, -1, None, None
        self.inertia = float("nan")  # of the last discovery (rank 0)

    # ---- the schedule
    def phase_of(self, step: int) -> Phase:
        for ph in self.phases:
            if step < ph.start + ph.steps:
                return ph
        return self.phases[-1]

    def lr_at(self, step: int) -> float:
        ph = self.phase_of(step)
        return phase_lr(ph, step - ph.start, self.o["min_lr"])

    def momentum_at(self, step: int) -> float:
        """EMA decay: constant for CNNs; for ViTs a cosine from --momentum to --momentum-end over each round."""
        ph = self.phase_of(step)
        return _cosine(self.o["momentum"], self.o["momentum_end"], (step - ph.start) / ph.steps)

    def teacher_temp_at(self, epoch: int) -> float:
        lo, hi = DINO_TEACHER_TEMP
        return lo + (hi - lo) * min(epoch, DINO_TEMP_EPOCHS - 1) / (DINO_TEMP_EPOCHS - 1)

    # ---- the Trainer's hooks
    def resume_options(self, config: dict) -> dict:
        names = {"images_digest": "the list of input images", "k": "-k"}
        return {names.get(key, f"--{key.replace('_', '-')}"): config[key] for key in RESUME_KEYS if key in config}

    def _probe_loss(self) -> float:
        return _probe_loss(self.net, self.probe_set, self.fx, self.seed, self.dev)

    def round_shard(self, r: int) -> str:
        """The part shard of round ``r`` (0-based) in the run folder."""
        return self.run.file(ROUND_SHARD.format(r + 1))

    def discover(self, r: int) -> None:
        """Round ``r``'s part discovery (0-based): rank 0 streams round 1's input images, or round ``r - 1``'s
        shard, through the frozen backbone and k-means into :meth:`round_shard`; the other ranks wait, and stop
        with rank 0's error if it fails (instead of waiting for it forever)."""
        failure = None
        if self.dist.main:
            try:
                self._discover(r)
            except Exception as e:  # told to the other ranks, then raised here
                failure = e
        message = self.dist.share(None if failure is None else str(failure) if isinstance(failure, PartkitError)
                                  else f"part-contrast: rank 0's part discovery failed ({type(failure).__name__}: "
                                       f"{failure})")
        if failure is not None:
            raise failure
        if message is not None:
            raise PartkitError(message)

    def _discover(self, r: int) -> None:
        os.makedirs(self.out, exist_ok=True)
        for stale in glob.glob(os.path.join(self.out, ".parts-round*.tar.tmp-*")):
            os.unlink(stale)  # left by a killed run
        images = _input_images(self.inputs, self.fx, self.bad) if r == 0 else _round_images(self.round_shard(r - 1))
        self.net.eval()
        count, inertia = discovery_pass(self.fx, images, self.round_shard(r), self.k, warm=r > 0, seed=self.seed,
                                        batch_size=self.batch_size, max_iter=self.o["kmeans_iters"])
        self.net.train()
        if count != self.n_images:
            os.unlink(self.round_shard(r))
            raise PartkitError(f"part-contrast: the input changed during the run ({count} images now, "
                               f"{self.n_images} at the scan); rerun on a fixed input")
        self.inertia = inertia

    def open_round(self, r: int) -> None:
        """Stream round ``r``'s shard to training (position 0; a resume seeks on) and load its probe set."""
        if self.loader is not None:
            self.loader.close()
        path = self.round_shard(r)
        if not os.path.isfile(path):
            raise PartkitError(f"--resume: {path!r} is missing (the part maps of round {r + 1}); the run cannot "
                               "continue exactly, start a new --out")
        views = _Views(cell=self.fx.cell, size=self.fx.input_size, mean=self.backbone.mean, std=self.backbone.std,
                       k=self.k)
        stream = SampleStream([path], _round_sample, seed=_seed_word(self.seed, r, _STREAM),
                              buffer=self.o["shuffle_buffer"], rank=self.dist.rank, world=self.dist.world,
                              per_epoch=self.n_images, transform=views)
        self.probe_set = []
        for sample in iter_samples([path]):
            if len(self.probe_set) == self.batch_size:
                break
            self.probe_set.append(_round_sample(sample))
        self.loader = StreamLoader(stream, batch=self.batch_size, workers=self.workers,
                                   item_bytes=stream.item_bytes(self.probe_set[0] if self.probe_set else None))
        self.label_round = r

    def train_step(self, step: int) -> dict:
        net = self.net
        ph = self.phase_of(step)
        r = ph.round - 1
        if r != self.label_round:
            self.discover(r)
            self.open_round(r)
            self.probe = self._probe_loss()
            self.say(f"part-contrast: round {r + 1}/{self.rounds} ({ph.epochs} epochs, lr {ph.lr:g}), {self.k} parts, "
                     f"inertia {self.inertia:.1f}, probe loss {self.probe:.3f}")
        epoch = (step - ph.start) // self.steps_per_epoch  # within the round
        items = self.loader.next_batch()
        x1, x2, l1, l2 = to_device([torch.stack([it[i] for it in items]) for i in range(4)], self.dev)
        l1, l2 = l1.long(), l2.long()
        temp = self.teacher_temp_at(epoch) if net.head is not None else None
        loss, parts, contrast, dino = self.ddp(x1, x2, l1, l2, teacher_temp=temp, update_center=True)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.o["clip_grad"] > 0:  # DINO's clipping: each parameter's gradient norm on its own
            for module in net.student_modules():
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_((self.o["clip_grad"] / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if net.head is not None and epoch < DINO_FREEZE_LAST_EPOCHS:
            for p in net.head.last_layer():
                p.grad = None
        self.opt.step()
        self.sched.step()
        momentum = self.momentum_at(step)
        net.update_target(momentum)
        done = step + 1
        record = {"step": done, "round": ph.round, "loss": float(loss.detach()), "contrast": float(contrast.detach()),
                  "parts": parts, "lr": lr, "momentum": momentum}
        if dino is not None:
            record.update(dino=float(dino.detach()), teacher_temp=temp)
        if done == ph.start + ph.steps:
            # the loss on fixed views at the start and the end of the round (same part maps)
            record["probe"] = [self.probe, self._probe_loss()]
            self.say(f"part-contrast: round {ph.round} done, probe loss {record['probe'][0]:.3f} -> "
                     f"{record['probe'][1]:.3f}")
        return record

    def log_now(self, done: int) -> bool:
        return done % self.log_every == 0 or any(done == ph.start + ph.steps for ph in self.phases)

    def state(self, step: int) -> dict:
        # the round's part maps are its shard in the run folder (round_shard), not part of the checkpoint
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng(), "step": step,
                "round": self.label_round + 1, "probe": self.probe, "config": self.config}

    def checkpoint(self, step: int) -> None:
        state = self.state(step)  # every rank: the RNG states and stream positions are gathered
        loader = self.loader_state()
        if loader is not None:
            state["loader"] = loader
        if not self.dist.main:
            return
        self.run.save({"backbone": _export_state(self.backbone, self.clip_model), "model": self.config["model"],
                       "mean": list(self.backbone.mean), "std": list(self.backbone.std)}, "backbone.pt")
        self.run.save(state)
        # the checkpoint now names its round: older rounds' shards are no longer needed to resume
        keep = ROUND_SHARD.format(self.label_round + 1)
        for path in glob.glob(os.path.join(self.out, "parts-round*.tar")):
            if re.fullmatch(r"parts-round\d+\.tar", os.path.basename(path)) and os.path.basename(path) != keep:
                os.unlink(path)

    def load_state(self, ckpt: dict) -> None:
        self.probe, self.inertia = ckpt["probe"], float("nan")
        if ckpt["round"] > 0:
            self.open_round(ckpt["round"] - 1)  # the restore then seeks its stream to the saved position

    def summary(self, history: list, end: int) -> dict:
        return {"out": self.out, "steps": self.steps, "done": end, "rounds": self.rounds, "k": self.k,
                "phases": [asdict(ph) for ph in self.phases], "losses": history,
                "backbone": self.run.file("backbone.pt")}


def part_contrast(inputs: Sequence[str], out: str, **options) -> dict:
    """Fine-tune a registry backbone with PARTICLE's part discovery + part-contrastive rounds.

    Parts are discovered on the features ``partkit extract`` gives for ``model``/``weights``/
    ``layers``/``facet`` (CNN hypercolumns; ViT keys of the last layer by default), ``k`` per image;
    the contrast pools the backbone's last feature map (``Backbone.forward_last``). Round 1 trains
    ``epochs`` epochs at ``lr``, each later round ``round_epochs`` at ``round_lr`` (``rounds`` in
    all), each with a ``warmup``-epoch linear warm-up then a cosine decay to ``min_lr``. Every option
    left at ``None`` takes its family's value from :data:`FAMILY_DEFAULTS` (the paper's). Writes
    ``backbone.pt`` (load it with ``create_backbone(model, out)``), ``config.json``,
    ``metrics.jsonl``, ``loss.png`` and ``last.pt`` (``resume=True`` continues exactly;
    ``stop_at`` stops early with a checkpoint), and ``parts-round{r}.tar``, the current round's part maps.
    Images are streamed (``workers`` loader processes, a ``shuffle_buffer``), never all held in memory;
    every process of a torchrun job takes its own batch of ``batch_size`` images per step. Options:
    :class:`PartContrastTrainer`'s.
    """
    return PartContrastTrainer(inputs, out, **options).fit()
