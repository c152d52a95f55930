"""Draw pictures of part predictions: overlays, purity grids, confusion heat maps."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from partkit import show
from partkit._log import log
from partkit.errors import PartkitError, handler_for
from partkit.evaluate import EvalOptions, render

from ._common import InputsArgument, SkipBadOption, check_output_file, check_output_folder, check_side, cli_errors

app = typer.Typer(
    help="Draw pictures of part predictions (PNG files; nothing on stdout).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

PredOption = Annotated[str, typer.Option("--pred", help="Predicted label-map field.")]
GtFieldOption = Annotated[str, typer.Option("--gt-field", help="Ground-truth label-map field.")]


def _render(inputs, view: str, out: str, **options) -> None:
    files = render(inputs, view, out, EvalOptions(**options))
    for kind, path in files.items():
        log(f"show {kind}: wrote {path}")


@app.command("overlays")
@cli_errors
def overlays(
    inputs: InputsArgument,
    output: str = typer.Option(..., "--output", "-o", help="Folder for one <key>.png per sample."),
    pred: PredOption = "parts.png",
    gt_field: GtFieldOption = "gt_parts.png",
    max_samples: int = typer.Option(16, "--max", help="Draw the first N samples."),
    skip_bad: SkipBadOption = False,
):
    """Image, predicted parts and ground truth side by side (colours fixed per part id)."""
    check_output_folder(output, "--output")
    _render(inputs, "overlays", output, pred=pred, gt_field=gt_field, viz_max=max_samples, skip_bad=skip_bad)


@app.command("purity")
@cli_errors
def purity(
    inputs: InputsArgument,
    output: str = typer.Option("purity.png", "--output", "-o", help="PNG file (.png is added when missing; a "
                                                                   "folder with --per-class)."),
    pred: PredOption = "parts.png",
    per_class: bool = typer.Option(False, "--per-class",
                                   help="One figure per object class from `partkit rank apply` (ranked.json, "
                                        "ranked_parts.png), highest-scoring instances, plus index.html."),
    skip_bad: SkipBadOption = False,
):
    """For each discovered part, a 3x3 grid of the images where it is largest, highlighted."""
    if per_class:
        check_output_folder(output[:-4] if output.endswith(".png") else output, "--output")
    else:
        output = show.png_path(output)
        check_output_file(output, "--output", create_parents=True)
    if per_class:
        if pred != "parts.png":
            raise PartkitError("--per-class reads ranked_parts.png and ranked.json; drop --pred")
        folder = output[:-4] if output.endswith(".png") else output
        for name, path in show.purity_per_class(inputs, folder, handler=handler_for(skip_bad)).items():
            log(f"show purity {name}: wrote {path}")
        return
    _render(inputs, "purity", output, pred=pred, skip_bad=skip_bad)


@app.command("confusion")
@cli_errors
def confusion(
    inputs: InputsArgument,
    output: str = typer.Option("confusion.png", "--output", "-o", help="PNG file (.png is added when missing)."),
    pred: PredOption = "parts.png",
    gt_field: GtFieldOption = "gt_parts.png",
    region: str = typer.Option("fg", "--region", help="fg: ground-truth foreground pixels; full: all pixels."),
    skip_bad: SkipBadOption = False,
):
    """Heat map of predicted cluster x ground-truth part (each cluster's pixels split over parts)."""
    output = show.png_path(output)
    check_output_file(output, "--output", create_parents=True)
    _render(inputs, "confusion", output, pred=pred, gt_field=gt_field, region=region, skip_bad=skip_bad)


@app.command("points")
@cli_errors
def points(
    inputs: InputsArgument,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Folder for one <key>.png per point cloud."),
    ply: Optional[str] = typer.Option(None, "--ply", help="Folder for coloured <key>.<field>.ply files (MeshLab, "
                                                          "CloudCompare), one per label field."),
    ascii_ply: bool = typer.Option(False, "--ascii", help="Write ASCII PLY instead of binary."),
    fields: list[str] = typer.Option(["pred_parts.npy", "gt_parts.npy"], "--field",
                                     help="Per-point label field to colour by, one row each (repeatable)."),
    max_samples: int = typer.Option(16, "--max", help="Draw the first N point clouds."),
    size: int = typer.Option(256, "--size", help="Pixels per view."),
    skip_bad: SkipBadOption = False,
):
    """Point clouds from three views, coloured by predicted and ground-truth part ids (one PNG per shape);
    --ply also writes coloured .ply files."""
    if output is None and ply is None:
        raise PartkitError("show points needs --output DIR (PNG pictures), --ply DIR (.ply files) or both")
    for opt, folder in (("--output", output), ("--ply", ply)):
        if folder is not None:
            check_output_folder(folder, opt)
    check_side(size)
    for path in show.show_points(inputs, output, fields=fields, max_samples=max_samples, size=size, ply=ply,
                                 ascii_ply=ascii_ply, handler=handler_for(skip_bad)):
        log(f"show points: wrote {path}")
