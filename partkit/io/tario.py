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

from ..errors import BadSample, PartkitError

__all__ = ["iter_tar", "unique_keys", "TarSampleWriter", "split_name", "sample_key", "key_problem", "max_member_bytes",
           "FIXED_MTIME", "MAX_KEY_LENGTH", "MAX_MEMBER_BYTES"]

# Fixed member mtime: the same input gives byte-identical tars.
FIXED_MTIME = 0


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.feat.npy`` -> (``dir/key``, ``feat.npy``); a leading ``./`` (``tar -C dir -cf x.tar .``) is dropped."""
    while name.startswith("./"):
        name = name[2:]
    head, sep, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return head + sep + key, ext


def sample_key(path: str) -> str:
    """A stable, dot-free key from a file stem (``img.v2.jpg`` -> ``img_v2``), so :func:`split_name` keeps it whole."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[.\s/\\]", "_", stem)


# Keys become file names (``show -o DIR/<key>.png``): they must be plain names.
MAX_KEY_LENGTH = 200
# Largest tar member read into memory, judged from its header before reading; raise with PARTKIT_MAX_MEMBER_BYTES.
MAX_MEMBER_BYTES = 1 << 30


def max_member_bytes() -> int:
    try:
        return int(os.environ.get("PARTKIT_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES))
    except ValueError:
        raise PartkitError("PARTKIT_MAX_MEMBER_BYTES must be a whole number of bytes") from None


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` cannot be a sample key (it would not be a safe file name), or ``None``."""
    if not key:
        return "has an empty key (a member name starting with '.')"
    if "\0" in key:
        return "has a NUL byte in its key"
    if "/" in key or "\\" in key:
        return "has a key with a path separator ('/' or '\\'); keys must be plain names"
    if key.startswith("."):
        return "has a key starting with '.'"
    if len(key) > MAX_KEY_LENGTH:
        return f"has a key of {len(key)} characters (at most {MAX_KEY_LENGTH})"
    return None


def _short(key: str) -> str:
    return key if len(key) <= 60 else key[:57] + "..."


class _TarInfo(tarfile.TarInfo):
    """Records how the archive ended: tarfile treats a stream cut at a member boundary as complete."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf._partkit_end = "end-of-archive"
            raise
        except tarfile.HeaderError:
            tf._partkit_end = "cut"
            raise


def iter_tar(stream: BinaryIO, url: str, on_error: Optional[Callable[[str], None]] = None) -> Iterator[dict]:
    """Yield samples from one tar stream, grouping consecutive members by key.

    A truncated or non-tar stream, or one without its end-of-archive blocks, raises a one-line
    :class:`PartkitError` (or is reported to ``on_error`` and ends the stream, for ``--skip-bad``);
    the sample being read when the stream broke is never yielded. A sample with an unsafe key,
    a link member or a member above :func:`max_member_bytes` is a :class:`BadSample` (with
    ``on_error``: reported and left out).
    """
    current: dict | None = None
    bad_key: Optional[str] = None
    limit = max_member_bytes()
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo) as tf:
            for member in tf:
                if member.isdir():
                    continue
                key, ext = split_name(member.name)
                if member.isfile() and not ext and key_problem(key) is None:
                    continue  # a member that belongs to no sample (README, ...)
                if key == bad_key:
                    continue  # the rest of a sample already reported
                problem = None
                name = _short(member.name)
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    problem = (f"member {name!r} is a {kind} link to {_short(member.linkname)!r}; shards must hold "
                               "regular files: rebuild the tar without links (tar --dereference --hard-dereference)")
                elif not member.isfile():
                    problem = f"member {name!r} is not a regular file; rebuild the tar from regular files"
                elif key_problem(key):
                    problem = (f"member {name!r} {key_problem(key)}; rename the members (or repack with "
                               "`partkit pack`) so every key is a plain name without '/', '..' or a leading dot")
                elif member.size > limit:
                    problem = (f"member {name!r} declares {member.size:,} bytes, above the {limit:,}-byte "
                               "limit; split the field or raise PARTKIT_MAX_MEMBER_BYTES")
                if problem is not None:
                    err = BadSample(_short(key), f"in {url}: {problem}")
                    if on_error is None:
                        raise err
                    on_error(str(err))
                    bad_key = key
                    if current is not None and current["__key__"] == key:
                        current = None
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
            end = getattr(tf, "_partkit_end", None)
            if end == "end-of-archive" and tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                end = "cut"  # one zero block: the second end-of-archive block is missing
            if end != "end-of-archive" and (tf.offset or current is not None):
                raise tarfile.ReadError("input ended mid-archive: truncated, no end-of-archive blocks")
    except (tarfile.ReadError, EOFError, tarfile.StreamError) as e:
        reason = str(e) or type(e).__name__
        if reason == "empty file":
            return
        if reason.startswith("input ended mid-archive"):
            msg = f"{url}: {reason}; regenerate the shard or check the command that feeds it"
        else:
            msg = f"{url}: not a valid tar stream or truncated ({reason}); regenerate the shard"
        if on_error is None:
            raise PartkitError(msg) from None
        on_error(msg)
        return  # the partial sample at the break is dropped: it may be incomplete
    if current is not None:
        yield current


def unique_keys(samples: Iterator[dict]) -> Iterator[dict]:
    """Pass samples through, refusing a key seen before (in this or an earlier input shard)."""
    seen: dict[str, str] = {}
    for sample in samples:
        key, url = sample["__key__"], sample.get("__url__", "?")
        if key in seen:
            where = f"both {seen[key]} and {url}" if seen[key] != url else f"{url} twice"
            raise PartkitError(f"sample key {key!r} appears in {where}; keys must be unique across the inputs: "
                               "drop the duplicate input or repack one of them under other keys")
        seen[key] = url
        yield sample


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
