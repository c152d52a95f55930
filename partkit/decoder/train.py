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
from ..errors import BadSample, PartkitError
from ..io import iter_samples
from .criterion import SetCriterion
from .data import Example, augment, collate, example_from_sample, targets_from_sample
from .model import DecoderConfig, PartDecoder

__all__ = ["TrainConfig", "train_decoder", "load_examples", "OnlineFeatures", "masks_recall"]


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


def load_examples(inputs: Sequence[str], *, field: str, min_part_area: float, rank: int = 0, world: int = 1,
                  online: Optional[OnlineFeatures] = None, skip_bad: bool = False, class_map=None) -> list:
    """Read this rank's shards into memory as training examples (features kept as float16)."""
    examples, skipped = [], 0
    for sample in iter_samples(inputs, rank=rank, world=world, skip_bad=skip_bad):
        try:
            if online is not None:
                x, meta = online.meta(sample)
                target, ids, classes = targets_from_sample(sample, meta, field=field, min_part_area=min_part_area,
                                                           class_map=class_map)
                ex = Example(sample["__key__"], None, target, ids, classes, meta)
                ex.image = x
            else:
                ex = example_from_sample(sample, field=field, min_part_area=min_part_area, class_map=class_map)
        except BadSample:
            if not skip_bad:
                raise
            skipped += 1
            continue
        ex.sample = {k: v for k, v in sample.items() if k in ("__key__", "gt_parts.png", "gt_objects.json", "json")}
        examples.append(ex)
    if skipped:
        log(f"train-decoder: skipped {skipped} bad samples")
    return examples


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
    from pycocotools import mask as mask_utils

    from ..decoder.data import grid_labels
    from ..metrics import RecallAccumulator, mask_iou

    acc = RecallAccumulator(ks=ks)
    decoder.eval()
    for ex, feat in zip(examples, _features(examples, online)):
        gt_field = field_for_gt if field_for_gt in ex.sample else None
        gt = grid_labels(ex.sample, gt_field, ex.meta) if gt_field else ex.target
        gt_ids = [i for i in np.unique(gt) if i not in (0, 255, 65535)]
        if not gt_ids:
            continue
        out = decoder(feat.float()[None].to(device))
        order = PartDecoder.scores(out["pred_logits"][0]).argsort(descending=True)
        masks = (out["pred_masks"][0][order] > 0).cpu().numpy()
        enc = lambda m: mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))  # noqa: E731
        iou = mask_iou([enc(m) for m in masks], [enc(gt == i) for i in gt_ids])
        acc.update(iou)
    decoder.train()
    return {f"AR@{k}": v for k, v in acc.result().items()} if acc.n_gt_ else {}


def train_decoder(
    inputs: Sequence[str],
    out: str,
    *,
    field: str = "parts.png",
    min_part_area: float = 0.05,
    features: str = "auto",
    model: str = "efficientnet_lite0",
    weights: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    size: int = 224,
    decoder: Optional[dict] = None,
    train: Optional[TrainConfig] = None,
    val: Optional[Sequence[str]] = None,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    skip_bad: bool = False,
) -> dict:
    """Train a class-agnostic part decoder; writes config.json, metrics.jsonl, loss.png, last.pt."""
    tc = train or TrainConfig()
    if features not in ("auto", "cached", "online"):
        raise PartkitError(f"--features must be auto, cached or online; got {features!r}")
    if tc.max_steps < 1 or tc.batch_size < 1:
        raise PartkitError("--max-steps and --batch-size must be at least 1")
    dist = Distributed(resolve_device(device))
    dev = dist.device
    run = RunDir(out, main=dist.main, resume=resume)
    seed_everything(seed + dist.rank)
    first = next(iter(iter_samples(inputs, rank=dist.rank, world=dist.world)), None)
    if first is None:
        raise PartkitError("train-decoder: the input holds no samples")
    if field not in first:
        from ..errors import missing_field

        raise missing_field(first["__key__"], field)
    use_online = features == "online" or (features == "auto" and "feat.npy" not in first)
    online = OnlineFeatures(model, weights, layers, size, dev) if use_online else None
    examples = load_examples(inputs, field=field, min_part_area=min_part_area, rank=dist.rank, world=dist.world,
                             online=online, skip_bad=skip_bad)
    if not examples:
        raise PartkitError("train-decoder: no usable training samples")
    val_examples = (load_examples(val, field=field, min_part_area=min_part_area, online=online)
                    if val and dist.main else [])
    meta = examples[0].meta
    dcfg = DecoderConfig(in_channels=int(meta["channels"]), level_channels=meta.get("level_channels", ()),
                         **(decoder or {}))
    net = PartDecoder(dcfg).to(dev)
    ddp = dist.wrap(net)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps = tc.max_steps if tc.epochs is None else tc.epochs * math.ceil(len(examples) / tc.batch_size)
    sched = cosine_warmup(opt, tc.warmup, steps)
    crit = SetCriterion(dcfg.num_classes, tc.no_part_weight, num_points=tc.num_points).to(dev)
    gen = torch.Generator().manual_seed(seed * 7919 + dist.rank)
    use_amp = tc.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    feature_spec = online.spec if online else {k: meta.get(k) for k in ("model", "weights", "layers", "kind",
                                                                         "stride")}
    config = {"command": "train-decoder", "inputs": list(inputs), "field": field, "min_part_area": min_part_area,
              "features": "online" if online else "cached", "feature_spec": feature_spec,
              "decoder": dcfg.to_dict(), "train": tc.__dict__, "steps": steps, "seed": seed, "world": dist.world,
              "val": list(val) if val else None, "partkit_version": __version__, "torch": torch.__version__}
    start = 0
    if resume:
        ckpt = run.load()
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][dist.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"], gen)
        start = ckpt["step"]
        run.truncate_log(start)
        log(f"train-decoder: resumed at step {start}")
    run.write_config(config)

    def checkpoint(step: int) -> None:
        rng = rng_state(gen)
        if dist.world > 1:
            import torch.distributed as tdist

            gathered = [None] * dist.world
            tdist.all_gather_object(gathered, rng)
            rng = gathered
        run.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "step": step, "rng": rng, "decoder_config": dcfg.to_dict(), "feature_spec": feature_spec,
                  "features": config["features"], "config": config})

    net.train()
    history = []
    t0 = time.perf_counter()
    with progress("train-decoder", total=steps) as bar:
        bar.update(start)
        for step in range(start, min(steps, tc.stop_at or steps)):
            batch = [examples[i] for i in _batch_indices(step, len(examples), tc.batch_size, seed * 31 + dist.rank)]
            feats = _features(batch, online)
            items = [augment(Example(ex.key, f, ex.target, ex.ids, ex.classes, ex.meta), tc.crop_grid, gen)
                     for ex, f in zip(batch, feats)]
            x, targets = collate(items, batch, dev)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                outputs = ddp(x)
            loss, terms = crit(outputs, targets, gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.clip_grad)
            scaler.step(opt)
            scaler.update()
            sched.step()
            bar.update(1)
            done = step + 1
            record = {"step": done, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                      **{f"loss_{k}": v for k, v in terms.items()}}
            history.append(record["loss"])
            if done % tc.log_every == 0 or done == steps:
                run.log(record)
            if val_examples and (done % tc.val_every == 0 or done == steps):
                ar = masks_recall(net, val_examples, online, dev)
                run.log({"step": done, "val": ar})
                log(f"train-decoder: step {done} val " + " ".join(f"{k} {v:.3f}" for k, v in ar.items()))
            if done % tc.checkpoint_every == 0 or done == steps or done == tc.stop_at:
                checkpoint(done)
    run.plot_losses(("loss", "loss_class", "loss_mask", "loss_dice"))
    secs = time.perf_counter() - t0
    final = f"{history[-1]:.3f}" if history else "n/a"
    log(f"train-decoder: {len(history)} steps in {secs:.1f}s, final loss {final} -> {out}")
    dist.close()
    return {"steps": steps, "losses": history, "out": out}
