"""List the backbone registry: family, source, local weights, feature layers."""
from __future__ import annotations

import json
import sys

import typer

from partkit._log import console

from ._common import cli_errors


@cli_errors
def main(
    pattern: str = typer.Argument("*", help="Only names matching this glob."),
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout instead of a table."),
):
    """Show every registered backbone; timm:ARCH[.TAG] and open_clip:ARCH/TAG also work anywhere a name does.

    Weights: "local" means usable offline (a file in $PARTKIT_WEIGHTS_DIR or a package that ships them);
    the others download from the hub on first use, as timm and open_clip do.
    """
    from partkit.models import describe, list_backbones, list_detectors

    rows = [describe(n) for n in list_backbones(pattern)]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    from rich.table import Table

    table = Table(title="partkit backbones", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("family", "source", "weights here", "layers", "default"):
        table.add_column(col, overflow="fold")
    for r in rows:
        weights = ("not needed" if r["family"] == "pixels" else
                   "yes (" + r["local_weights"].split(":", 1)[0] + ")" if r["local_weights"] else f"no (hub: {r['hub_tag']})")
        if r["family"] == "vit":
            layers = f"blocks 0..{r['num_layers'] - 1}, patch {r['reductions'][0]}"
        else:
            layers = f"stages 0..{r['num_layers'] - 1}, strides {'/'.join(map(str, r['reductions']))}"
        default = ",".join(map(str, r["default_layers"])) + (f" {r['default_facet']}" if r["default_facet"] else "")
        source = r["source"] + (f".{r['hub_tag']}" if r["hub_tag"] and r["source"].startswith("timm") else
                                f"/{r['hub_tag']}" if r["hub_tag"] else "")
        table.add_row(r["name"], r["family"], source, weights, layers, default)
    console.print(table)
    detectors = list_detectors(pattern)
    if detectors:
        console.print(f"detectors (partkit detect --model): {', '.join(detectors)}")
