"""Dense features per image (CNN hypercolumns or ViT token/key/query/value facets)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    check_side, cli_errors, get_globals, make_output, parse_ints,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(None, help="Input shards (default '-': stdin)."),
    model: str = typer.Option("efficientnet_lite0", "--model", "-m", help="Registry name, timm:ARCH[.TAG] or open_clip:ARCH/TAG (see `partkit models`)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file, self-train run folder, hub tag, or 'none' (random)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layer indices (CNN stages / ViT blocks; negative from the end)."),
    facet: Optional[str] = typer.Option(None, "--facet", help="ViT facet: token, key, query or value (default: the preset's)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="ViT patch stride override for denser, overlapping patches."),
    grid_stride: Optional[int] = typer.Option(None, "--grid-stride", help="CNN hypercolumn grid stride (default: the finest chosen stage)."),
    size: int = typer.Option(224, "--size", help="Resize so the longer side is SIZE (keep-aspect), padded to a square."),
    keep_aspect: bool = typer.Option(True, "--keep-aspect/--squash", help="Keep the aspect ratio (pad) or squash to SIZE x SIZE."),
    saliency: bool = typer.Option(False, "--saliency", help="Also write saliency.npy from the ViT's CLS attention."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(1, "--workers", help="Threads decoding and resizing ahead of the model."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32 (best on CPU), float16 or bfloat16 (GPUs)."),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
    patches_at: Optional[str] = typer.Option(None, "--patches-at", help="keypoints: also write kpt_feat.npy/json, "
                                             "one vector per keypoint from a crop around it (Zhu et al.)."),
    patch_size: str = typer.Option("nn", "--patch-size", help="Crop side: 'nn' (distance to the nearest other "
                                   "keypoint, Zhu et al.) or pixels (>= 2)."),
    patch_pool: str = typer.Option("mean", "--patch-pool", help="A crop's vector: mean (of its feature grid) or "
                                   "cls (ViT CLS token; CNNs: global average pooling)."),
    kpt_min_v: int = typer.Option(1, "--kpt-min-v", help="--patches-at keypoints: keypoints with v >= this."),
):
    """Add feat.npy (float16 C x h x w) and feat.json (model, layers, grid geometry) to each image sample.

    Example: partkit pack images/ | partkit extract --model efficientnet_lite0 --layers 2,3,4 > feats.tar
    """
    from partkit.extract import check_patch_options, extract

    g = get_globals(ctx)
    check_side(size)
    check_patch_options(patches_at, patch_size, patch_pool, kpt_min_v)
    extract(inputs or ["-"], model=model, weights=weights, layers=parse_ints(layers, "--layers"), facet=facet, stride=stride,
            grid_stride=grid_stride, size=size, keep_aspect=keep_aspect, saliency=saliency, batch_size=batch_size,
            workers=workers, device=g.device, dtype=dtype, seed=g.seed, handler=handler_for(skip_bad),
            output=make_output(output, shard_size, overwrite, drop, num_shards, shard_index),
            patches_at=patches_at, patch_size=patch_size, patch_pool=patch_pool, kpt_min_visibility=kpt_min_v)
