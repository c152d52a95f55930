"""``partkit train-decoder``: learn a query-based part decoder from part proposals.

>>> train_decoder(["clusters.tar"], "runs/dec", max_steps=200)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .._log import log, progress
from .._runtime import resolve_device, seed_everything
from .._training import Distributed, RunDir, cosine_warmup, rng_state, set_rng_state
from .._version import __version__
from .. import rle
from ..errors import Handler, PartkitError, recorded, stop
from ..fields import IGNORE_IDS, FeatureSource
from ..io import iter_loaded, iter_samples
from .criterion import SetCriterion
from .data import Example, augment, collate, example_from_sample, targets_from_sample
from .model import DecoderConfig, PartDecoder

__all__ = ["TrainConfig", "DecoderTrainer", "train_decoder", "load_examples", "OnlineFeatures", "masks_recall"]


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 4
    max_steps: int = 1000
    epochs: Optional[int] = None
    warmup: int = 50
    clip_grad: float = 1.0
    amp: bool = True
    crop_grid: int = 32
    checkpoint_every: int = 100
    val_every: int = 100
    log_every: int = 10
    num_points: int = 1024
    no_part_weight: float = 0.1
    stop_at: Optional[int] = None  # stop (with a checkpoint) at this step; --resume continues the schedule


class OnlineFeatures:
    """Features recomputed from images each step by a frozen registry backbone."""

    def __init__(self, model: str, weights: Optional[str], layers, size: int, device):
        from ..extract import FeatureExtractor
        from ..models import create_backbone

        self.spec = {"model": model, "weights": weights, "layers": list(layers) if layers else None, "size": size}
        self.fx = FeatureExtractor(create_backbone(model, weights), layers=layers, size=size, device=str(device))
        for p in self.fx.backbone.parameters():
            p.requires_grad_(False)

    def meta(self, sample: dict) -> tuple[torch.Tensor, dict]:
        from ..io import decode_image

        x, geom = self.fx.preprocess(decode_image(sample, self.fx.min_size))
        full = (self.fx.input_size // self.fx.cell,) * 2
        grid = self.fx.valid_grid(geom, full)
        return x, self.fx.meta(geom, sum(self.fx.backbone.channels[i] for i in self.fx.layers), grid)

    @torch.no_grad()
    def features(self, images: torch.Tensor, metas: Sequence[dict]) -> list[torch.Tensor]:
        feats, _ = self.fx.forward(images)
        return [feats[i, :, :m["grid"][0], :m["grid"][1]] for i, m in enumerate(metas)]


def load_examples(inputs: Sequence[str], *, field: Optional[str], min_part_area: float, rank: int = 0, world: int = 1,
                  online: Optional[OnlineFeatures] = None, handler: Handler = stop, class_map=None,
                  source: Optional[FeatureSource] = None) -> list:
    """Read this rank's shards into memory as training examples (features kept as float16).

    Bad samples go to ``handler``; cached features must all come from one model (``source``).
    """
    source = source or FeatureSource("train-decoder")

    def load(sample: dict) -> Example:
        if online is not None:
            x, meta = online.meta(sample)
            target, ids, classes = targets_from_sample(sample, meta, field=field, min_part_area=min_part_area,
                                                       class_map=class_map)
            ex = Example(sample["__key__"], None, target, ids, classes, meta)
            ex.image = x
        else:
            ex = example_from_sample(sample, field=field, min_part_area=min_part_area, class_map=class_map)
            source.check(sample, ex.meta, ex.feat.shape[0])
        ex.sample = {k: v for k, v in sample.items() if k in ("__key__", "gt_parts.png", "gt_objects.json", "json")}
        return ex

    return list(iter_loaded(inputs, load, handler=handler, rank=rank, world=world))


def _features(examples: list, online: Optional[OnlineFeatures]) -> list[torch.Tensor]:
    if online is None:
        return [ex.feat for ex in examples]
    return online.features(torch.stack([ex.image for ex in examples]), [ex.meta for ex in examples])


def _batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Deterministic data position: step -> (epoch, slot) -> indices of a seeded permutation."""
    per_epoch = max(1, math.ceil(n / batch))
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    idx = perm[slot * batch:(slot + 1) * batch]
    return idx + perm[: batch - len(idx)] if len(idx) < batch else idx


@torch.no_grad()
def masks_recall(decoder: PartDecoder, examples: list, online, device, field_for_gt: str = "gt_parts.png",
                 ks=(1, 10, 50, 100)) -> dict:
    """AR@k of the decoder's masks against ground-truth part masks, at mask-feature resolution."""
    from ..decoder.data import grid_labels
    from ..metrics import RecallAccumulator, mask_iou

    acc = RecallAccumulator(ks=ks)
    decoder.eval()
    for ex, feat in zip(examples, _features(examples, online)):
        gt_field = field_for_gt if field_for_gt in ex.sample else None
        gt = grid_labels(ex.sample, gt_field, ex.meta) if gt_field else ex.target
        gt_ids = [i for i in np.unique(gt) if i != 0 and i not in IGNORE_IDS.values()]
        if not gt_ids:
            continue
        out = decoder(feat.float()[None].to(device))
        order = PartDecoder.scores(out["pred_logits"][0]).argsort(descending=True)
        masks = (out["pred_masks"][0][order] > 0).cpu().numpy()
        iou = mask_iou([rle.encode(m) for m in masks], [rle.encode(gt == i) for i in gt_ids])
        acc.update(iou)
    decoder.train()
    return {f"AR@{k}": v for k, v in acc.result().items()} if acc.n_gt_ else {}


class DecoderTrainer:
    """The training loop behind ``train-decoder``; ``self-train`` overrides ``step_loss`` and the state hooks.

    Handles DDP, the run folder, exact resume (model, optimizer, scheduler, RNG, data position),
    periodic validation, logging and the loss curve.
    """

    command = "train-decoder"

    def __init__(self, inputs: Sequence[str], out: str, *, field: Optional[str] = "parts.png",
                 min_part_area: float = 0.05, features: str = "auto", model: str = "efficientnet_lite0",
                 weights: Optional[str] = None, layers: Optional[Sequence[int]] = None, size: int = 224,
                 decoder: Optional[dict] = None, train: Optional[TrainConfig] = None,
                 val: Optional[Sequence[str]] = None, resume: bool = False, device: str = "auto", seed: int = 0,
                 handler: Handler = stop, online: Optional[OnlineFeatures] = None):
        tc = self.tc = train or TrainConfig()
        if features not in ("auto", "cached", "online"):
            raise PartkitError(f"--features must be auto, cached or online; got {features!r}")
        if tc.max_steps < 1 or tc.batch_size < 1:
            raise PartkitError("--max-steps and --batch-size must be at least 1")
        self.inputs, self.out, self.field, self.seed, self.resume = list(inputs), out, field, seed, resume
        self.min_part_area = min_part_area
        self.dist = Distributed(resolve_device(device))
        self.dev = self.dist.device
        self.run = RunDir(out, main=self.dist.main, resume=resume)
        seed_everything(seed + self.dist.rank)
        first = next(iter(iter_samples(inputs, rank=self.dist.rank, world=self.dist.world)), None)
        if first is None:
            raise PartkitError(f"{self.command}: the input holds no samples")
        if field is not None and field not in first:
            from ..errors import missing_field

            raise missing_field(first["__key__"], field)
        if online is None and (features == "online" or (features == "auto" and "feat.npy" not in first)):
            online = OnlineFeatures(model, weights, layers, size, self.dev)
        elif online is None and (weights is not None or layers is not None):
            raise PartkitError("--weights and --layers choose the backbone of --features online, but these inputs "
                               "are trained on their cached feat.npy; drop them or pass --features online")
        self.online = online
        self.skipped: list = []
        same = FeatureSource(self.command)
        self.examples = load_examples(inputs, field=field, min_part_area=min_part_area, rank=self.dist.rank,
                                      world=self.dist.world, online=online, handler=recorded(handler, self.skipped),
                                      source=same)
        if self.skipped:
            log(f"skipped {len(self.skipped)} bad training samples")
        if not self.examples:
            raise PartkitError(f"{self.command}: no usable training samples")
        gt = "gt_parts.png" if val and "gt_parts.png" in first else field
        self.val_examples = (load_examples(val, field=gt, min_part_area=0.0, online=online, source=same)
                             if val and self.dist.main else [])
        meta = self.examples[0].meta
        self.dcfg = DecoderConfig(in_channels=int(meta["channels"]), level_channels=meta.get("level_channels", ()),
                                  **(decoder or {}))
        self.net = self.make_net().to(self.dev)
        self.ddp = self.dist.wrap(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.steps = self.total_steps()
        self.sched = cosine_warmup(self.opt, tc.warmup, self.steps)
        self.crit = SetCriterion(self.dcfg.num_classes, tc.no_part_weight, num_points=tc.num_points).to(self.dev)
        self.gen = torch.Generator().manual_seed(seed * 7919 + self.dist.rank)
        self.use_amp = tc.amp and self.dev.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.feature_spec = online.spec if online else {k: meta.get(k) for k in ("model", "weights", "layers",
                                                                                  "kind", "stride")}
        self.config = {"command": self.command, "inputs": self.inputs, "field": field, "min_part_area": min_part_area,
                       "features": "online" if online else "cached", "feature_spec": self.feature_spec,
                       "decoder": self.dcfg.to_dict(), "train": dict(tc.__dict__), "steps": self.steps, "seed": seed,
                       "world": self.dist.world, "val": list(val) if val else None,
                       "skipped_samples": self.skipped,
                       "partkit_version": __version__, "torch": torch.__version__}

    # ---- hooks for subclasses
    def make_net(self) -> PartDecoder:
        return PartDecoder(self.dcfg)

    def total_steps(self) -> int:
        tc = self.tc
        return tc.max_steps if tc.epochs is None else tc.epochs * math.ceil(len(self.examples) / tc.batch_size)

    def batch(self, step: int) -> list:
        n, b = len(self.examples), self.tc.batch_size
        return [self.examples[i] for i in _batch_indices(step, n, b, self.seed * 31 + self.dist.rank)]

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        batch = self.batch(step)
        feats = _features(batch, self.online)
        items = [augment(Example(ex.key, f, ex.target, ex.ids, ex.classes, ex.meta), self.tc.crop_grid, self.gen)
                 for ex, f in zip(batch, feats)]
        x, targets = collate(items, batch, self.dev)
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = self.ddp(x)
        return self.crit(outputs, targets, self.gen)

    def after_step(self, done: int) -> None:
        pass

    def validate(self, done: int) -> dict:
        return masks_recall(self.net, self.val_examples, self.online, self.dev)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, ckpt: dict) -> None:
        pass

    # ---- the loop
    def checkpoint(self, step: int) -> None:
        rng = rng_state(self.gen)
        if self.dist.world > 1:
            import torch.distributed as tdist

            gathered = [None] * self.dist.world
            tdist.all_gather_object(gathered, rng)
            rng = gathered
        self.run.save({"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                       "scheduler": self.sched.state_dict(), "step": step, "rng": rng,
                       "decoder_config": self.dcfg.to_dict(), "feature_spec": self.feature_spec,
                       "features": self.config["features"], "config": self.config, **self.extra_state()})

    def restore(self) -> int:
        ckpt = self.run.load()
        self.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        set_rng_state(rng[self.dist.rank] if isinstance(rng, list) else rng, self.gen)
        self.load_extra_state(ckpt)
        self.run.truncate_log(ckpt["step"])
        log(f"{self.command}: resumed at step {ckpt['step']}")
        return ckpt["step"]

    def fit(self) -> dict:
        tc, steps = self.tc, self.steps
        start = self.restore() if self.resume else 0
        self.run.write_config(self.config)
        self.net.train()
        history = []
        t0 = time.perf_counter()
        with progress(self.command, total=steps) as bar:
            bar.update(start)
            for step in range(start, min(steps, tc.stop_at or steps)):
                loss, terms = self.step_loss(step)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if tc.clip_grad > 0:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), tc.clip_grad)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.sched.step()
                done = step + 1
                self.after_step(done)
                bar.update(1)
                record = {"step": done, "loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0],
                          **{f"loss_{k}": v for k, v in terms.items()}}
                history.append(record["loss"])
                if done % tc.log_every == 0 or done == steps:
                    self.run.log(record)
                if self.val_examples and (done % tc.val_every == 0 or done == steps):
                    val = self.validate(done)
                    self.run.log({"step": done, "val": val})
                    log(f"{self.command}: step {done} val " + " ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()))
                if done % tc.checkpoint_every == 0 or done == steps or done == tc.stop_at:
                    self.checkpoint(done)
        self.run.plot_losses(("loss", "loss_class", "loss_mask", "loss_dice"))
        final = f"{history[-1]:.3f}" if history else "n/a"
        log(f"{self.command}: {len(history)} steps in {time.perf_counter() - t0:.1f}s, final loss {final} -> {self.out}")
        self.dist.close()
        return {"steps": steps, "losses": history, "out": self.out}


def train_decoder(inputs: Sequence[str], out: str, **kwargs) -> dict:
    """Train a class-agnostic part decoder; writes config.json, metrics.jsonl, loss.png, last.pt.

    Keyword arguments are those of :class:`DecoderTrainer` (field, features, decoder, train, val, resume, ...).
    """
    return DecoderTrainer(inputs, out, **kwargs).fit()
