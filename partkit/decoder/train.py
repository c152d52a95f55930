"""``partkit train-decoder``: learn a query-based part decoder from part proposals.

>>> train_decoder(["clusters.tar"], "runs/dec", max_steps=200)  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import rle
from .._log import log
from .._runtime import resolve_device, seed_everything
from .._version import __version__
from ..errors import Handler, PartkitError, recorded, stop
from ..fields import IGNORE_IDS, SALIENCY_THRESHOLD, FeatureSource, check_object_source
from ..io import iter_samples
from ..streaming import default_workers
from ..training import Distributed, Trainer, check_count, check_rate, cosine_warmup, to_device
from .criterion import SetCriterion
from .data import Example, assign_classes, class_list, training_view
from .features import ExampleStream, OnlineFeatures, batch_features, example_loader, load_examples
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
    log: str = "jsonl"  # --log: jsonl (metrics.jsonl) or tensorboard (also event files)
    workers: Optional[int] = None  # DataLoader processes decoding the stream (None: streaming.default_workers)
    shuffle_buffer: int = 256  # samples per shuffle buffer (per worker): the memory bound of the stream

    # options that may change when a run is resumed (the others define it)
    VOLATILE = ("stop_at", "checkpoint_every", "val_every", "log_every", "log", "workers")

    def validate(self) -> "TrainConfig":
        """One-line errors for options no run can use (zero counts, non-finite rates)."""
        for option, value in (("--batch-size", self.batch_size), ("--max-steps", self.max_steps),
                              ("--epochs", self.epochs), ("--crop-grid", self.crop_grid),
                              ("--checkpoint-every", self.checkpoint_every), ("--val-every", self.val_every),
                              ("--log-every", self.log_every), ("--num-points", self.num_points),
                              ("--shuffle-buffer", self.shuffle_buffer)):
            check_count(option, value)
        check_count("--warmup", self.warmup, 0)
        check_count("--workers", self.workers, 0, fix="pass --workers 0 to decode in the training process")
        check_count("--stop-at", self.stop_at, fix="pass the step to checkpoint and stop at, or drop --stop-at")
        check_rate("--lr", self.lr, fix="pass a learning rate such as --lr 1e-4")
        check_rate("--weight-decay", self.weight_decay, strict=False, fix="pass e.g. --weight-decay 0.05")
        check_rate("--clip-grad", self.clip_grad, strict=False, fix="pass a gradient norm, or 0 to turn clipping off")
        check_rate("--no-part-weight", self.no_part_weight, strict=False)
        return self


def full_precision(outputs):
    """The decoder's outputs as float32 (the losses and the matching stay out of autocast's float16)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: full_precision(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(full_precision(v) for v in outputs)
    return outputs


@torch.no_grad()
def masks_recall(decoder: PartDecoder, examples: list, online, device, field_for_gt: str = "gt_parts.png",
                 ks=(1, 10, 50, 100, 200)) -> dict:
    """AR@k of the decoder's masks against ground-truth part masks, at mask-feature resolution."""
    from ..decoder.data import grid_labels
    from ..metrics import RecallAccumulator, mask_iou

    acc = RecallAccumulator(ks=ks)
    decoder.eval()
    for ex, feat in zip(examples, batch_features(examples, online)):
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


class DecoderTrainer(Trainer):
    """The decoder's model and step on :class:`partkit.training.Trainer`; ``self-train`` overrides ``step_loss``
    and the state hooks.

    Periodic validation (AR@k on ``val``) and the loss terms are the decoder's; run folder, exact
    resume, DDP, ``stop_at`` and logging are the base's.
    """

    command = "train-decoder"
    loss_keys = ("loss", "loss_class", "loss_mask", "loss_dice")
    # config options (flattened) that may change on --resume; every other one must match the run's
    OPTION_NAMES = {"num_queries": "--queries", "num_layers": "--dec-layers", "hidden_dim": "--hidden",
                    "in_channels": "the input features' channels", "level_channels": "the input features' levels",
                    "feature_spec": "the features (feat.json / --model, --weights, --layers, --size)",
                    "classes": "the class list (targets.json classes / json part_names)",
                    "num_classes": "the number of classes", "class_aware": "--class-aware/--class-agnostic",
                    "world": "the number of processes (torchrun)"}

    def __init__(self, inputs: Sequence[str], out: str, *, field: Optional[str] = "parts.png",
                 min_part_area: float = 0.05, features: str = "auto", model: str = "efficientnet_lite0",
                 weights: Optional[str] = None, layers: Optional[Sequence[int]] = None, size: int = 224,
                 decoder: Optional[dict] = None, train: Optional[TrainConfig] = None,
                 val: Optional[Sequence[str]] = None, resume: bool = False, device: str = "auto", seed: int = 0,
                 handler: Handler = stop, online: Optional[OnlineFeatures] = None,
                 class_aware: Optional[bool] = None, objects_from: Optional[str] = None,
                 fg_threshold: float = SALIENCY_THRESHOLD):
        tc = self.tc = (train or TrainConfig()).validate()
        if features not in ("auto", "cached", "online"):
            raise PartkitError(f"--features must be auto, cached or online; got {features!r}")
        check_count("--size", size)
        check_object_source(objects_from)
        check_rate("--fg-threshold", fg_threshold, strict=False, fix="pass a saliency threshold, e.g. 0.065")
        self.objects_from, self.fg_threshold = objects_from, fg_threshold
        DecoderConfig(in_channels=1, **(decoder or {})).validate()
        self.inputs, self.field, self.seed, self.class_aware = list(inputs), field, seed, class_aware
        self.min_part_area = min_part_area
        self.setup_run(out, device=resolve_device(device), resume=resume, stop_at=tc.stop_at,
                       log_every=tc.log_every, checkpoint_every=tc.checkpoint_every, log_to=tc.log)
        seed_everything(seed + self.dist.rank)
        first = next(iter(iter_samples(inputs)), None)  # every rank streams every shard (its share of samples)
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
        on_bad = recorded(handler, self.skipped)
        self.label_index: Optional[dict] = None  # label id -> class index, once the class list is known
        load = example_loader(field=field, min_part_area=min_part_area, online=online, source=same,
                              prepare=self.prepare_example, objects=objects_from, fg_threshold=fg_threshold)
        self.data = ExampleStream(inputs, load, handler=on_bad, seed=seed, batch=tc.batch_size, rank=self.dist.rank,
                                  world=self.dist.world, workers=default_workers(tc.workers, self.dev),
                                  buffer=tc.shuffle_buffer, transform=self.stream_transform())
        self.loader = self.data.loader
        classes = self.resolve_classes(on_bad)
        if self.skipped and self.dist.main:
            log(f"skipped {len(self.skipped)} bad training samples")
        if self.data.first is None or self.data.count == 0:
            raise PartkitError(f"{self.command}: no usable training samples")
        gt = "gt_parts.png" if val and "gt_parts.png" in first else field
        self.val_examples = (load_examples(val, field=gt, min_part_area=0.0, online=online, source=same)
                             if val and self.dist.main else [])
        meta = self.data.first.meta
        dec = {**(decoder or {}), "classes": classes, "num_classes": len(classes) if classes else 1}
        self.dcfg = DecoderConfig(in_channels=int(meta["channels"]), level_channels=meta.get("level_channels", ()),
                                  **dec)
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
                       "class_aware": class_aware, "objects_from": objects_from, "fg_threshold": fg_threshold,
                       "decoder": self.dcfg.to_dict(), "train": dict(tc.__dict__), "steps": self.steps, "seed": seed,
                       "world": self.dist.world, "val": list(val) if val else None,
                       "skipped_samples": self.skipped,
                       "partkit_version": __version__, "torch": torch.__version__}

    # ---- hooks for subclasses
    def prepare_example(self, ex: Example) -> Example:
        """An example as training uses it (runs in the loader's workers): its class indices once the class
        list is known; a subclass may raise BadSample."""
        if self.label_index is not None:
            ex.classes = np.asarray([self.label_index[int(i)] for i in ex.ids], np.int64)
        return ex

    def resolve_classes(self, on_bad) -> Optional[list]:
        """The decoder's classes (``[[label id, name], ...]``, None = class-agnostic), pooled over the scan of
        the training label maps (the same on every rank: each scans every shard); a sample with an id
        outside the list is a bad sample, left out of the stream."""
        scanned, self.data.scanned = self.data.scanned, []
        classes = class_list(scanned, self.field, self.class_aware)
        if classes:
            kept = {r.key for r in assign_classes(scanned, classes, self.field, on_bad)}
            self.data.drop([r.key for r in scanned if r.key not in kept])
            self.label_index = {int(i): c for c, (i, _) in enumerate(classes)}
            log(f"{self.command}: class-aware, {len(classes)} classes + no-part from '{self.field}'")
        return classes

    def make_net(self) -> PartDecoder:
        return PartDecoder(self.dcfg)

    def total_steps(self) -> int:
        tc = self.tc
        # an epoch: every sample once over all ranks; the same count on every rank, so none waits for another
        per_step = tc.batch_size * self.dist.world
        return tc.max_steps if tc.epochs is None else tc.epochs * math.ceil(self.data.count / per_step)

    def batch(self, step: int) -> list:
        """This rank's next batch of the stream (steps are taken in order; a resume seeks the stream)."""
        return self.loader.next_batch()

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        return self.supervised_loss(self.batch(step))

    def stream_transform(self) -> Optional[Callable]:
        """What the loader's workers do to each streamed example after decoding it: with cached features,
        make its training view (:func:`training_view`: crop, flip, mask targets, drawn from the sample's
        stream position, so the same whatever the workers, ranks or resumes); online features are
        augmented after the backbone, in the training process (None)."""
        if self.online is not None:
            return None
        return functools.partial(training_view, size=self.tc.crop_grid)

    def supervised_loss(self, batch: list) -> tuple[torch.Tensor, dict]:
        """The set-prediction loss of a batch of examples against their own targets: the views the loader's
        workers made (:meth:`stream_transform`), else augmented here with the checkpointed generator."""
        if any(ex.view is None for ex in batch):
            batch = [training_view(Example(ex.key, f, ex.target, ex.ids, ex.classes, ex.meta), self.gen,
                                   size=self.tc.crop_grid) for ex, f in zip(batch, batch_features(batch, self.online))]
        x, targets = to_device((torch.stack([ex.view[0] for ex in batch]), [ex.view[1] for ex in batch]), self.dev)
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = self.ddp(x)
        return self.crit(full_precision(outputs), targets, self.gen)

    def after_step(self, done: int) -> None:
        pass

    def validate(self, done: int) -> dict:
        return masks_recall(self.net, self.val_examples, self.online, self.dev)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, ckpt: dict) -> None:
        pass

    def resume_options(self, config: dict) -> dict:
        train = {k: v for k, v in config.get("train", {}).items() if k not in TrainConfig.VOLATILE}
        flat = {**config.get("decoder", {}), **train,
                **{k: config.get(k) for k in ("field", "min_part_area", "features", "feature_spec", "steps", "seed",
                                              "world", "class_aware", "objects_from", "fg_threshold")}}
        return {self.OPTION_NAMES.get(k, f"--{k.replace('_', '-')}"): v for k, v in flat.items()}

    # ---- the Trainer's hooks
    def train_step(self, step: int) -> dict:
        tc = self.tc
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
        return {"step": done, "loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0],
                **{f"loss_{k}": v for k, v in terms.items()}}

    def after_log(self, done: int) -> None:
        if self.val_examples and (done % self.tc.val_every == 0 or done == self.steps):
            val = self.validate(done)
            self.run.log({"step": done, "val": val})
            self.say(f"{self.command}: step {done} val " + " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()))

    def state(self, step: int) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": step, "rng": self.rng(),
                "decoder_config": self.dcfg.to_dict(), "feature_spec": self.feature_spec,
                "features": self.config["features"], "config": self.config, **self.extra_state()}

    def load_state(self, ckpt: dict) -> None:
        self.load_extra_state(ckpt)


def train_decoder(inputs: Sequence[str], out: str, **kwargs) -> dict:
    """Train a part decoder (class-aware when the label map names classes); writes config.json,
    metrics.jsonl, loss.png, last.pt.

    Keyword arguments are those of :class:`DecoderTrainer` (field, features, decoder, train, val, resume, ...).
    """
    return DecoderTrainer(inputs, out, **kwargs).fit()
