"""The one stderr console: logs, tables and progress bars never touch stdout."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console

__all__ = ["console", "log", "set_verbosity", "progress"]

console = Console(stderr=True, highlight=False)
_state = {"quiet": False, "progress": None}  # progress: None = auto (stderr is a terminal)


def set_verbosity(quiet: bool = False, show_progress: Optional[bool] = None) -> None:
    _state["quiet"] = quiet
    _state["progress"] = show_progress


def log(message: str) -> None:
    if not _state["quiet"]:
        console.print(message, markup=False, soft_wrap=True)  # one log line stays one line in files


class _NoProgress:
    def update(self, advance: int = 1) -> None:
        pass


class _RichProgress:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def update(self, advance: int = 1) -> None:
        self.bar.update(self.task, advance=advance)


@contextmanager
def progress(description: str, total: Optional[int] = None) -> Iterator[object]:
    """A progress bar on stderr, shown when stderr is a terminal or ``--progress`` was given."""
    show = _state["progress"]
    if show is None:
        show = sys.stderr.isatty()
    if _state["quiet"] or not show:
        yield _NoProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, redirect_stdout=False, redirect_stderr=False,
                  transient=False) as bar:
        yield _RichProgress(bar, bar.add_task(description, total=total))
