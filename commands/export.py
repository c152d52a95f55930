"""Write predictions and ground truth as files other tools read (COCO results + COCO ground truth)."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit._log import log

from ._common import SkipBadOption, cli_errors

app = typer.Typer(
    help="Write predictions and ground truth of shards as files other tools read.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("coco")
@cli_errors
def coco(
    inputs: List[str] = typer.Argument(None, help="Input shards (default '-': stdin)."),
    pred: str = typer.Option("proposals.json", "--pred", help="Field of scored RLE proposals: proposals.json "
                                                              "(partkit predict) or ranked.json (partkit rank apply)."),
    output: str = typer.Option(..., "--output", "-o", help="COCO results file to write (JSON list of detections)."),
    gt_out: Optional[str] = typer.Option(None, "--gt-out", help="Also write the matching COCO ground-truth file."),
    gt: str = typer.Option("parts", "--gt", help="Ground truth: parts (one mask per id in gt_parts.png, void pixels "
                                                 "as a crowd region) or objects (gt_objects.json), as eval mask-ap."),
    gt_field: Optional[str] = typer.Option(None, "--gt-field", help="Ground-truth label map [default: gt_parts.png]."),
    skip_bad: SkipBadOption = False,
):
    """Proposals as one COCO results file, plus the COCO ground truth that eval mask-ap scores them on.

    Example: partkit export coco preds.tar --pred proposals.json -o results.json --gt-out gt.json
    """
    from partkit.export import export_coco

    r = export_coco(inputs or ["-"], output, pred=pred, gt_out=gt_out, gt=gt, gt_field=gt_field, skip_bad=skip_bad)
    log(f"export coco: {r['detections']} detections of {r['samples']} images -> {output}"
        + (f"; {r['annotations']} ground-truth annotations -> {gt_out}" if gt_out else "")
        + ("; class-agnostic (category 1, part)" if r["class_agnostic"] else ""))
