"""Tar streams to samples and samples to tar streams (the WebDataset layout).

A sample is a dict ``{"__key__": key, ext: bytes, ...}`` made of the tar members that share
a basename; the key is split at the first dot of the basename, so ``a.feat.npy`` is field
``feat.npy`` of sample ``a``. Fields starting with ``__`` are internal and never written.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from typing import BinaryIO, Callable, Iterator, Optional

from ..errors import PartkitError

__all__ = ["iter_tar", "TarSampleWriter", "split_name", "sample_key", "FIXED_MTIME"]

# Fixed member mtime: the same input gives byte-identical tars.
FIXED_MTIME = 0


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.feat.npy`` -> (``dir/key``, ``feat.npy``)."""
    head, sep, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return head + sep + key, ext


def sample_key(path: str) -> str:
    """A stable, dot-free key from a file stem (``img.v2.jpg`` -> ``img_v2``), so :func:`split_name` keeps it whole."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[.\s/\\]", "_", stem)


def iter_tar(stream: BinaryIO, url: str, on_error: Optional[Callable[[str], None]] = None) -> Iterator[dict]:
    """Yield samples from one tar stream, grouping consecutive members by key.

    A truncated or non-tar stream raises a one-line :class:`PartkitError` (or is reported to
    ``on_error`` and ends the stream, for ``--skip-bad``).
    """
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if not ext or key.rsplit("/", 1)[-1].startswith("."):
                    continue
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    raise PartkitError(f"{url}: sample {key!r} has field {ext!r} twice; shards must hold unique keys")
                current[ext] = data
    except (tarfile.ReadError, EOFError, tarfile.StreamError) as e:
        reason = str(e) or type(e).__name__
        if reason == "empty file":
            return
        msg = f"{url}: not a valid tar stream or truncated ({reason}); regenerate the shard"
        if on_error is None:
            raise PartkitError(msg) from None
        on_error(msg)
        return  # the partial sample at the break is dropped: it may be incomplete
    if current is not None:
        yield current


class TarSampleWriter:
    """Write samples to a binary stream as a deterministic tar (sorted members, fixed mtime)."""

    def __init__(self, stream: BinaryIO):
        self.tf = tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        fields = sorted(k for k in sample if not k.startswith("__"))
        if not fields:
            raise PartkitError(f"sample {key!r} has no fields to write")
        for ext in fields:
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = FIXED_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tf.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tf.close()

    def discard(self) -> None:
        """Abandon the stream without flushing (the caller deletes the file)."""
        self.tf.closed = True
        self.tf.fileobj.closed = True  # tarfile's stream would otherwise flush on garbage collection
