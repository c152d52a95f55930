"""Part proposals from a trained decoder (RLE masks, scores, query features)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.errors import handler_for

from ._common import (
    DropOption, NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption,
    TrainFgThresholdOption, cli_errors, get_globals, make_output,
)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(None, help="Input shards (default '-': stdin)."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="Run folder (or last.pt) of train-decoder/self-train."),
    topk: int = typer.Option(200, "--topk", help="Keep the K highest-scoring proposals per image (PartDistillation: 200)."),
    score_threshold: float = typer.Option(0.0, "--score-threshold", help="Drop proposals scoring below this."),
    mask_threshold: float = typer.Option(0.5, "--mask-threshold", help="Binarise mask probabilities at this value."),
    label_map: bool = typer.Option(False, "--label-map", help="Also write pred_parts.png (each pixel to its most confident part)."),
    label_rule: str = typer.Option("proposal", "--label-rule", help="pred_parts.png: proposal (each pixel to its most confident proposal) or semantic (Mask2Former's semantic inference over all queries; class-aware decoders)."),
    objects_from: Optional[str] = typer.Option(None, "--objects-from", help="pred_parts.png is 0 outside the objects of gt_objects, gt_parts or saliency (extract --saliency)."),
    fg_threshold: TrainFgThresholdOption = 0.065,
    teacher: bool = typer.Option(False, "--teacher", help="Use a self-train run's EMA teacher instead of the student."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    drop: DropOption = [],
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
):
    """Add proposals.json (RLE masks at image size, score, bbox, area) and proposals.npy (float16 query features).

    Example: partkit predict --checkpoint runs/dec feats.tar --topk 50 --label-map | partkit eval ar
    """
    from partkit.decoder import predict

    g = get_globals(ctx)
    predict(inputs or ["-"], checkpoint, topk=topk, score_threshold=score_threshold, mask_threshold=mask_threshold,
            label_map=label_map, batch_size=batch_size, device=g.device, handler=handler_for(skip_bad),
            use_teacher=teacher, label_rule=label_rule, objects_from=objects_from, fg_threshold=fg_threshold,
            output=make_output(output, shard_size, overwrite, drop, num_shards, shard_index))
