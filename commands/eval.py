"""Score part predictions against ground truth: nmi, ari, miou, ar, mask-ap, retrieval, miou-3d, probe,
part-cls, linear-seg, kpt-regression.

Metric names come first, then the input shards (default: stdin):
  partkit eval nmi ari miou parts/{000000..000009}.tar --region full
  partkit eval miou ar preds.tar --protocol partdistillation
A table goes to stderr and the JSON report to stdout (or --json FILE).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

from partkit._log import console
from partkit.errors import PartkitError
from partkit.evaluate._registry import fmt
from partkit.evaluate import METRICS, PROTOCOLS, EvalOptions, evaluate, get_metric, list_metrics

from ._common import SkipBadOption, check_output_file, check_output_folder, cli_errors, get_globals, parse_ints

_INPUT_CHARS = set("/.*?{[-:")
# CLI parameter -> EvalOptions field, where the names differ
_FIELD = {"kpt_min_v": "kpt_min_visibility", "viz": "viz_dir"}


def given_options(ctx: typer.Context) -> list[str]:
    """EvalOptions fields whose option was typed on the command line (or set by environment)."""
    def typed(name: str) -> bool:  # by name: typer may bring its own copy of click's enum
        source = ctx.get_parameter_source(name)
        return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")

    return [_FIELD.get(name, name) for name in ctx.params if typed(name) and name not in ("args", "json_path",
                                                                                           "protocol")]


def split_args(args: List[str]) -> tuple[list[str], list[str]]:
    """Leading metric names, then inputs; a metric name after an input is an error."""
    known = list_metrics()
    choices = ", ".join(known)
    metrics, inputs = [], []
    for arg in args:
        if arg in known and not inputs:
            metrics.append(arg)
        elif arg in known:
            raise PartkitError(f"metric {arg!r} comes after the input {inputs[0]!r}; put metric names first")
        elif not metrics:
            raise PartkitError(f"unknown metric {arg!r}; choose from {choices} (metric names come first)")
        elif not inputs and not os.path.exists(arg) and not _INPUT_CHARS & set(arg):
            raise PartkitError(f"unknown metric {arg!r} and no such file; choose from {choices}")
        else:
            inputs.append(arg)
    if not metrics:
        raise PartkitError(f"no metric given; choose from {choices}")
    return metrics, inputs or ["-"]


def _load_json(path: Optional[str], opt: str):
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PartkitError(f"cannot read {opt} {path!r}: {e}") from None


def print_table(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"partkit eval: {report['samples']} samples", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("protocol")
    for name, result in report["metrics"].items():
        table.add_row(name, *get_metric(name).summary_row(result))  # each metric's registered summary
    console.print(table)
    parts = part_rows(report)
    if parts:
        per_part = Table(title="miou per part", title_justify="left")
        one_class = len({row[0] for row in parts}) == 1
        for column in ("class", "id", "part", "IoU")[int(one_class):]:
            per_part.add_column(column, justify="right" if column in ("id", "IoU") else "left")
        for row in parts:
            per_part.add_row(*row[int(one_class):])
        console.print(per_part)


def part_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(class, id, name, IoU) rows of the miou result's parts, when the samples name their parts."""
    names = report.get("part_names") or {}
    result = report["metrics"].get("miou")
    if not names or not result:
        return []
    classes = result.get("per_class") or {"": result}
    rows = []
    for cat, entry in classes.items():
        for i, iou in entry.get("iou", {}).items():
            rows.append((cat, i, names.get(i, "-"), fmt(iou)))
    return rows


@cli_errors
def main(
    ctx: typer.Context,
    args: List[str] = typer.Argument(..., metavar="METRIC... [SHARD]",
                                     help=f"Metrics ({', '.join(METRICS)}), then input shards (default '-', stdin)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help=f"Option preset of a paper's evaluation "
                                           f"({', '.join(PROTOCOLS)}); options given explicitly override it."),
    pred: Optional[str] = typer.Option(None, "--pred", help="Predicted field [default: parts.png; pred_parts.npy "
                                                            "for miou-3d]."),
    gt_field: Optional[str] = typer.Option(None, "--gt-field", help="Ground-truth field [default: gt_parts.png; "
                                                                    "gt_parts.npy for miou-3d]."),
    region: str = typer.Option("fg", "--region", help="nmi/ari, miou --miou pooled, probe: fg: ground-truth "
                                                      "foreground pixels only; full: background is a label too."),
    at: str = typer.Option("pixels", "--at", help="nmi/ari at pixels, or at visible ground-truth keypoints (CUB)."),
    match: str = typer.Option("majority", "--match", help="Cluster-to-part matching for miou/miou-3d: majority "
                                                          "(many-to-one), hungarian (one-to-one) or none."),
    miou: str = typer.Option("official", "--miou", help="miou computation: official (PartDistillation's "
                                                        "evaluator: per object class, background counted) or "
                                                        "pooled (one table over --region pixels)."),
    match_on: List[str] = typer.Option([], "--match-on", help="Fit the matching on these shards (repeatable) "
                                                              "instead of the scored ones."),
    proposals: str = typer.Option("proposals.json", "--proposals", help="Field with scored RLE proposals (ar, mask-ap)."),
    gt: str = typer.Option("parts", "--gt", help="ar/mask-ap ground truth: parts (one mask per id in gt_parts.png) "
                                                 "or objects (gt_objects.json)."),
    ks: str = typer.Option("1,10,50,100,200", "--ks", help="k values for AR@k."),
    max_dets: int = typer.Option(100, "--max-dets", help="Detections per image for mask-ap."),
    feat: str = typer.Option("feat.npy", "--feat", help="Feature field (retrieval, probe)."),
    patch: int = typer.Option(3, "--patch", help="retrieval: pool a PATCH x PATCH window of cells per keypoint."),
    exclude_self: bool = typer.Option(True, "--exclude-self/--include-self", help="retrieval: leave the query out "
                                      "of its ranking (Zhu et al.) or rank it too."),
    kpt_min_v: int = typer.Option(1, "--kpt-min-v", help="Use keypoints with visibility v >= this (COCO: 2 visible)."),
    category_parts: Optional[str] = typer.Option(None, "--category-parts", help="miou-3d: JSON file {category: "
                                                                                "[part ids]} [default: ids in data]."),
    probe_train: int = typer.Option(10, "--probe-train", help="probe: train on the first N images, score the rest."),
    probe_target: str = typer.Option("part", "--probe-target", help="probe classification target: part or category."),
    probe_c: float = typer.Option(1.0, "--probe-c", help="probe: inverse L2 regularisation strength."),
    probe_lr: Optional[float] = typer.Option(None, "--probe-lr", help="part-cls, linear-seg: learning rate "
                                                                      "[default: Zhu et al.'s, SGD 0.4 / AdamW 4e-4]."),
    probe_batch: Optional[int] = typer.Option(None, "--probe-batch", help="part-cls, linear-seg: batch size "
                                                                          "[default: Zhu et al.'s, 1024 / 16]."),
    probe_epochs: int = typer.Option(90, "--probe-epochs", help="part-cls: SGD epochs (Zhu et al.: 90)."),
    probe_iters: int = typer.Option(2000, "--probe-iters", help="linear-seg: AdamW iterations (Zhu et al. and "
                                                                "--protocol zhu: 160000)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the JSON report here instead of stdout."),
    viz: Optional[str] = typer.Option(None, "--viz", help="Also draw overlays, purity grid and confusion map here."),
    viz_max: int = typer.Option(16, "--viz-max", help="Overlays for the first N samples."),
    skip_bad: SkipBadOption = False,
    average: str = typer.Option("pooled", "--average", help="nmi/ari value: pooled over the dataset, or class: the "
                                                            "mean over object classes ('category' in json)."),
    kpt_train: int = typer.Option(0, "--kpt-train", help="kpt-regression without --match-on: fit on the first N "
                                                         "images, score the rest."),
    kpt_norm: str = typer.Option("bbox", "--kpt-norm", help="kpt-regression coordinates and error normalised by the "
                                                            "object box (gt_objects.json) or the image size."),
    retrieval_features: str = typer.Option("pooled-cells", "--retrieval-features", help="retrieval: pooled-cells "
                                           "(--patch windows of feat.npy) or patches (kpt_feat.npy: crops around "
                                           "keypoints, `extract --patches-at keypoints`; Zhu et al.)."),
    kpt_feat: str = typer.Option("kpt_feat.npy", "--kpt-feat", help="retrieval patches: per-keypoint feature field."),
):
    """Score part predictions against ground truth: nmi, ari, miou, ar, mask-ap, retrieval, miou-3d, probe,
    part-cls, linear-seg, kpt-regression.

    Metric names come first, then input shards (default: stdin). A table goes to stderr and
    the JSON report to stdout (or --json FILE); scores are x100.
    """
    g = get_globals(ctx)
    metrics, inputs = split_args(args)
    if json_path:
        check_output_file(json_path, "--json")
    if viz:
        check_output_folder(viz, "--viz")
    options = EvalOptions(
        protocol=protocol, given=given_options(ctx), miou=miou, pred=pred, gt_field=gt_field, region=region, at=at,
        match=match, match_on=match_on, proposals=proposals,
        gt=gt, ks=parse_ints(ks, "--ks") or [], max_dets=max_dets, feat=feat, patch=patch, exclude_self=exclude_self,
        kpt_min_visibility=kpt_min_v, category_parts=_load_json(category_parts, "--category-parts"),
        probe_train=probe_train, probe_target=probe_target, probe_c=probe_c, probe_lr=probe_lr,
        probe_batch=probe_batch, probe_epochs=probe_epochs, probe_iters=probe_iters, seed=g.seed, skip_bad=skip_bad,
        viz_dir=viz, viz_max=viz_max, average=average, kpt_train=kpt_train, kpt_norm=kpt_norm,
        retrieval_features=retrieval_features, kpt_feat=kpt_feat)
    options.validate(metrics)
    report = evaluate(inputs, metrics, options)
    if not g.quiet:
        print_table(report)
    text = json.dumps(report, indent=2, sort_keys=False)
    if json_path:
        from partkit.io import write_atomic

        write_atomic(json_path, (text + "\n").encode())
    else:
        typer.echo(text)
