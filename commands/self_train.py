"""Self-training: EMA teacher-student on masks, or part-contrastive backbone fine-tuning."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import PartkitError, handler_for

from ._common import (
    LogOption, SkipBadOption, TrainFgThresholdOption, TrainObjectsOption, cli_errors, get_globals, parse_ints,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Unlabelled shards (feat.npy as the teacher was trained on, or images)."),
    out: str = typer.Option(..., "--out", help="Run folder (config.json, metrics.jsonl, loss.png, last.pt / backbone.pt)."),
    objective: str = typer.Option("masks", "--objective", help="masks (teacher-student decoder) or part-contrast (PARTICLE)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="masks: the train-decoder run (or last.pt) to start from."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="masks: guided-distillation (default) or partdistillation: the paper's defaults for the options below; explicit options override."),
    student_init: Optional[str] = typer.Option(None, "--student-init", help="masks: teacher (copy its weights) or scratch (random init) [recipe]."),
    burn_in: Optional[int] = typer.Option(None, "--burn-in", help="masks: steps with the teacher frozen before it takes the student's weights [recipe: a share of --max-steps]."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="masks: teacher = a*teacher + (1-a)*student after burn-in (1 = fixed) [recipe]."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of (pseudo-label, train) [1]; part-contrast: (discover, train) [3]."),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold", help="masks: keep teacher predictions whose class probability is at least this [recipe]."),
    min_mask_area: Optional[float] = typer.Option(None, "--min-mask-area", help="masks: ... whose soft mask area (sum of sigmoids, mask cells) is at least this [recipe]."),
    objects_from: TrainObjectsOption = None,
    fg_threshold: TrainFgThresholdOption = 0.065,
    labeled: Optional[List[str]] = typer.Option(None, "--labeled", help="masks: shards with ground-truth label maps (semi-supervised)."),
    labeled_field: str = typer.Option("gt_parts.png", "--labeled-field", help="masks: label-map field of --labeled (e.g. targets.png from rank)."),
    unsup_weight: Optional[float] = typer.Option(None, "--unsup-weight", help="masks: lambda_u, weight of the pseudo-label loss with --labeled (0: the labels alone) [recipe]."),
    model: str = typer.Option("efficientnet_lite0", "--model", help="part-contrast: backbone to fine-tune."),
    weights: Optional[str] = typer.Option(None, "--weights", help="part-contrast: starting weights (a registry tag, or a file: partkit, timm, MoCo or DetCon checkpoint)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="part-contrast: feature layers."),
    facet: Optional[str] = typer.Option(None, "--facet", help="part-contrast: ViT facet for part discovery [key]."),
    k: Optional[int] = typer.Option(None, "-k", help="part-contrast: parts per image [default: 25 for CNNs, 6 for ViTs]."),
    size: int = typer.Option(224, "--size", help="part-contrast: image size."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="part-contrast: EMA decay of the momentum encoder [0.996]."),
    momentum_end: Optional[float] = typer.Option(None, "--momentum-end", help="part-contrast: EMA decay at a round's end, cosine [CNN 0.996, ViT 1]."),
    tau: Optional[float] = typer.Option(None, "--tau", help="part-contrast: temperature (latents scaled to norm 1/sqrt(tau)) [0.1]."),
    proj_dim: Optional[int] = typer.Option(None, "--proj-dim", help="part-contrast: projector/predictor output size [256]."),
    proj_hidden: Optional[int] = typer.Option(None, "--proj-hidden", help="part-contrast: projector/predictor hidden size [CNN 4096, ViT 2048]."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="part-contrast: epochs of round 1 [CNN 600, ViT 100]."),
    round_epochs: Optional[int] = typer.Option(None, "--round-epochs", help="part-contrast: epochs of each later round [CNN 20, ViT 60]."),
    round_lr: Optional[float] = typer.Option(None, "--round-lr", help="part-contrast: peak learning rate of later rounds [CNN 0.05, ViT 1e-8]."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="part-contrast: learning rate at a round's end [CNN 0, ViT 1e-8]."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="part-contrast: sgd or adamw [CNN sgd, ViT adamw]."),
    dino_weight: Optional[float] = typer.Option(None, "--dino-weight", help="part-contrast: weight of the DINO loss [ViT 1, CNN 0]."),
    dino_out_dim: int = typer.Option(65536, "--dino-out-dim", help="part-contrast: DINO head output size."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="part-contrast: per-parameter gradient-norm bound, 0 = none [ViT 3, CNN 0]."),
    kmeans_iters: int = typer.Option(500, "--kmeans-iters", help="part-contrast: k-means iterations of part discovery."),
    lr: Optional[float] = typer.Option(None, "--lr", help="[default: 1e-4 AdamW for masks; part-contrast round 1: CNN 0.005, ViT 1e-7]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="[default: 0.05 masks; part-contrast CNN 1.5e-6, ViT 0.4]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="[default: 4 masks; part-contrast CNN 320, ViT 64, per process]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="masks: steps per round [1000] (part-contrast counts --epochs)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up [default: 50 steps masks; 10 epochs per round part-contrast]."),
    crop_grid: int = typer.Option(32, "--crop-grid", help="masks: feature cells per side after cropping."),
    val: Optional[List[str]] = typer.Option(None, "--val", help="masks: held-out shards; teacher and student AR@k are logged."),
    val_every: int = typer.Option(100, "--val-every"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    log_every: int = typer.Option(10, "--log-every"),
    log: LogOption = "jsonl",
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="Checkpoint and stop at this step."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes that decode the training stream (part-contrast: and make the views); default 2 on CUDA, 0 (decode in the training process) on CPU."),
    shuffle_buffer: int = typer.Option(256, "--shuffle-buffer", help="Samples per shuffle buffer (per worker): the memory bound of the stream."),
    skip_bad: SkipBadOption = False,
):
    """Improve part predictions without labels.

    --objective masks: a train-decoder teacher labels weak views, the student learns from strong
    views (PartDistillation self-training, Guided Distillation's guided burn-in and EMA).
    --objective part-contrast: fine-tune the backbone with PARTICLE's part-contrastive loss;
    use the result anywhere with --weights RUN_DIR/backbone.pt.

    --recipe guided-distillation (default): random-init student, guided burn-in, EMA;
    --recipe partdistillation: the student starts from the teacher and learns --labeled targets
    (rank apply --as-targets) as classes.

    Example: partkit self-train feats/ --teacher runs/dec --out runs/st --max-steps 2000
    """
    g = get_globals(ctx)
    if objective == "masks":
        if teacher is None:
            raise PartkitError("--objective masks needs --teacher RUN_DIR (a train-decoder run)")
        from partkit.decoder import TrainConfig
        from partkit.selftrain import self_train_masks

        given = {"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "max_steps": max_steps,
                 "warmup": warmup}
        tc = TrainConfig(**{k_: v for k_, v in given.items() if v is not None}, crop_grid=crop_grid,
                         checkpoint_every=checkpoint_every, val_every=val_every, log_every=log_every, stop_at=stop_at,
                         workers=workers, shuffle_buffer=shuffle_buffer, log=log)
        self_train_masks(inputs, out, teacher, recipe=recipe or "guided-distillation", student_init=student_init, burn_in=burn_in, ema_decay=ema_decay,
                         rounds=1 if rounds is None else rounds, score_threshold=score_threshold, min_mask_area=min_mask_area, labeled=labeled,
                         labeled_field=labeled_field, unsup_weight=unsup_weight, train=tc, val=val, resume=resume,
                         device=g.device, seed=g.seed, handler=handler_for(skip_bad), objects_from=objects_from,
                         fg_threshold=fg_threshold)
    elif objective == "part-contrast":
        if teacher is not None or labeled or recipe is not None or objects_from is not None:
            raise PartkitError("--teacher, --labeled, --recipe and --objects-from belong to --objective masks; "
                               "part-contrast needs none")
        from partkit.contrast import part_contrast

        if max_steps is not None:
            raise PartkitError("--max-steps belongs to --objective masks; part-contrast counts epochs: pass --epochs "
                               "(round 1) and --round-epochs (later rounds)")
        given = {"rounds": rounds, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "warmup": warmup}
        part_contrast(inputs, out, model=model, weights=weights, layers=parse_ints(layers, "--layers"), facet=facet,
                      k=k, size=size, momentum=momentum, momentum_end=momentum_end, tau=tau, proj_dim=proj_dim,
                      proj_hidden=proj_hidden, epochs=epochs, round_epochs=round_epochs, round_lr=round_lr,
                      min_lr=min_lr, optimizer=optimizer, dino_weight=dino_weight, dino_out_dim=dino_out_dim,
                      clip_grad=clip_grad, kmeans_iters=kmeans_iters, device=g.device, seed=g.seed, resume=resume,
                      stop_at=stop_at, log_every=log_every, checkpoint_every=checkpoint_every,
                      handler=handler_for(skip_bad), log=log, workers=workers, shuffle_buffer=shuffle_buffer,
                      **{k_: v for k_, v in given.items() if v is not None})
    else:
        raise PartkitError(f"unknown --objective {objective!r}; choose masks or part-contrast")
