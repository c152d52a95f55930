"""``self-train --objective part-contrast``: PARTICLE's part-contrastive fine-tuning of a backbone.

Each round clusters every image's dense features into parts (per-image k-means, warm-started from
the previous round's centroids so part ids keep their meaning), then fine-tunes the backbone so
that a part's pooled features agree across two augmented views of its image and differ from the
other parts of the image and of the batch (Saha & Maji, "PARTICLE: Part Discovery and Contrastive
Learning for Fine-grained Recognition", 2023; the loss is DetCon's, Henaff et al. 2021).

>>> part_contrast(["cihp.tar"], "runs/pc", rounds=2, steps_per_round=500)  # doctest: +SKIP
>>> create_backbone("efficientnet_lite0", "runs/pc")  # doctest: +SKIP  (the fine-tuned weights)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fields
from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import Handler, PartkitError, recorded, stop
from .extract import FeatureExtractor, hypercolumn
from .io import iter_loaded
from .training import Trainer, check_count, check_rate, cosine_warmup, digest, stream_batch_indices

__all__ = ["part_contrast", "PartContrastTrainer", "part_contrast_loss", "mask_pool", "part_masks", "PartContrastNet", "make_views",
           "discover_parts", "DEFAULT_K"]

DEFAULT_K = {"cnn": 25, "vit": 6}  # PARTICLE: 25 parts for hypercolumns, 5-7 for ViT keys
MIN_PART_CELLS = 0.5  # a part counts as present in a view from half a feature cell on
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (BYOL / PARTICLE)
# (blur, solarize) probability of the first and second view: BYOL's asymmetric pair
VIEW_PROBS = ((1.0, 0.0), (0.1, 0.2))
_PROBE = 0x9E3779B9  # generator word of the fixed probe views
# options that must match to --resume a run (the rest, e.g. stop_at or log_every, may change)
RESUME_KEYS = ("model", "weights", "layers", "facet", "rounds", "k", "steps_per_round", "batch_size", "lr",
                "weight_decay", "warmup", "size", "momentum", "tau", "proj_dim", "proj_hidden", "seed", "images_digest")


# --------------------------------------------------------------------------------------------
# Loss and model


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


def part_masks(labels: torch.Tensor, k: int, cell: int) -> torch.Tensor:
    """``B x S x S`` part ids -> ``B x k x S/cell x S/cell`` soft masks (fraction of each cell)."""
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, cell) if cell > 1 else onehot


def mask_pool(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PARTICLE's Eq. 1: the average of ``B x C x h x w`` features under each of ``B x K x h x w`` masks."""
    area = masks.sum((2, 3)).clamp_min(1e-6)
    return torch.einsum("bkhw,bchw->bkc", masks, feats) / area[..., None]


class MLP(nn.Sequential):
    """Linear-LayerNorm-ReLU-Linear, the projector/predictor of PARTICLE's code (batch-independent)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out, bias=False))


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # small batches: keep the pretrained running statistics


class PartContrastNet(nn.Module):
    """Online backbone + projector + predictor, and the momentum (EMA) copy of backbone + projector.

    ``forward(x1, x2, m1, m2)`` takes two batches of views and their ``B x K x h x w`` part masks
    and returns ``(loss, number of parts present in both views)``.
    """

    def __init__(self, fx: FeatureExtractor, channels: int, *, proj_dim: int = 256, proj_hidden: int = 4096,
                 tau: float = 0.1):
        super().__init__()
        self.layers, self.facet, self.normalize = fx.layers, fx.facet, fx.normalized
        self.grid_size = fx.grid_size
        self.tau = tau
        self.backbone = fx.backbone
        self.projector = MLP(channels, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                     "projector": copy.deepcopy(self.projector)})
        for p in self.target.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        _freeze_batchnorm(self)
        return self

    def dense(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The features ``extract`` writes (hypercolumn or ViT facet), with gradients."""
        if backbone.family == "cnn":
            x = x.contiguous(memory_format=torch.channels_last)
        maps, _ = backbone.forward_features(x, self.layers, facet=self.facet)
        return hypercolumn(maps, self.grid_size(x), self.normalize)

    def forward(self, x1, x2, m1, m2):
        both = (m1.sum((2, 3)) >= MIN_PART_CELLS) & (m2.sum((2, 3)) >= MIN_PART_CELLS)  # B x K
        sel = torch.cat([both, both])
        x, m = torch.cat([x1, x2]), torch.cat([m1, m2])
        f = mask_pool(self.dense(self.backbone, x), m)
        n = int(both.sum())
        if n == 0:
            return f.sum() * 0.0, 0  # no part survives both crops: a zero loss that keeps the graph
        q = self.predictor(self.projector(f[sel]))
        with torch.no_grad():
            t = self.target["projector"](mask_pool(self.dense(self.target["backbone"], x), m)[sel])
        return part_contrast_loss(q[:n], t[:n], q[n:], t[n:], self.tau), n

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- momentum * target + (1 - momentum) * online (backbone and projector)."""
        for name in ("backbone", "projector"):
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


def make_views(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], *, cell: int, size: int,
               mean, std, gen: torch.Generator):
    """Two augmented views of each image: ``(x1, x2, labels1, labels2)``, images normalised.

    ``images`` are ``3 x h x w`` uint8 tensors, ``labels`` their part-id grids (one id per feature
    cell of ``cell`` pixels). Both views crop image and part map consistently (scale 0.08-1) and
    flip them together; colour jitter (p 0.8), grayscale (p 0.2), blur (p 1.0 / 0.1) and
    solarize (p 0 / 0.2) follow BYOL, as PARTICLE. All randomness comes from ``gen``.
    """
    out = []
    for blur_p, solarize_p in VIEW_PROBS:
        views = [_view(im, lab, cell, size, gen, blur_p, solarize_p) for im, lab in zip(images, labels)]
        x = torch.stack([v[0] for v in views])
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        out.append(((x - m) / s, torch.stack([v[1] for v in views])))
    (x1, l1), (x2, l2) = out
    return x1, x2, l1, l2


# --------------------------------------------------------------------------------------------
# Data and part discovery


@dataclass
class _Image:
    key: str
    rgb: np.ndarray  # h x w x 3 uint8, already resized so the longer side is ``size``
    tensor: torch.Tensor  # the same as 3 x h x w uint8 on the training device
    grid: tuple[int, int]  # valid feature cells


def _load_images(inputs: Sequence[str], fx: FeatureExtractor, device, handler: Handler) -> tuple[list, list]:
    """Every image of the input, resized as ``extract`` would, kept in memory: ``(images, skipped)``."""
    def load(sample: dict) -> _Image:
        x, geom = fx.preprocess(fields.image(sample, min_size=fx.min_size))
        rh, rw = geom["resized"]
        # undo the normalisation: the exact resized uint8 pixels (preprocess maps them back bit for bit)
        rgb = ((x[:, :rh, :rw] * fx.std + fx.mean) * 255).round_().clamp_(0, 255).to(torch.uint8)
        grid = fx.valid_grid(geom, (fx.input_size // fx.cell,) * 2)
        return _Image(sample["__key__"], rgb.permute(1, 2, 0).numpy().copy(), rgb.to(device), grid)

    skipped: list = []
    images = list(iter_loaded(inputs, load, handler=recorded(handler, skipped)))
    return images, skipped


def discover_parts(fx: FeatureExtractor, images: Sequence[_Image], k: int, *, init=None, seed: int = 0,
                   batch_size: int = 16):
    """Per-image k-means (cosine) of the current features: ``(centroids, part-id grids, total inertia)``.

    ``init`` (per-image centroids of the previous round) warm-starts k-means so ids keep their
    meaning across rounds; otherwise k-means++ with seed ``(seed, i)`` for image i.
    """
    from .kmeans import batched_kmeans

    problems = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        with torch.inference_mode():
            feats, _ = fx.forward(torch.stack([fx.preprocess(im.rgb)[0] for im in chunk]))
        for im, f in zip(chunk, feats):
            gh, gw = im.grid
            problems.append(f[:, :gh, :gw].reshape(f.shape[0], -1).T.cpu().numpy())
    results = batched_kmeans(problems, k, metric="cosine", init="k-means++" if init is None else list(init),
                             random_state=seed, device=fx.device)
    labels = [torch.from_numpy(r.labels.reshape(im.grid)).to(im.tensor.device) for r, im in zip(results, images)]
    return [r.centers for r in results], labels, float(sum(r.inertia for r in results))


def _generator(*words: int) -> torch.Generator:
    # every step's randomness derives from (seed, rank, step), so a resumed run draws the same views
    state = np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@torch.no_grad()
def _probe_loss(net: PartContrastNet, images: list, labels: list, fx: FeatureExtractor, k: int, batch_size: int,
                seed: int) -> float:
    """The loss on one fixed batch of views: unlike the training loss, comparable from step to step."""
    idx = list(range(min(batch_size, len(images))))
    x1, x2, l1, l2 = make_views([images[i].tensor for i in idx], [labels[i] for i in idx], cell=fx.cell,
                                size=fx.input_size, mean=fx.backbone.mean, std=fx.backbone.std,
                                gen=_generator(seed, _PROBE))
    return float(net(x1, x2, part_masks(l1, k, fx.cell), part_masks(l2, k, fx.cell))[0])


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


class PartContrastTrainer(Trainer):
    """PARTICLE's rounds on :class:`partkit.training.Trainer`: a step re-discovers the parts when a round
    starts, then takes one SGD step on the part-contrastive loss and moves the momentum encoder.

    The options are :func:`part_contrast`'s; ``fit()`` runs it.
    """

    command = "part-contrast"

    def __init__(self, inputs: Sequence[str], out: str, *, model: str = "efficientnet_lite0",
                 weights: Optional[str] = None, layers: Optional[Sequence[int]] = None, facet: Optional[str] = None,
                 rounds: int = 2, k: Optional[int] = None, steps_per_round: int = 500, batch_size: int = 16,
                 lr: float = 0.005, weight_decay: float = 1.5e-6, warmup: Optional[int] = None, size: int = 224,
                 momentum: float = 0.996, tau: float = 0.1, proj_dim: int = 256, proj_hidden: int = 4096,
                 device: str = "auto", seed: int = 0, resume: bool = False, stop_at: Optional[int] = None,
                 log_every: int = 10, checkpoint_every: int = 100, handler: Handler = stop, log: str = "jsonl"):
        for option, value in (("--rounds", rounds), ("--max-steps", steps_per_round), ("--batch-size", batch_size),
                              ("--size", size), ("--proj-dim", proj_dim), ("--proj-hidden", proj_hidden)):
            check_count(option, value)
        check_count("-k", k, 2, fix="pass at least 2 parts per image, e.g. -k 8")
        check_count("--warmup", warmup, 0)
        check_rate("--lr", lr, fix="pass a learning rate such as --lr 0.005")
        check_rate("--weight-decay", weight_decay, strict=False, fix="pass e.g. --weight-decay 1.5e-6")
        check_rate("--momentum", momentum, high=1.0, strict=False,
                   fix="pass the EMA decay of the momentum encoder, e.g. --momentum 0.996")
        check_rate("--tau", tau, fix="pass a temperature such as --tau 0.1")
        from .models import get_spec

        if get_spec(model).family == "pixels":
            raise PartkitError(f"{model!r} has no weights to fine-tune; pick a CNN or ViT backbone (see `partkit models`)")
        self.setup_run(out, device=resolve_device(device), resume=resume, stop_at=stop_at, log_every=log_every,
                       checkpoint_every=checkpoint_every, log_to=log)
        dev = self.dev
        seed_everything(seed)
        backbone, self.clip_model = _build(model, weights)
        fx = self.fx = FeatureExtractor(backbone, layers=layers, facet=facet, size=size, device=str(dev))
        k = self.k = k if k is not None else DEFAULT_K[backbone.family]
        images, skipped = _load_images(inputs, fx, dev, handler)
        if skipped:
            self.say(f"part-contrast: skipped {len(skipped)} bad samples")
        if not images:
            raise PartkitError("part-contrast: the input holds no images; pack some with `partkit pack`")
        if batch_size > len(images):
            self.say(f"part-contrast: --batch-size {batch_size} is more than the {len(images)} images; "
                     f"using {len(images)}")
            batch_size = len(images)
        self.backbone, self.images, self.batch_size, self.seed = backbone, images, batch_size, seed
        self.rounds, self.steps_per_round, self.momentum = rounds, steps_per_round, momentum
        channels = sum(backbone.channels[i] for i in fx.layers)
        net = self.net = PartContrastNet(fx, channels, proj_dim=proj_dim, proj_hidden=proj_hidden, tau=tau).to(dev)
        self.ddp = self.dist.wrap(net)
        params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        total = self.steps = rounds * steps_per_round
        warmup = warmup if warmup is not None else total // 20
        self.sched = cosine_warmup(self.opt, warmup, total)
        self.config = {"command": "self-train", "objective": "part-contrast", "inputs": list(inputs), "model": model,
                       "weights": weights, "backbone_weights": backbone.weights, "layers": fx.layers,
                       "facet": fx.facet, "rounds": rounds, "k": k, "steps_per_round": steps_per_round,
                       "steps": total, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                       "warmup": warmup, "size": size, "momentum": momentum, "tau": tau, "proj_dim": proj_dim,
                       "proj_hidden": proj_hidden, "seed": seed, "world": self.dist.world, "images": len(images),
                       "images_digest": digest([im.key for im in images]), "cell": fx.cell,
                       "input_size": fx.input_size, "mean": list(backbone.mean), "std": list(backbone.std),
                       "skipped_samples": skipped, "partkit_version": __version__, "torch": torch.__version__}
        self.centers, self.labels, self.label_round, self.probe = None, None, -1, None

    # ---- the Trainer's hooks
    def resume_options(self, config: dict) -> dict:
        names = {"images_digest": "the list of input images", "steps_per_round": "--max-steps"}
        return {names.get(key, f"--{key.replace('_', '-')}"): config[key] for key in RESUME_KEYS if key in config}

    def _probe_loss(self) -> float:
        return _probe_loss(self.net, self.images, self.labels, self.fx, self.k, self.batch_size, self.seed)

    def train_step(self, step: int) -> dict:
        fx, net, images, k = self.fx, self.net, self.images, self.k
        r = step // self.steps_per_round
        if r != self.label_round:
            net.eval()
            self.centers, self.labels, inertia = discover_parts(fx, images, k, init=self.centers, seed=self.seed,
                                                                batch_size=self.batch_size)
            net.train()
            self.label_round = r
            self.probe = self._probe_loss()
            self.say(f"part-contrast: round {r + 1}/{self.rounds}, {k} parts, inertia {inertia:.1f}, "
                     f"probe loss {self.probe:.3f}")
        idx = stream_batch_indices(step, len(images), self.batch_size, self.dist.rank, self.dist.world, self.seed)
        x1, x2, l1, l2 = make_views([images[i].tensor for i in idx], [self.labels[i] for i in idx], cell=fx.cell,
                                    size=fx.input_size, mean=self.backbone.mean, std=self.backbone.std,
                                    gen=_generator(self.seed, self.dist.rank, step))
        loss, parts = self.ddp(x1, x2, part_masks(l1, k, fx.cell), part_masks(l2, k, fx.cell))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        net.update_target(self.momentum)
        done = step + 1
        record = {"step": done, "round": r + 1, "loss": float(loss.detach()), "parts": parts,
                  "lr": self.sched.get_last_lr()[0]}
        if done % self.steps_per_round == 0:
            # the loss on fixed views at the start and the end of the round (same part maps)
            record["probe"] = [self.probe, self._probe_loss()]
            self.say(f"part-contrast: round {r + 1} done, probe loss {record['probe'][0]:.3f} -> "
                     f"{record['probe'][1]:.3f}")
        return record

    def log_now(self, done: int) -> bool:
        return done % self.log_every == 0 or done % self.steps_per_round == 0

    def state(self, step: int) -> dict:
        labels = self.labels
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng(), "step": step,
                "round": self.label_round + 1, "centroids": self.centers,
                "labels": [lab.cpu() for lab in labels] if labels is not None else None, "probe": self.probe,
                "config": self.config}

    def checkpoint(self, step: int) -> None:
        state = self.state(step)  # every rank: the RNG states are gathered
        if not self.dist.main:
            return
        self.run.save({"backbone": _export_state(self.backbone, self.clip_model), "model": self.config["model"],
                       "mean": list(self.backbone.mean), "std": list(self.backbone.std)}, "backbone.pt")
        self.run.save(state)

    def load_state(self, ckpt: dict) -> None:
        self.centers, self.label_round, self.probe = ckpt["centroids"], ckpt["round"] - 1, ckpt["probe"]
        self.labels = [lab.to(self.dev) for lab in ckpt["labels"]] if ckpt["labels"] is not None else None

    def summary(self, history: list, end: int) -> dict:
        return {"out": self.out, "steps": self.steps, "done": end, "rounds": self.rounds, "k": self.k,
                "losses": history, "backbone": self.run.file("backbone.pt")}


def part_contrast(inputs: Sequence[str], out: str, **options) -> dict:
    """Fine-tune a registry backbone with PARTICLE's part discovery + part-contrastive rounds.

    The features are those ``partkit extract`` gives for ``model``/``weights``/``layers``/``facet``
    (CNN hypercolumns, ViT patch tokens or another facet), images resized to ``size`` for part
    discovery. ``k`` parts per image (default 25 for CNN hypercolumns, 6 for ViTs); ``rounds`` x
    ``steps_per_round`` SGD steps (momentum 0.9, PARTICLE's ``lr`` and ``weight_decay``, linear
    ``warmup`` (default 5% of the steps) then cosine decay); views are ``size`` x ``size``;
    ``momentum`` is the EMA decay of the target encoder, ``tau`` the temperature. Writes
    ``backbone.pt`` (load it with ``create_backbone(model, out)``), ``config.json``,
    ``metrics.jsonl``, ``loss.png`` and ``last.pt`` (``resume=True`` continues exactly;
    ``stop_at`` stops early with a checkpoint). Every process of a torchrun job holds all images
    and takes its own slice of each batch. Options: :class:`PartContrastTrainer`'s.
    """
    return PartContrastTrainer(inputs, out, **options).fit()
