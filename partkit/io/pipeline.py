"""Read samples (the one reading loop, with the bad-sample handler) and run per-sample stages.

Every stage reads through :func:`iter_samples` / :func:`iter_loaded` or :func:`run_stage`, which
hand each bad sample (and unreadable shard) to the run's handler (:mod:`partkit.errors`: ``stop``
or ``SkipBad``); no other code decides whether a bad sample stops the run.

Output shard ``j`` holds the results of input samples ``j*shard_size .. (j+1)*shard_size-1``
(of this process's inputs), so a rerun can skip finished shards without recomputing them.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from .._log import log, progress
from .._version import __version__
from ..errors import BadSample, Handler, PartkitError, stop
from .sink import is_folder_output, open_sink
from .tario import iter_tar, unique_keys
from .urls import expand_urls, iter_streams, select_for_rank

T = TypeVar("T")

__all__ = ["Output", "dist_info", "iter_samples", "iter_loaded", "run_stage"]


@dataclass
class Output:
    """Where a stage writes: ``path`` is ``-`` (stdout) or a folder of shards."""

    path: Optional[str] = "-"
    shard_size: int = 1000
    overwrite: bool = False
    drop: Sequence[str] = ()
    num_shards: Optional[int] = None  # process count for manual distribution
    shard_index: Optional[int] = None  # this process's index

    def __post_init__(self):
        if self.shard_size < 1:
            raise PartkitError(f"--shard-size must be at least 1, got {self.shard_size}")


def dist_info(num_shards: Optional[int] = None, shard_index: Optional[int] = None) -> tuple[int, int]:
    """(rank, world): from ``--num-shards/--shard-index`` or torchrun's RANK/WORLD_SIZE."""
    if (num_shards is None) != (shard_index is None):
        raise PartkitError("--num-shards and --shard-index go together; give both or neither")
    if num_shards is not None:
        world, rank = num_shards, shard_index
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise PartkitError(f"shard index {rank} is outside 0..{world - 1}; use 0 <= --shard-index < --num-shards")
    return rank, world


def iter_samples(inputs: Sequence[str], *, handler: Handler = stop, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """Samples from input specs (paths, globs, braces, ``-``, ``pipe:``), in order.

    A corrupt shard raises :class:`PartkitError` under :func:`~partkit.errors.stop`; any other
    handler gets it as ``BadSample(None, message)`` and reading goes on with the next shard.
    A key seen twice is an error.
    """
    urls = select_for_rank(expand_urls(inputs), rank, world)
    on_error = None if handler is stop else (lambda msg: handler(BadSample(None, msg)))

    def samples() -> Iterator[dict]:
        for url, stream in iter_streams(urls):
            yield from iter_tar(stream, url, on_error=on_error)

    yield from unique_keys(samples())


def iter_loaded(inputs: Sequence[str], load: Callable[[dict], T], *, handler: Handler = stop, rank: int = 0,
                world: int = 1) -> Iterator[T]:
    """``load(sample)`` for every sample; a :class:`BadSample` it raises goes to ``handler``.

    >>> for item in iter_loaded(["feats.tar"], fields.features, handler=SkipBad()): ...  # doctest: +SKIP
    """
    for sample in iter_samples(inputs, handler=handler, rank=rank, world=world):
        try:
            item = load(sample)
        except BadSample as bad:
            handler(bad)
            continue
        yield item


def _prepared(samples: Iterator[tuple[int, dict]], prepare: Optional[Callable], workers: int, lookahead: int):
    """(index, sample, prepared-or-BadSample) in order; ``prepare`` runs ahead in threads."""
    def call(sample):
        try:
            return prepare(sample)
        except BadSample as e:
            return e

    if prepare is None:
        for idx, s in samples:
            yield idx, s, s
        return
    if workers <= 0:
        for idx, s in samples:
            yield idx, s, call(s)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="partkit-prepare") as pool:
        queue: deque = deque()
        for idx, s in samples:
            queue.append((idx, s, pool.submit(call, s)))
            if len(queue) >= lookahead:
                i, smp, fut = queue.popleft()
                yield i, smp, fut.result()
        while queue:
            i, smp, fut = queue.popleft()
            yield i, smp, fut.result()


@dataclass
class _ShardState:
    shard: int = -1
    open: bool = False
    count: int = 0
    skipped: list = field(default_factory=list)


def run_stage(
    inputs: Sequence[str],
    process: Callable[[list], list],
    *,
    output: Output = Output(),
    name: str = "stage",
    batch_size: int = 1,
    prepare: Optional[Callable[[dict], object]] = None,
    prepare_workers: int = 1,
    handler: Handler = stop,
    config: Optional[dict] = None,
    source: Optional[Callable[[int, int], Iterator[dict]]] = None,
    input_files: Optional[Sequence[str]] = None,
) -> dict:
    """Stream samples through ``process`` and write the results.

    ``prepare(sample)`` runs ahead in worker threads (decode, resize) and may raise
    :class:`BadSample`; ``process(list_of_prepared)`` returns one output sample dict (or a
    :class:`BadSample`) per item, in order; each bad sample goes to ``handler`` and, when it
    returns, is recorded in its shard's stats. ``source(rank, world)`` replaces reading ``inputs``
    as shards (``pack`` reads files; distill-3d replays what it read). ``input_files`` (default: the
    expanded ``inputs``; ``pack`` passes its files) are what
    a folder output must not hold and what its resume check fingerprints. Returns a summary dict.
    """
    rank, world = dist_info(output.num_shards, output.shard_index)
    config = {"stage": name, **(config or {}), "shard_size": output.shard_size, "world": world}
    if input_files is None:
        input_files = expand_urls(inputs) if is_folder_output(output.path) else ()
    sink = open_sink(output.path, overwrite=output.overwrite, rank=rank, world=world, config=config,
                     inputs=input_files)
    drop = set(output.drop)
    shard_size = output.shard_size
    read_errors: list[str] = []

    def on_read_error(bad: BadSample) -> None:
        handler(bad)
        read_errors.append(bad.reason)

    state = _ShardState()
    totals = {"read": 0, "written": 0, "skipped": 0, "resumed_samples": 0, "shards": 0}

    def advance(index: int) -> None:
        shard = index // shard_size
        if shard != state.shard:
            if state.open:
                close_shard()
            state.shard, state.count, state.skipped = shard, 0, []
            sink.start(shard)
            state.open = True

    def close_shard() -> None:
        sink.finish(state.shard, {"count": state.count, "skipped": len(state.skipped),
                                  "skipped_samples": state.skipped, "partkit_version": __version__})
        totals["shards"] += 1
        state.open = False

    def emit(index: int, result) -> None:
        advance(index)
        if isinstance(result, BadSample):
            handler(result)
            state.skipped.append(result.record())
            totals["skipped"] += 1
            return
        for f in drop:
            result.pop(f, None)
        sink.write(result)
        state.count += 1
        totals["written"] += 1

    def todo() -> Iterator[tuple[int, dict]]:
        samples = (source(rank, world) if source is not None else
                   iter_samples(inputs, handler=handler if handler is stop else on_read_error, rank=rank,
                                world=world))
        for index, sample in enumerate(samples):
            totals["read"] += 1
            if sink.is_done(index // shard_size):
                totals["resumed_samples"] += 1
                continue
            yield index, sample

    stream = _prepared(todo(), prepare, prepare_workers, 2 * batch_size + 2)
    try:
        with progress(f"{name}") as bar:
            batch: list = []

            def flush() -> None:
                good = [(i, p) for i, _, p in batch if not isinstance(p, BadSample)]
                results = process([p for _, p in good]) if good else []
                if len(results) != len(good):
                    raise RuntimeError(f"{name}: process returned {len(results)} results for {len(good)} samples")
                by_index = dict(zip((i for i, _ in good), results))
                for i, _, p in batch:
                    emit(i, p if isinstance(p, BadSample) else by_index[i])
                bar.update(len(batch))
                batch.clear()

            for index, sample, prepared in stream:
                if batch and index // shard_size != batch[0][0] // shard_size:
                    flush()  # batches never straddle shards, so a shard closes as soon as it is full
                batch.append((index, sample, prepared))
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
            if state.open:
                close_shard()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        stream.close()  # close the readers (and worker threads) even when a sample stopped the run
    if totals["read"] == 0 and not (world > 1 and (source is not None or not select_for_rank(expand_urls(inputs), rank, world))):
        raise PartkitError(f"{name}: the input holds no samples; check the input shards (are they empty?)")
    for msg in read_errors:
        log(f"{name}: skipped unreadable input: {msg}")
    where = "stdout" if sink.name == "-" else sink.name
    resumed = f", {totals['resumed_samples']} already done" if totals["resumed_samples"] else ""
    skipped = f", {totals['skipped']} skipped" if totals["skipped"] else ""
    log(f"{name}: wrote {totals['written']} samples to {where}{skipped}{resumed}")
    return totals
