"""Class-specific part ranking of decoder proposals (PartDistillation stage two)."""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    check_output_file, cli_errors, get_globals, make_output,
)

app = typer.Typer(
    help="Rank part proposals per object class: fit per-class part clusters, then score and label proposals.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ProposalShardsArgument = Annotated[List[str], typer.Argument(
    help="Input shards with proposals.json + proposals.npy (default '-': stdin).")]
ObjectsFromOption = Annotated[Optional[str], typer.Option(
    "--objects-from", help="gt_objects: instances from --objects-field; gt_parts: all labelled pixels of "
                           "gt_parts.png are one object; saliency: saliency.npy (extract --saliency) above "
                           "--fg-threshold is one object. [fit default: gt_objects; apply: as fitted]")]
FgThresholdOption = Annotated[Optional[float], typer.Option(
    "--fg-threshold", help="With --objects-from saliency: saliency above this is the object. "
                           "[fit default: 0.065, as cluster; apply: as fitted]")]
ObjectsFieldOption = Annotated[Optional[str], typer.Option(
    "--objects-field", help="JSON field of object instances, e.g. predicted masks. [default: gt_objects.json]")]
DefaultClassOption = Annotated[Optional[str], typer.Option(
    "--default-class", help="Class of objects whose sample has no 'category' (e.g. person).")]


@app.command("fit")
@cli_errors
def fit(
    ctx: typer.Context,
    inputs: ProposalShardsArgument = None,
    model_out: str = typer.Option(..., "--model-out", "-m", help="Model file to write (.npz)."),
    k: int = typer.Option(8, "-k", help="Part clusters per object class."),
    score_threshold: float = typer.Option(0.3, "--score-threshold", help="Candidates score above this."),
    min_area: float = typer.Option(0.05, "--min-area", help="Candidates win at least this fraction of their object."),
    max_object_fraction: Optional[float] = typer.Option(
        None, "--max-object-fraction", help="Drop clusters whose masks cover more than this fraction of the object "
                                            "on average (the paper uses 0.5). [default: keep all]"),
    objects_from: ObjectsFromOption = None,
    objects_field: ObjectsFieldOption = None,
    default_class: DefaultClassOption = None,
    fg_threshold: FgThresholdOption = None,
    max_iter: int = typer.Option(300, "--max-iter", help="Lloyd iterations at most."),
    max_candidates: int = typer.Option(100_000, "--max-candidates",
                                       help="Per class, cluster a seeded uniform sample of this many candidates "
                                            "when there are more (bounds memory; 0 = no bound)."),
    skip_bad: SkipBadOption = False,
):
    """Cluster the candidate proposals of each object class (weighted k-means) and save the model.

    Example: partkit rank fit preds/ --model-out rank.npz -k 8
    """
    from partkit import rank as R

    g = get_globals(ctx)
    check_output_file(model_out, "--model-out", create_parents=True)
    R.fit(inputs or ["-"], model_out, n_clusters=k, score_threshold=score_threshold, min_area=min_area,
          max_object_fraction=max_object_fraction, objects_from=objects_from or "gt_objects",
          objects_field=objects_field, default_class=default_class, fg_threshold=fg_threshold, max_iter=max_iter,
          seed=g.seed, device=g.device, handler=handler_for(skip_bad), max_candidates=max_candidates or None)


@app.command("apply")
@cli_errors
def apply(
    inputs: ProposalShardsArgument = None,
    model: str = typer.Option(..., "--model", "-m", help="Model file from `partkit rank fit`."),
    as_targets: bool = typer.Option(False, "--as-targets",
                                    help="Also write targets.png + targets.json (class-specific parts) for "
                                         "self-train --labeled."),
    score: str = typer.Option(
        "density", "--score", help="Final score: density = max_k r_k (Sec. 4.1, the paper); objectness-density = "
                                   "objectness x max_k r_k (the official code)."),
    unknown_classes: str = typer.Option(
        "error", "--unknown-classes", help="Proposals on objects of classes the model was not fitted on: error "
                                           "(stop, naming them), drop (leave them out), keep (list them unranked)."),
    objects_from: ObjectsFromOption = None,
    objects_field: ObjectsFieldOption = None,
    default_class: DefaultClassOption = None,
    fg_threshold: FgThresholdOption = None,
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
):
    """Add ranked.json (proposals with class, part cluster, final score) and ranked_parts.png.

    Part ids: class_index * k + cluster + 1 (0 = background). Example: partkit rank apply preds/ --model rank.npz
    """
    from partkit import rank as R

    R.apply(inputs or ["-"], model, as_targets=as_targets, score=score, unknown_classes=unknown_classes,
            objects_from=objects_from, objects_field=objects_field,
            default_class=default_class, fg_threshold=fg_threshold, handler=handler_for(skip_bad),
            output=make_output(output, shard_size, overwrite, drop, num_shards, shard_index))
