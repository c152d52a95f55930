"""Shared CLI plumbing: global options, error handling, and the options every stage takes."""
from __future__ import annotations

import errno
import functools
import os
import sys
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from partkit._log import console
from partkit.errors import PartkitError
from partkit.io import Output
from partkit.io.sink import check_output_file, check_output_folder  # noqa: F401  (re-exported for the commands)


@dataclass
class Globals:
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    quiet: bool = False
    progress: Optional[bool] = None


def get_globals(ctx: typer.Context) -> Globals:
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, Globals) else Globals()


def fail(message: str, code: int = 2):
    """Print a one-line error to stderr and exit non-zero."""
    line = " ".join(str(message).split())
    console.print(f"partkit: error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn user errors into one stderr line and a non-zero exit, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PartkitError as e:
            fail(str(e))
        except BrokenPipeError:
            # The reader went away (`| head -c 100`): silence further writes to the dead pipe.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            fail("stdout was closed before all output was written (broken pipe)", code=1)
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except OSError as e:
            # a full disk or a read-only folder met while writing: one line, not a traceback
            if e.errno not in _WRITE_ERRNOS:
                raise
            where = f" {e.filename!r}" if e.filename else ""
            fail(f"cannot write{where}: {e.strerror}; free some space, fix the permissions or pick another output")

    return wrapper


# Options shared by every stage command, as typer types: `output: OutputOption = "-"` declares -o/--output and its
# help; the default stays in the command's signature (typer reads it from there).
InputsArgument = Annotated[List[str], typer.Argument(
    help="Input shards: paths, globs, {000000..000009} braces, '-' (stdin) or 'pipe:CMD'.")]
OutputOption = Annotated[str, typer.Option(
    "--output", "-o", help="'-' for stdout (tar stream) or a folder for numbered shards.")]
ShardSizeOption = Annotated[int, typer.Option("--shard-size", help="Samples per output shard (folder output).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Redo shards that a previous run finished.")]
DropOption = Annotated[List[str], typer.Option(
    "--drop", help="Remove this field from the output samples (repeatable).")]
SkipBadOption = Annotated[bool, typer.Option(
    "--skip-bad", help="Skip unreadable samples (counted in the stats) instead of stopping.")]
NumShardsOption = Annotated[Optional[int], typer.Option(
    "--num-shards", help="Split the input shards over this many processes.")]
ShardIndexOption = Annotated[Optional[int], typer.Option(
    "--shard-index", help="Which of the --num-shards processes this is.")]


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}

# Largest image side a --size option may ask for (a 100,000-pixel side would allocate tens of GB);
# raise it with PARTKIT_MAX_SIDE.
MAX_SIDE = 4096


def check_seed(seed: Optional[int], opt: str = "--seed") -> None:
    if seed is not None and seed < 0:
        raise PartkitError(f"{opt} must be 0 or more, got {seed}; pick a non-negative seed")


def check_side(value: Optional[int], opt: str = "--size") -> None:
    """Refuse a pixel-size option outside 1..PARTKIT_MAX_SIDE before any work."""
    if value is None:
        return
    try:
        limit = int(os.environ.get("PARTKIT_MAX_SIDE", MAX_SIDE))
    except ValueError:
        raise PartkitError("PARTKIT_MAX_SIDE must be a whole number of pixels") from None
    if value < 1 or value > limit:
        raise PartkitError(f"{opt} {value} is outside 1..{limit} pixels; pick a smaller size or raise "
                           "PARTKIT_MAX_SIDE")


def parse_ints(text: Optional[str], opt: str) -> Optional[List[int]]:
    """``"2,3,-1"`` -> ``[2, 3, -1]``; ``None`` or empty -> ``None``; anything else a one-line error."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PartkitError(f"{opt} must be comma-separated integers, got {text!r}") from None


def make_output(output: str, shard_size: int, overwrite: bool, drop: List[str],
                num_shards: Optional[int], shard_index: Optional[int]) -> Output:
    return Output(path=output, shard_size=shard_size, overwrite=overwrite, drop=tuple(drop),
                  num_shards=num_shards, shard_index=shard_index)
