"""Input specs to a sorted list of shard URLs, and URLs to byte streams.

An input is a path, a glob, a brace pattern (``data-{000000..000009}.tar``), a folder
(all ``*.tar`` in it), ``-`` (stdin) or ``pipe:CMD``.

Only the literal argument the user typed may be ``-`` or a ``pipe:`` command: whatever a glob,
brace pattern or folder listing produced is a path (a file named ``pipe:...`` comes back as
``./pipe:...``), and a path that exists as typed is used as typed, before any expansion.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import BinaryIO, Callable, Iterator, Sequence

from braceexpand import braceexpand

from ..errors import PartkitError

__all__ = ["expand_paths", "expand_urls", "open_url", "select_for_rank", "as_path", "is_stream"]

_GLOB_CHARS = set("*?[")


def expand_paths(specs: Sequence[str], folder_files: Callable[[str], list[str]], what: str) -> list[str]:
    """Expand paths, globs, brace patterns and folders (via ``folder_files``) into sorted file lists.

    Each spec's matches are sorted; spec order is kept. ``what`` names the files in errors.
    """
    found: list[str] = []
    for spec in specs:
        # a path that exists as typed is used as typed ('img[1].jpg' is not a glob when the file exists)
        parts = [spec] if os.path.exists(spec) else braceexpand(spec)
        for part in parts:
            if os.path.isdir(part):
                files = folder_files(part)
                if not files:
                    raise PartkitError(f"folder {part!r} holds no {what}; point at the files or a glob")
                found.extend(sorted(files))
            elif os.path.exists(part):
                found.append(part)
            elif _GLOB_CHARS & set(part):
                files = sorted(glob.glob(part))
                if not files:
                    raise PartkitError(f"pattern {part!r} matches no file; check the path")
                found.extend(files)
            else:
                raise PartkitError(f"input {part!r} does not exist; check the path")
    return [as_path(p) for p in found]


def as_path(path: str) -> str:
    """``path`` spelt so that :func:`open_url` reads it as a file: never ``-`` or a ``pipe:`` command."""
    if path == "-" or path.startswith("pipe:"):
        return os.path.join(".", path)
    return path


def is_stream(url: str) -> bool:
    """True for ``-`` (stdin) and ``pipe:CMD``: inputs that can be read only once and have no size or mtime."""
    return url == "-" or url.startswith("pipe:")


def expand_urls(inputs: Sequence[str]) -> list[str]:
    """Expand input specs into shard URLs; ``-`` and ``pipe:CMD`` pass through, folders give their ``*.tar``.

    >>> expand_urls(["shards/{000000..000001}.tar"])  # doctest: +SKIP
    ['shards/000000.tar', 'shards/000001.tar']
    """
    urls: list[str] = []
    for spec in inputs:
        if is_stream(spec):  # only the literal argument: expansions below give paths
            urls.append(spec)
        else:
            urls.extend(expand_paths([spec], lambda d: glob.glob(os.path.join(glob.escape(d), "*.tar")),
                                     ".tar shards"))
    return urls


def select_for_rank(urls: list[str], rank: int, world: int) -> list[str]:
    """The disjoint, deterministic subset of shards that process ``rank`` of ``world`` reads."""
    if world <= 1:
        return urls
    return urls[rank::world]


class _PipeStream:
    """A ``pipe:CMD`` stream; closing it checks the command's exit status."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)
        self.stream = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def close(self) -> None:
        self.stream.close()
        rc = self.proc.wait()
        if rc != 0:
            raise PartkitError(f"input command {self.cmd!r} exited with status {rc}")


def open_url(url: str) -> BinaryIO:
    """Open a URL for reading bytes: ``-`` is stdin, ``pipe:CMD`` runs CMD, else a local file."""
    if url == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise PartkitError("input is '-' but stdin is a terminal; pipe shards in or name input files")
        return sys.stdin.buffer
    if url.startswith("pipe:"):
        return _PipeStream(url[5:])  # type: ignore[return-value]
    try:
        return open(url, "rb")
    except OSError as e:
        raise PartkitError(f"cannot open input {url!r}: {e.strerror}") from None


def iter_streams(urls: Sequence[str]) -> Iterator[tuple[str, BinaryIO]]:
    for url in urls:
        stream = open_url(url)
        try:
            yield url, stream
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
