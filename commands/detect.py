"""Object instances on unlabelled images from a COCO Mask R-CNN (gt_objects.json format)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    check_side, cli_errors, get_globals, make_output,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(None, help="Input shards with images (default '-': stdin)."),
    model: str = typer.Option("maskrcnn_resnet50_fpn_v2", "--model", "-m",
                              help="Registry detector: maskrcnn_resnet50_fpn_v2 or maskrcnn_resnet50_fpn (COCO)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file, torchvision tag (COCO_V1), or "
                                                                  "'none' (random). [default: COCO_V1]"),
    score_threshold: float = typer.Option(0.5, "--score-threshold", help="Keep instances scoring above this."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated COCO category names to keep "
                                                                  "(e.g. car,truck). [default: all]"),
    size: int = typer.Option(800, "--size", help="Shorter image side the model resizes to (torchvision: 800)."),
    max_size: int = typer.Option(1333, "--max-size", help="Longer side at most (torchvision: 1333)."),
    max_detections: int = typer.Option(100, "--max-detections", help="Instances per image at most."),
    rpn_proposals: int = typer.Option(1000, "--rpn-proposals", help="Region proposals kept around the RPN's NMS "
                                                                    "(torchvision: 1000; fewer is faster)."),
    field: str = typer.Option("gt_objects.json", "--field", help="Field to write (must not exist yet)."),
    batch_size: int = typer.Option(2, "--batch-size", "-b", help="Images per forward pass."),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
):
    """Add gt_objects.json (COCO-style instances: category, score, RLE mask) from a detector to each image.

    Example: partkit pack images/ | partkit detect --classes car --score-threshold 0.7 -o det/
    """
    from partkit.detect import detect

    g = get_globals(ctx)
    check_side(size)
    check_side(max_size, "--max-size")
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
    if classes is not None and not names:
        from partkit.errors import PartkitError

        raise PartkitError("--classes is empty; give COCO category names like car,truck or leave it out")
    detect(inputs or ["-"], model=model, weights=weights, score_threshold=score_threshold, classes=names, size=size,
           max_size=max_size, max_detections=max_detections, rpn_proposals=rpn_proposals, field=field, batch_size=batch_size, device=g.device,
           seed=g.seed, handler=handler_for(skip_bad),
           output=make_output(output, shard_size, overwrite, drop, num_shards, shard_index))
