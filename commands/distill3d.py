"""Distil 2D part labels of rendered views into a 3D point-cloud segmenter (PartDistill)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import PartkitError, handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    check_side, cli_errors, get_globals, make_output, parse_ints,
)

# what --student refuses: everything that picks a teacher or trains (the run's config.json has them)
_TRAINING = ("teacher", "teacher_model", "weights", "layers", "k", "parts", "category", "elevations", "azimuths", "size",
             "radius", "temperature", "width", "depth", "knn", "points", "batch_size", "epochs", "lr", "plateau",
             "backward")


def _floats(text: str, opt: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PartkitError(f"{opt} must be comma-separated numbers (degrees), got {text!r}") from None
    if not values:
        raise PartkitError(f"{opt} needs at least one angle")
    return values


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(None, help="Point-cloud shards from `partkit pack` (default '-': stdin)."),
    teacher: str = typer.Option("parts", "--teacher", help="2D teacher: 'parts' (unsupervised extract + dataset "
                                                             "k-means, offline) or 'clip' (text-prompted, MaskCLIP)."),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Backbone registry name (default: "
                                                "efficientnet_lite0 for parts, clip_vitb16 for clip)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Teacher weights: file, hub tag or 'none'."),
    layers: Optional[str] = typer.Option(None, "--layers", help="parts teacher: backbone layers, e.g. 2,3,4."),
    k: int = typer.Option(8, "-k", help="parts teacher: number of parts to discover (over-segmenting helps)."),
    parts: Optional[str] = typer.Option(None, "--parts", help="clip teacher: part names, e.g. 'panel,peak' "
                                                              "(default: the samples' json 'parts')."),
    category: Optional[str] = typer.Option(None, "--category", help="clip teacher: category in the prompts "
                                                                    "(default: the samples' json)."),
    elevations: str = typer.Option("30,-20", "--elevations", help="Camera elevations in degrees (y is up); "
                                                                  "the views are every elevation x azimuth."),
    azimuths: str = typer.Option("0,72,144,216,288", "--azimuths", help="Camera azimuths in degrees."),
    size: int = typer.Option(224, "--size", help="Rendered view size in pixels."),
    radius: Optional[int] = typer.Option(None, "--radius", help="Splat half-width in pixels (default: from the "
                                                                "point count and size)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Teacher softmax temperature "
                                                                            "(default 0.05 parts, 0.01 clip)."),
    width: int = typer.Option(64, "--width", help="Student channels per EdgeConv."),
    depth: int = typer.Option(3, "--depth", help="Student EdgeConv layers."),
    knn: int = typer.Option(16, "--knn", help="Student neighbours per point."),
    points: int = typer.Option(1024, "--points", help="Points per shape in a training step."),
    batch_size: int = typer.Option(8, "--batch-size", help="Shapes per training step."),
    epochs: int = typer.Option(60, "--epochs", help="Training epochs over all shapes."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    plateau: float = typer.Option(0.01, "--plateau", help="Backward distillation starts when the 5-epoch mean "
                                                          "loss changes by less than this fraction."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Backward distillation (label reweighting)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder: student weights, config.json, metrics.jsonl, "
                                                          "loss.png."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="Checkpoint and stop after this epoch, writing no "
                                                                  "samples (finish later with --resume)."),
    student: Optional[str] = typer.Option(None, "--student", help="Apply the trained student of this run folder "
                                                                  "(a finished --out) to the inputs: no teacher, no "
                                                                  "training; streams, shards with --num-shards."),
    labeled: Optional[List[str]] = typer.Option(None, "--labeled", help="Shards of shapes with gt_parts.npy: a "
                                                "supervised loss on them (few-shot); ids follow their part ids."),
    save_views: Optional[str] = typer.Option(None, "--save-views", help="Folder for each shape's rendered views, "
                                             "teacher label maps and coverage picture (<key>.views/teacher/"
                                             "coverage.png)."),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
    skip_bad: SkipBadOption = False,
):
    """Add pred_parts.npy (a part id per point) and pred_parts.json to every point-cloud sample.

    Renders each shape from several views, labels the views with a 2D teacher, back-projects the
    labels onto the points and trains one point-cloud student on all shapes (PartDistill).

    Example: partkit pack caps.npz | partkit distill-3d --teacher parts -k 8 --out runs/caps | partkit eval miou-3d

    Then, on new shapes: partkit distill-3d new.tar --student runs/caps -o preds/
    """
    from partkit.distill3d import DistillConfig, distill_3d

    g = get_globals(ctx)
    out_opts = make_output(output, shard_size, overwrite, drop, num_shards, shard_index)
    if student is not None:
        # by name: typer may carry its own copy of click's ParameterSource enum
        given = [p for p in _TRAINING if getattr(ctx.get_parameter_source(p), "name", "DEFAULT") in
                 ("COMMANDLINE", "ENVIRONMENT", "PROMPT")]
        given = ["--" + p.replace("_", "-") if len(p) > 1 else "-" + p for p in given]
        distill_3d(inputs or ["-"], None, student=student, out=out, resume=resume, stop_at=stop_at, labeled=labeled,
                   save_views=save_views, handler=handler_for(skip_bad), output=out_opts,
                   **({"given": given} if given else {}))
        return
    check_side(size)
    cfg = DistillConfig(
        teacher=teacher, teacher_model=teacher_model, weights=weights, layers=parse_ints(layers, "--layers"), k=k,
        parts=[p.strip() for p in parts.split(",") if p.strip()] if parts else None, category=category,
        elevations=_floats(elevations, "--elevations"), azimuths=_floats(azimuths, "--azimuths"), size=size,
        radius=radius, temperature=temperature, width=width, depth=depth, knn=knn, points=points,
        batch_size=batch_size, epochs=epochs, lr=lr, plateau=plateau, backward=backward, seed=g.seed,
        device=g.device)
    distill_3d(inputs or ["-"], cfg, out=out, handler=handler_for(skip_bad), resume=resume, stop_at=stop_at,
               labeled=labeled or None, save_views=save_views, output=out_opts)
