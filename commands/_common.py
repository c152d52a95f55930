"""Shared CLI plumbing: global options, error handling, and the options every stage takes."""
from __future__ import annotations

import errno
import functools
import inspect
import json
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
    help="Input shards: paths, globs, {000000..000009} braces, '-' (stdin), 'pipe:CMD' or http(s)://, s3://, gs:// URLs.")]
OutputOption = Annotated[str, typer.Option(
    "--output", "-o", help="'-' for stdout (tar stream), 'pipe:CMD' (the stream into CMD) or a folder for numbered shards.")]
ShardSizeOption = Annotated[int, typer.Option("--shard-size", help="Samples per output shard (folder output).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Redo shards that a previous run finished.")]
DropOption = Annotated[List[str], typer.Option(
    "--drop", help="Remove this field from the output samples (repeatable).")]
LogOption = Annotated[str, typer.Option(
    "--log", help="jsonl: metrics.jsonl in the run folder; tensorboard: also TensorBoard event files there (needs "
                  "pip install \"partkit[tensorboard]\").")]
TrainObjectsOption = Annotated[Optional[str], typer.Option(
    "--objects-from", help="Object masks of training images: gt_objects, gt_parts (all labelled pixels) or "
                           "saliency (extract --saliency, above --fg-threshold) [default: gt_objects.json when "
                           "a sample has it, else none].")]
TrainFgThresholdOption = Annotated[float, typer.Option(
    "--fg-threshold", help="With --objects-from saliency: saliency above this is the object (as cluster).")]
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


# --------------------------------------------------------------------------------------------
# --config FILE: every command's options from a file; flags on the command line win


_GLOBAL_KEYS = ("seed", "device", "threads")


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PartkitError(f"--config {path!r}: {e.strerror}; check the path") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                data = json.loads(text)
            else:
                data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001  json.JSONDecodeError or yaml.YAMLError
        raise PartkitError(f"--config {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML/JSON'}: "
                           f"{' '.join(str(e).split())}") from None
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        data = data["options"]  # the config.json a training run wrote
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise PartkitError(f"--config {path!r} must be a flat mapping {{option: value}} (e.g. {{\"lr\": 0.001, "
                           "\"batch_size\": 8}}), or the config.json of a run that recorded its \"options\"")
    return data


def _apply_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """Eager: runs before the other options are read, so they take their defaults from the file."""
    if not value:
        return value
    try:
        data = _read_config(value)
    except PartkitError as e:
        fail(str(e))
    names = [p.name for p in ctx.command.params if p.name != "config"]
    mapping, unknown = {}, []
    for key, v in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in names:
            mapping[name] = v
        elif name in _GLOBAL_KEYS:
            _apply_global(ctx, name, v)
        else:
            unknown.append(str(key))
    if unknown:
        fail(f"--config {value!r}: unknown option(s) {', '.join(sorted(unknown))} for "
             f"'{ctx.command_path}'; valid: {', '.join(sorted(names + list(_GLOBAL_KEYS)))}")
    ctx.default_map = {**(ctx.default_map or {}), **mapping}
    return value


def _apply_global(ctx: typer.Context, name: str, value) -> None:
    """seed/device/threads from a config file, unless given on the command line before the command."""
    root = ctx.find_root()
    source = root.get_parameter_source(name)  # typer's own click copy: compare the enum by name
    if source is not None and source.name != "DEFAULT":
        return
    g = root.obj if isinstance(root.obj, Globals) else None
    if g is None:
        return
    if name == "seed":
        check_seed(int(value))
        g.seed = int(value)
    elif name == "device":
        g.device = str(value)
    else:
        from partkit._runtime import set_threads

        g.threads = int(value)
        set_threads(g.threads)


def with_config(fn):
    """``fn`` (a typer command) plus an eager ``--config FILE`` option; the resolved options are recorded."""

    sig = inspect.signature(fn, eval_str=True)  # typer does not evaluate a given __signature__
    contexts = {name for name, p in sig.parameters.items() if p.annotation is typer.Context}

    @functools.wraps(fn)
    def wrapper(*args, config: Optional[str] = None, **kwargs):
        from partkit._runtime import set_command_options

        set_command_options({k: v for k, v in kwargs.items() if k not in contexts})
        try:
            return fn(*args, **kwargs)
        finally:
            set_command_options(None)

    option = typer.Option(None, "--config", is_eager=True, callback=_apply_config, metavar="FILE",
                          help="Options from a file: YAML (when PyYAML is installed) or JSON, flat {option: value}, "
                               "or a run's config.json; flags given here override it.")
    params = list(sig.parameters.values())
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option,
                                    annotation=Optional[str]))
    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "config": Optional[str]}
    return wrapper
