"""The ``partkit`` root command: global options plus every subcommand."""
from __future__ import annotations

import importlib
from typing import Optional

import typer

from partkit import __version__
from partkit._log import set_verbosity

from ._common import Globals, check_seed, cli_errors, with_config

app = typer.Typer(
    name="partkit",
    help="Discover and segment object parts without part labels. Stages read and write WebDataset tar "
         "shards, so they pipe: partkit pack IMAGES | partkit extract | partkit cluster | partkit eval nmi",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# (module in this package, command name): each module defines `main` (one command) or `app` (a group).
_COMMANDS = [
    ("pack", "pack"),
    ("extract", "extract"),
    ("detect", "detect"),
    ("models", "models"),
    ("cluster", "cluster"),
    ("train_decoder", "train-decoder"),
    ("predict", "predict"),
    ("self_train", "self-train"),
    ("fewshot_seg", "fewshot-seg"),
    ("distill3d", "distill-3d"),
    ("eval", "eval"), ("show", "show"),
    ("rank", "rank"),
    ("export", "export"),
]


def _version(value: bool):
    if value:
        typer.echo(f"partkit {__version__}")
        raise typer.Exit()


@app.callback()
@cli_errors
def root(
    ctx: typer.Context,
    seed: int = typer.Option(0, "--seed", help="Random seed for everything stochastic (recorded in outputs)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch, BLAS and faiss."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress bars on stderr (default: when stderr is a terminal)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    from partkit._runtime import set_threads

    check_seed(seed)
    ctx.obj = Globals(seed=seed, device=device, threads=threads, quiet=quiet, progress=progress)
    set_verbosity(quiet=quiet, show_progress=progress)
    set_threads(threads)


for _module, _name in _COMMANDS:
    _mod = importlib.import_module(f".{_module}", __package__)
    if hasattr(_mod, "app"):
        for _info in _mod.app.registered_commands:  # every command takes --config FILE
            _info.callback = with_config(_info.callback)
        app.add_typer(_mod.app, name=_name)
    else:
        app.command(_name, short_help=_mod.__doc__.strip().splitlines()[0])(with_config(_mod.main))


def main() -> None:
    app()
