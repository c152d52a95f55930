"""Train a query-based part decoder (Mask2Former-style) on part proposals."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    LogOption, SkipBadOption, TrainFgThresholdOption, TrainObjectsOption, cli_errors, get_globals, parse_ints,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Shards with parts.png (from cluster) and feat.npy or images."),
    out: str = typer.Option(..., "--out", help="Run folder: config.json, metrics.jsonl, loss.png, last.pt."),
    field: str = typer.Option("parts.png", "--field", help="Label-map field whose ids are the proposals (targets.png, gt_parts.png: classes)."),
    class_aware: Optional[bool] = typer.Option(None, "--class-aware/--class-agnostic", help="Learn the field's classes (targets.json classes, json part_names) [default: when the field names them]."),
    objects_from: TrainObjectsOption = None,
    fg_threshold: TrainFgThresholdOption = 0.065,
    min_part_area: float = typer.Option(0.05, "--min-part-area", help="Drop proposals smaller than this fraction of their object."),
    features: str = typer.Option("auto", "--features", help="cached (feat.npy), online (recompute from images), auto."),
    model: str = typer.Option("efficientnet_lite0", "--model", help="Backbone for --features online."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights for --features online."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Backbone layers for --features online."),
    size: int = typer.Option(224, "--size", help="Image size for --features online."),
    queries: int = typer.Option(200, "--queries", help="Number of part queries (PartDistillation: 200)."),
    dec_layers: int = typer.Option(3, "--dec-layers", help="Transformer decoder layers."),
    hidden: int = typer.Option(128, "--hidden", help="Decoder width."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Images per step (per process)."),
    max_steps: int = typer.Option(1000, "--max-steps", help="Training steps (ignored with --epochs)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Train for this many passes over the data instead."),
    warmup: int = typer.Option(50, "--warmup", help="Linear warm-up steps, then cosine decay."),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient-norm clipping (0 = off)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA (ignored on CPU)."),
    crop_grid: int = typer.Option(32, "--crop-grid", help="Feature cells per side after the random resized crop."),
    val: Optional[List[str]] = typer.Option(None, "--val", help="Held-out shards for periodic AR@k."),
    val_every: int = typer.Option(100, "--val-every"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    log_every: int = typer.Option(10, "--log-every"),
    log: LogOption = "jsonl",
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="Checkpoint and stop at this step (resume later with --resume)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes that decode the training stream and, with cached features, make the training views (crop, flip, mask targets); default 2 on CUDA, 0 (decode in the training process) on CPU."),
    shuffle_buffer: int = typer.Option(256, "--shuffle-buffer", help="Samples per shuffle buffer (per worker): bounds memory."),
    skip_bad: SkipBadOption = False,
):
    """Train on every proposal (a non-zero id of parts.png) as a mask of one "part" class, or, when the
    label map names classes (targets.png + targets.json from `rank apply --as-targets`, gt_parts.png
    with part_names), on C classes + no-part.

    Example: partkit train-decoder clusters/ --out runs/dec --max-steps 2000 --val val.tar
    Distributed: torchrun --nproc_per_node=2 $(which partkit) train-decoder ...
    """
    from partkit.decoder import TrainConfig, train_decoder

    g = get_globals(ctx)
    tc = TrainConfig(lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_steps=max_steps, epochs=epochs,
                     warmup=warmup, clip_grad=clip_grad, amp=amp, crop_grid=crop_grid, checkpoint_every=checkpoint_every,
                     val_every=val_every, log_every=log_every, stop_at=stop_at, workers=workers,
                     shuffle_buffer=shuffle_buffer, log=log)
    train_decoder(inputs, out, field=field, min_part_area=min_part_area, features=features, model=model,
                  weights=weights, layers=parse_ints(layers, "--layers"), size=size,
                  decoder={"num_queries": queries, "num_layers": dec_layers, "hidden_dim": hidden}, train=tc,
                  val=val, resume=resume, device=g.device, seed=g.seed, handler=handler_for(skip_bad),
                  class_aware=class_aware, objects_from=objects_from, fg_threshold=fg_threshold)
