"""Group feature cells into part proposals (k-means per image, per object, per dataset or per group)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    check_output_file, check_seed, cli_errors, get_globals, make_output,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(None, help="Input shards: paths, globs, braces, '-' or 'pipe:CMD' "
                                       "(default '-': stdin)."),
    scope: str = typer.Option("image", "--scope", help="image | object | dataset | cosegment."),
    k: Optional[str] = typer.Option(None, "-k", "--k", help="Parts per image/object/dataset/group, or 'auto' (elbow "
                                    "rule). Default: image 25, object 4, dataset 25, cosegment 4."),
    metric: str = typer.Option("cosine", "--metric", help="cosine (L2-normalise features first) or l2."),
    init: str = typer.Option("auto", "--init", help="auto (k-means|| from k=12, else k-means++), k-means++ (greedy, as scikit-learn), k-means|| "
                             "(Bahmani et al.: fewer passes, faster at large k) or random."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Maximum Lloyd iterations [default: 100; dataset: 25]."),
    tol: float = typer.Option(1e-4, "--tol", help="Stop when centres move less than this (relative to the variance)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed [default: the global --seed]."),
    fg_from: Optional[str] = typer.Option(None, "--fg-from", help="Object/foreground masks: gt_objects, gt_parts or "
                                          "saliency [default: object gt_objects, cosegment saliency]."),
    fg_threshold: float = typer.Option(0.065, "--fg-threshold", help="Saliency above this is foreground."),
    coverage: float = typer.Option(0.5, "--coverage", help="A cell belongs to a mask when the mask covers this "
                                   "fraction of it."),
    upsample: str = typer.Option("grid", "--upsample", help="parts.png resolution: grid (feature grid) or image."),
    min_area: float = typer.Option(0, "--min-area", help="Parts smaller than this many cells (or this fraction of "
                                   "the object, below 1) are merged or dropped."),
    min_area_action: str = typer.Option("merge", "--min-area-action", help="merge (into the nearest kept centre) "
                                        "or drop (to background 0)."),
    warm_start: Optional[str] = typer.Option(None, "--warm-start", help="Start k-means from a .npy of k x C "
                                             "centroids, or 'parts' to continue each sample's previous parts.png."),
    centroids: Optional[str] = typer.Option(None, "--centroids", help="dataset: reuse these .npy centroids "
                                            "(assign only, no fit)."),
    save_centroids: Optional[str] = typer.Option(None, "--save-centroids", help="dataset: write the fitted "
                                                 "centroids (.npy)."),
    fit_on: Optional[List[str]] = typer.Option(None, "--fit-on", help="dataset: fit on these shards instead of the "
                                               "inputs (repeatable)."),
    group_by: str = typer.Option("category", "--group-by", help="cosegment: the sample json field that groups "
                                 "images ('none': one group)."),
    votes: float = typer.Option(0.75, "--votes", help="cosegment: fraction of a group's images in which a cluster "
                                "must be salient to count as foreground."),
    elbow: float = typer.Option(0.975, "--elbow", help="k auto: the smallest k reaching this fraction of the "
                                "inertia drop."),
    k_max: int = typer.Option(14, "--k-max", help="k auto: largest k tried (from 2)."),
    max_points_per_centroid: int = typer.Option(256, "--max-points-per-centroid", help="dataset: fit on at most "
                                                "k times this many cells (a seeded uniform sample)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples clustered together in one batched solve."),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
):
    """Group feature cells into part proposals (k-means per image, per object, per dataset or per group).

    Reads feat.npy + feat.json (from `partkit extract`), writes parts.png (0 = background, parts 1..k;
    feature-grid resolution unless --upsample image) and parts.json.

    Example: partkit pack imgs/ --labels labels/ | partkit extract --model efficientnet_lite0 |
    partkit cluster --scope object --fg-from gt_parts -k 4 -o parts/
    """
    from partkit.cluster import ClusterConfig, cluster

    g = get_globals(ctx)
    check_seed(seed)
    if save_centroids:
        check_output_file(save_centroids, "--save-centroids")
    config = ClusterConfig(
        scope=scope, k=k, metric=metric, init=init, max_iter=iters, tol=tol, seed=g.seed if seed is None else seed,
        device=g.device, fg_from=fg_from, fg_threshold=fg_threshold, coverage=coverage, upsample=upsample,
        min_area=min_area, min_area_action=min_area_action, warm_start=warm_start, centroids=centroids,
        save_centroids=save_centroids, fit_on=fit_on or None, group_by=group_by, votes=votes, elbow=elbow,
        k_max=k_max, max_points_per_centroid=max_points_per_centroid, batch_size=batch_size,
    )
    cluster(inputs or ["-"], config, output=make_output(output, shard_size, overwrite, drop, num_shards, shard_index),
            handler=handler_for(skip_bad))
