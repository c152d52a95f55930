"""Input specs to a sorted list of shard URLs, and URLs to byte streams.

An input is a path, a glob, a brace pattern (``data-{000000..000009}.tar``), a folder
(all ``*.tar`` in it), ``-`` (stdin), ``pipe:CMD``, or a remote URL: ``http://``, ``https://``
(streamed with urllib), ``s3://`` and ``gs://`` (fsspec when it has the protocol, else the
``aws`` / ``gsutil`` command-line client). A URL's brace pattern expands; URLs are never globbed.

Only the literal argument the user typed may be ``-``, a ``pipe:`` command or a URL: whatever a
glob, brace pattern or folder listing of local files produced is a path (a file named ``pipe:...``
or ``http:...`` comes back as ``./pipe:...``), and a path that exists as typed is used as typed,
before any expansion.
"""
from __future__ import annotations

import glob
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO, Callable, Iterator, Sequence

from braceexpand import braceexpand

from ..errors import PartkitError

__all__ = ["expand_paths", "expand_urls", "open_url", "select_for_rank", "as_path", "is_stream", "is_remote",
           "has_no_mtime"]

_GLOB_CHARS = set("*?[")
_REMOTE = ("http://", "https://", "s3://", "gs://")
# the command-line client for each cloud scheme: (program, argv before the URL, argv after it)
_CLIENTS = {"s3://": ("aws", ["aws", "s3", "cp"], ["-"]), "gs://": ("gsutil", ["gsutil", "cat"], [])}


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
    """``path`` spelt so that :func:`open_url` reads it as a file: never ``-``, a ``pipe:`` command or a URL."""
    if is_stream(path) or _looks_remote(path):
        return os.path.join(".", path)
    return path


def is_stream(url: str) -> bool:
    """True for ``-`` (stdin) and ``pipe:CMD``: inputs that can be read only once and have no size or mtime."""
    return url == "-" or url.startswith("pipe:")


def _looks_remote(path: str) -> bool:
    # case-insensitive, and 'http:/x' too: a glob match spelt with one slash must not pass for a URL either
    return path.lower().startswith(tuple(p[:-1] for p in _REMOTE))


def is_remote(url: str) -> bool:
    """True for ``http://``, ``https://``, ``s3://`` and ``gs://`` URLs: readable again, but with no mtime."""
    return url.startswith(_REMOTE)


def has_no_mtime(url: str) -> bool:
    """Streams and remote URLs: inputs a resume fingerprint cannot compare (no local size and mtime)."""
    return is_stream(url) or is_remote(url)


def expand_urls(inputs: Sequence[str]) -> list[str]:
    """Expand input specs into shard URLs; ``-`` and ``pipe:CMD`` pass through, folders give their ``*.tar``,
    a URL's brace pattern expands (no glob: ``?`` and ``[`` belong to URLs).

    >>> expand_urls(["shards/{000000..000001}.tar"])  # doctest: +SKIP
    ['shards/000000.tar', 'shards/000001.tar']
    """
    urls: list[str] = []
    for spec in inputs:
        if is_stream(spec):  # only the literal argument: expansions below give paths
            urls.append(spec)
        elif is_remote(spec):  # the scheme comes before any brace, so every expansion keeps it
            urls.extend(braceexpand(spec))
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
            raise self.failed(rc)

    def failed(self, rc: int) -> PartkitError:
        return PartkitError(f"input command {self.cmd!r} exited with status {rc}")


def _timeout() -> float:
    try:
        return float(os.environ.get("PARTKIT_URL_TIMEOUT", 60))
    except ValueError:
        raise PartkitError("PARTKIT_URL_TIMEOUT must be a number of seconds") from None


class _HttpStream:
    """An ``http(s)://`` response read as it arrives; a failure mid-stream is a one-line error."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.resp = urllib.request.urlopen(url, timeout=_timeout())
        except urllib.error.HTTPError as e:
            raise PartkitError(f"cannot read {url!r}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise PartkitError(f"cannot read {url!r}: {reason}") from None

    def read(self, n: int = -1) -> bytes:
        try:
            return self.resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise PartkitError(f"cannot read {self.url!r}: {e or type(e).__name__}") from None

    def close(self) -> None:
        self.resp.close()


class _ClientStream(_PipeStream):
    """An ``s3://`` or ``gs://`` object through its command-line client; closing checks its exit status."""

    def __init__(self, url: str):
        scheme = url[:url.index("://") + 3]
        program, before, after = _CLIENTS[scheme]
        if shutil.which(program) is None:
            raise PartkitError(f"cannot read {url!r}: {scheme} inputs need the {program!r} command-line client "
                               f"(or fsspec with {'s3fs' if scheme == 's3://' else 'gcsfs'}); install one")
        self.url = url
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(before + [url] + after, stdout=subprocess.PIPE, stderr=self.err)
        self.stream = self.proc.stdout

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.err.close()

    def failed(self, rc: int) -> PartkitError:
        self.err.seek(0)
        lines = self.err.read().decode(errors="replace").strip().splitlines()
        why = f": {lines[-1]}" if lines else ""
        return PartkitError(f"cannot read {self.url!r}: {self.proc.args[0]} exited with status {rc}{why}")


def _open_cloud(url: str):
    try:
        import fsspec
    except ImportError:
        return _ClientStream(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):  # fsspec without s3fs / gcsfs
        return _ClientStream(url)
    try:
        return fs.open(path, "rb")
    except Exception as e:  # noqa: BLE001  (each backend raises its own types)
        raise PartkitError(f"cannot read {url!r}: {e}") from None


def open_url(url: str) -> BinaryIO:
    """Open a URL for reading bytes: ``-`` is stdin, ``pipe:CMD`` runs CMD, ``http(s)://`` streams, ``s3://`` and
    ``gs://`` go through fsspec or their command-line client, else a local file."""
    if url == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise PartkitError("input is '-' but stdin is a terminal; pipe shards in or name input files")
        return sys.stdin.buffer
    if url.startswith("pipe:"):
        return _PipeStream(url[5:])  # type: ignore[return-value]
    if url.startswith(("http://", "https://")):
        return _HttpStream(url)  # type: ignore[return-value]
    if is_remote(url):
        return _open_cloud(url)
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
