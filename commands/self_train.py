"""Self-training: EMA teacher-student on masks, or part-contrastive backbone fine-tuning."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import PartkitError, handler_for

from ._common import SkipBadOption, cli_errors, get_globals, parse_ints


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
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of (pseudo-label, train) [1]; part-contrast: (cluster, train) [2]."),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold", help="masks: keep teacher predictions whose class probability is at least this [recipe]."),
    min_mask_area: Optional[float] = typer.Option(None, "--min-mask-area", help="masks: ... whose soft mask area (sum of sigmoids, mask cells) is at least this [recipe]."),
    labeled: Optional[List[str]] = typer.Option(None, "--labeled", help="masks: shards with ground-truth label maps (semi-supervised)."),
    labeled_field: str = typer.Option("gt_parts.png", "--labeled-field", help="masks: label-map field of --labeled (e.g. targets.png from rank)."),
    unsup_weight: Optional[float] = typer.Option(None, "--unsup-weight", help="masks: lambda_u, weight of the pseudo-label loss with --labeled (0: the labels alone) [recipe]."),
    model: str = typer.Option("efficientnet_lite0", "--model", help="part-contrast: backbone to fine-tune."),
    weights: Optional[str] = typer.Option(None, "--weights", help="part-contrast: starting weights."),
    layers: Optional[str] = typer.Option(None, "--layers", help="part-contrast: feature layers."),
    facet: Optional[str] = typer.Option(None, "--facet", help="part-contrast: ViT facet (token, key, query, value)."),
    k: Optional[int] = typer.Option(None, "-k", help="part-contrast: parts per image [default: 25 for CNNs, 6 for ViTs]."),
    size: int = typer.Option(224, "--size", help="part-contrast: image size."),
    momentum: float = typer.Option(0.996, "--momentum", help="part-contrast: EMA decay of the momentum encoder."),
    tau: float = typer.Option(0.1, "--tau", help="part-contrast: temperature (latents scaled to norm 1/sqrt(tau))."),
    proj_dim: int = typer.Option(256, "--proj-dim", help="part-contrast: projector/predictor output size."),
    proj_hidden: int = typer.Option(4096, "--proj-hidden", help="part-contrast: projector/predictor hidden size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="[default: 1e-4 AdamW for masks; 0.005 SGD for part-contrast]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="[default: 0.05 masks; 1.5e-6 part-contrast]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="[default: 4 masks; 16 part-contrast]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Steps per round [default: 1000 masks; 500 part-contrast]."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up steps [default: 50 masks; 5% of steps part-contrast]."),
    crop_grid: int = typer.Option(32, "--crop-grid", help="masks: feature cells per side after cropping."),
    val: Optional[List[str]] = typer.Option(None, "--val", help="masks: held-out shards; teacher and student AR@k are logged."),
    val_every: int = typer.Option(100, "--val-every"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    log_every: int = typer.Option(10, "--log-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="Checkpoint and stop at this step."),
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
                         checkpoint_every=checkpoint_every, val_every=val_every, log_every=log_every, stop_at=stop_at)
        self_train_masks(inputs, out, teacher, recipe=recipe or "guided-distillation", student_init=student_init, burn_in=burn_in, ema_decay=ema_decay,
                         rounds=1 if rounds is None else rounds, score_threshold=score_threshold, min_mask_area=min_mask_area, labeled=labeled,
                         labeled_field=labeled_field, unsup_weight=unsup_weight, train=tc, val=val, resume=resume,
                         device=g.device, seed=g.seed, handler=handler_for(skip_bad))
    elif objective == "part-contrast":
        if teacher is not None or labeled or recipe is not None:
            raise PartkitError("--teacher, --labeled and --recipe belong to --objective masks; part-contrast needs none")
        from partkit.contrast import part_contrast

        given = {"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "steps_per_round": max_steps,
                 "warmup": warmup}
        part_contrast(inputs, out, model=model, weights=weights, layers=parse_ints(layers, "--layers"), facet=facet, rounds=2 if rounds is None else rounds,
                      k=k, size=size, momentum=momentum, tau=tau, proj_dim=proj_dim, proj_hidden=proj_hidden,
                      device=g.device, seed=g.seed, resume=resume, stop_at=stop_at, log_every=log_every,
                      checkpoint_every=checkpoint_every, handler=handler_for(skip_bad),
                      **{k_: v for k_, v in given.items() if v is not None})
    else:
        raise PartkitError(f"unknown --objective {objective!r}; choose masks or part-contrast")
