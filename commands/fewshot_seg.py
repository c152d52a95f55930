"""Few-shot part segmentation (PARTICLE): fine-tune a backbone + decoder on N labelled images, cross-validated."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from partkit._log import console
from partkit.errors import handler_for

from ._common import SkipBadOption, check_output_file, cli_errors, get_globals


def print_table(report: dict) -> None:
    from rich.table import Table

    p = report["protocol"]
    table = Table(title=f"partkit fewshot-seg: {report['model']} (weights: {report['weights'] or 'default'}), "
                        f"{p['train_images']} training images, {report['held_out_images']} held out",
                  title_justify="left")
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    if "runs" in report:  # --repeats: one row per seed
        for column in ("seed", "epochs picked", "test mIoU (± fold std)"):
            table.add_column(column, justify="right")
        for r in report["runs"]:
            table.add_row(str(r["seed"]), " ".join(str(f["epoch"]) for f in r["folds"]),
                          f"{fmt(r['value'])} ± {fmt(r['std'])}")
        table.add_row("mean ± std over seeds", "", f"{fmt(report['value'])} ± {fmt(report['std'])}")
    else:
        for column in ("fold", "epoch", "val mIoU", "test mIoU"):
            table.add_column(column, justify="right")
        for f in report["folds"]:
            table.add_row(str(f["fold"]), str(f["epoch"]), fmt(f["val_miou"]), fmt(f["test_miou"]))
        table.add_row("mean", "", "", f"{fmt(report['value'])} ± {fmt(report['std'])}")
    console.print(table)


@cli_errors
def main(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Shards with images and gt_parts.png: the first --train-images "
                                                 "train, the rest are held out."),
    model: str = typer.Option("efficientnet_lite0", "--model", help="Backbone from the registry (`partkit models`)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Its weights: a file, a self-train run folder "
                                                                  "(backbone.pt), a hub tag or none."),
    train_images: int = typer.Option(10, "--train-images", "-n", help="Labelled images to fine-tune on (the first N)."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Held-out images after them [default: all]."),
    folds: int = typer.Option(5, "--folds", help="Folds of the held-out images: each picks the epoch, the rest score."),
    epochs: int = typer.Option(200, "--epochs", help="Training epochs (PARTICLE: 200)."),
    eval_every: int = typer.Option(5, "--eval-every", help="Label the held-out images every this many epochs "
                                                           "(PARTICLE's checkpoints: every 5)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Images per step (PARTICLE: 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate [default: 1e-4 CNN, 1e-5 ViT, as the paper]."),
    size: int = typer.Option(256, "--size", help="Images and labels are resized to SIZE x SIZE (PARTICLE: 256)."),
    part_map: Optional[str] = typer.Option(None, "--part-map", help="JSON {\"coarse part\": [ids or names], ...}: "
                                                                    "group ground-truth parts (unlisted ids are ignored)."),
    gt_field: str = typer.Option("gt_parts.png", "--gt-field", help="Ground-truth label-map field."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip + colour jitter while training."),
    repeats: int = typer.Option(1, "--repeats", help="Train R times (seeds SEED..SEED+R-1); mean ± std over the "
                                                     "runs' means (the fold std understates the spread)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the JSON report here instead of stdout."),
    skip_bad: SkipBadOption = False,
):
    """Fine-tune backbone + upsampling decoder on N labelled images; report cross-validated mIoU.

    Every --eval-every epochs the network labels the held-out images; each fold of them picks the
    epoch with its best mIoU and the other folds score it. Prints mean ± std mIoU over the folds
    (x100; a table on stderr, the JSON report on stdout or --json FILE).

    Example: partkit fewshot-seg ccp/ -n 10 --folds 5 --part-map ccp_coarse.json --weights runs/pc
    """
    from partkit.fewshot import fewshot_seg
    from partkit.io import write_atomic

    g = get_globals(ctx)
    if json_path:
        check_output_file(json_path, "--json")
    report = fewshot_seg(inputs, model=model, weights=weights, train_images=train_images, eval_images=eval_images,
                         folds=folds, epochs=epochs, eval_every=eval_every, batch_size=batch_size, lr=lr, size=size,
                         part_map=part_map, gt_field=gt_field, augment=augment, repeats=repeats, device=g.device, seed=g.seed,
                         handler=handler_for(skip_bad))
    if not g.quiet:
        print_table(report)
    text = json.dumps(report, indent=2)
    if json_path:
        write_atomic(json_path, (text + "\n").encode())
    else:
        typer.echo(text)
