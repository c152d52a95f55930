"""Where samples go: stdout as one tar stream, or a folder of numbered, resumable shards.

A folder shard ``000012.tar`` is written under a temporary name; when it is closed,
``000012.stats.json`` is written (via a rename) and then the tar is renamed to its final name.
A shard counts as done only when both exist, so a rerun after a crash redoes exactly the
unfinished shards, and a ``NNNNNN.tar`` without its stats file was not written by partkit (it
is refused unless ``--overwrite``). One run writes to a folder at a time (a lock on the
folder); the folder may not hold an input; the stats record a fingerprint of the input files,
so a rerun with other inputs is refused instead of reusing shards made from them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import sys
from typing import BinaryIO, Iterator, Optional, Sequence

from ..errors import PartkitError
from .tario import TarSampleWriter
from .urls import has_no_mtime

__all__ = ["StdoutSink", "PipeSink", "FolderSink", "open_sink", "is_folder_output", "write_atomic", "atomic_file", "temp_name",
           "check_output_file", "check_output_folder",
           "check_output_apart", "input_fingerprint"]

_SHARD = re.compile(r"^\d{6}\.tar$")


def _write_error(path: str, e: OSError) -> PartkitError:
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
            errno.EROFS: "the file system is read-only"}.get(e.errno, "check the path")
    return PartkitError(f"cannot write {path!r}: {e.strerror or e}; {hint} or pick another place")


def temp_name(path: str) -> str:
    """The hidden temporary name ``path`` is written under before its rename (``.NAME.tmp-PID``, beside it)."""
    return f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """An open binary file that becomes ``path`` only when the block ends without error: it is written under
    :func:`temp_name` and renamed; the temporary never survives an error, and an ``OSError`` (a full disk, a
    read-only folder) becomes one :class:`PartkitError` naming ``path``."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data)


def _writable_ancestor(path: str, what: str, create: bool) -> None:
    """The folder that will hold ``path`` exists (or, with ``create``, can be made) and is writable."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        if not create:
            raise PartkitError(f"{what} {path!r}: the folder {parent!r} does not exist; create it first")
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PartkitError(f"{what} {path!r}: {probe!r} is a file, not a folder; pick another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PartkitError(f"{what} {path!r}: cannot write into {probe!r} (permission denied); pick another path")


def check_output_file(path: str, what: str, *, create_parents: bool = False) -> None:
    """Refuse, before any work, an output file path that is a folder or cannot be written."""
    if os.path.isdir(path):
        raise PartkitError(f"{what} {path!r} is a folder; give a file path inside it")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PartkitError(f"{what} {path!r} is not writable (permission denied); pick another path")
    _writable_ancestor(path, what, create_parents)


def check_output_folder(path: str, what: str) -> None:
    """Refuse, before any work, an output folder path that is a file or cannot be written (missing is fine)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise PartkitError(f"{what} {path!r} is a file, not a folder; give a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PartkitError(f"{what} {path!r}: cannot write into it (permission denied); pick another folder")
        return
    _writable_ancestor(path, what, True)


def check_output_apart(folder: str, inputs: Sequence[str]) -> None:
    """Refuse an output folder that is, or holds, one of the input files (a run would overwrite its input)."""
    here = os.path.realpath(folder)
    for url in inputs:
        if not has_no_mtime(url):
            real = os.path.realpath(url)
            if real == here or real.startswith(here.rstrip(os.sep) + os.sep):
                raise PartkitError(f"--output {folder!r} holds the input {url!r} (a run would overwrite its own "
                                   "input); write to another folder")


def input_fingerprint(inputs: Sequence[str]) -> Optional[dict]:
    """``{"files", "sha256"}`` over the input files' real paths, sizes and mtimes; ``None`` (not comparable) when
    any input is a stream or a remote URL, which have no mtime."""
    if not inputs or any(has_no_mtime(u) for u in inputs):
        return None
    h = hashlib.sha256()
    for url in inputs:
        try:
            st = os.stat(url)
        except OSError as e:
            raise PartkitError(f"cannot open input {url!r}: {e.strerror}") from None
        h.update(json.dumps([os.path.realpath(url), st.st_size, st.st_mtime_ns]).encode() + b"\n")
    return {"files": len(inputs), "sha256": h.hexdigest()}


class StdoutSink:
    """All samples as one tar on stdout (shards are only bookkeeping here)."""

    name = "-"

    def __init__(self, stream=None):
        stream = stream if stream is not None else sys.stdout.buffer
        if stream is sys.stdout.buffer and sys.stdout.isatty():
            raise PartkitError("refusing to write a tar to the terminal; pipe the output or pass --output DIR")
        self.writer = TarSampleWriter(stream)
        self.stream = stream

    def is_done(self, shard: int) -> bool:
        return False

    def start(self, shard: int) -> None:
        pass

    def write(self, sample: dict) -> None:
        self.writer.write(sample)

    def finish(self, shard: int, stats: dict) -> None:
        pass

    def close(self) -> None:
        self.writer.close()
        self.stream.flush()

    def abort(self) -> None:
        pass


class PipeSink(StdoutSink):
    """``-o pipe:CMD``: all samples as one tar into CMD's stdin; closing checks CMD's exit status."""

    def __init__(self, cmd: str):
        import subprocess

        self.cmd = cmd
        self.name = f"pipe:{cmd}"
        self.proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.PIPE)
        super().__init__(self.proc.stdin)

    def _exited(self) -> PartkitError:
        rc = self.proc.wait()
        return PartkitError(f"output command {self.cmd!r} exited with status {rc} before all output was written")

    def write(self, sample: dict) -> None:
        try:
            super().write(sample)
        except BrokenPipeError:
            raise self._exited() from None

    def close(self) -> None:
        try:
            super().close()
            self.stream.close()
        except BrokenPipeError:
            raise self._exited() from None
        rc = self.proc.wait()
        if rc != 0:
            raise PartkitError(f"output command {self.cmd!r} exited with status {rc}")

    def abort(self) -> None:
        """The run failed: stop CMD first, so it never takes the truncated stream for a whole one (an upload
        command would commit it), then close its stdin; never waits on a CMD that ignores both."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.stream.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FolderSink:
    """Numbered shards in a folder; with ``world`` processes, rank r writes shards r, r+W, ..."""

    def __init__(self, folder: str, *, overwrite: bool = False, rank: int = 0, world: int = 1,
                 config: Optional[dict] = None, inputs: Sequence[str] = ()):
        self.folder = folder
        self.name = folder
        self.overwrite = overwrite
        self.rank, self.world = rank, world
        self.config = config or {}
        self.writer: Optional[TarSampleWriter] = None
        self.file = None
        self.tmp: Optional[str] = None
        self._lock: Optional[int] = None
        self._done: dict[int, bool] = {}
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise PartkitError(f"--output {folder!r} exists and is not a folder; pick a folder path")
        check_output_folder(folder, "--output")
        check_output_apart(folder, inputs)
        self.inputs = input_fingerprint(inputs)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise _write_error(folder, e) from None
        self._acquire()
        try:
            self._refuse_foreign()
            self._cleanup()
        except BaseException:
            self._release()
            raise

    def _acquire(self) -> None:
        """Lock the folder: one run at a time (the processes of one distributed run share it)."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.world == 1 else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PartkitError(f"another partkit run is writing to {self.folder!r}; wait for it to finish or write "
                               "to another folder") from None
        except OSError:  # a file system without locks: go on unlocked
            os.close(fd)
            return
        self._lock = fd

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def __del__(self):
        self._release()

    def _refuse_foreign(self) -> None:
        """A ``NNNNNN.tar`` without its stats file was not finished by partkit: keep it unless --overwrite."""
        if self.overwrite:
            return
        for name in sorted(os.listdir(self.folder)):
            if _SHARD.match(name) and self._mine(name):
                if not os.path.exists(os.path.join(self.folder, name[:-4] + ".stats.json")):
                    raise PartkitError(
                        f"{os.path.join(self.folder, name)!r} has no {name[:-4]}.stats.json, so partkit did not write "
                        "it; move it away, pass --overwrite to replace it, or write to another folder")

    def _number(self, shard: int) -> str:
        return f"{shard * self.world + self.rank:06d}"

    def _mine(self, path: str) -> bool:
        stem = os.path.basename(path).lstrip(".").split(".")[0]  # 000012.tar or .000012.tar.tmp-PID
        return stem.isdigit() and int(stem) % self.world == self.rank

    def _cleanup(self) -> None:
        """Remove temporaries left by a killed run; with --overwrite, also this rank's shards."""
        for path in glob.glob(os.path.join(self.folder, ".*.tmp-*")):
            if self._mine(path):
                os.unlink(path)
        if self.overwrite:
            for pattern in ("[0-9]*.tar", "[0-9]*.stats.json"):
                for path in glob.glob(os.path.join(self.folder, pattern)):
                    if self._mine(path):
                        os.unlink(path)

    def paths(self, shard: int) -> tuple[str, str]:
        num = self._number(shard)
        return os.path.join(self.folder, f"{num}.tar"), os.path.join(self.folder, f"{num}.stats.json")

    def is_done(self, shard: int) -> bool:
        if shard not in self._done:
            self._done[shard] = self._check_done(shard)
        return self._done[shard]

    def _check_done(self, shard: int) -> bool:
        tar, stats = self.paths(shard)
        if not (os.path.exists(stats) and os.path.exists(tar)):
            return False
        try:
            with open(stats) as f:
                record = json.load(f)
            previous = record.get("config", {})
        except (OSError, ValueError, AttributeError):
            return False
        if previous != self.config:
            raise PartkitError(
                f"{self.folder!r} holds shards from a different run (options differ); "
                "pass --overwrite to redo them or write to a new folder"
            )
        inputs = record.get("inputs")
        if inputs is not None and self.inputs is not None and inputs != self.inputs:
            raise PartkitError(
                f"{self.folder!r} holds shards made from other inputs ({inputs.get('files')} input files then, "
                f"{self.inputs['files']} now, or their names, sizes or dates differ); pass --overwrite to redo them "
                "or write to a new folder")
        return True

    def start(self, shard: int) -> None:
        tar, _ = self.paths(shard)
        self.tmp = temp_name(tar)
        try:
            self.file = open(self.tmp, "wb")
        except OSError as e:
            raise _write_error(tar, e) from None
        self.writer = TarSampleWriter(self.file)

    def write(self, sample: dict) -> None:
        try:
            self.writer.write(sample)
        except OSError as e:
            raise _write_error(self.tmp, e) from None

    def finish(self, shard: int, stats: dict) -> None:
        tar, stats_path = self.paths(shard)
        try:
            self.writer.close()
            self.file.close()
        except OSError as e:
            raise _write_error(tar, e) from None
        self.writer = self.file = None
        stats = {"shard": os.path.basename(tar), **stats, "config": self.config, "inputs": self.inputs}
        # stats first, then the tar: a crash in between leaves a stats file without its tar (redone on rerun),
        # never a complete-looking tar without stats
        write_atomic(stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())
        os.replace(self.tmp, tar)
        self.tmp = None
        self._done[shard] = True

    def close(self) -> None:
        self._release()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.discard()
        if self.file is not None:
            self.file.close()
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.writer = self.file = self.tmp = None
        self._release()


def is_folder_output(output: Optional[str]) -> bool:
    """False for ``-`` / ``None`` (stdout) and ``pipe:CMD`` (the literal option value); else a shard folder."""
    return output not in (None, "-") and not output.startswith("pipe:")


def open_sink(output: Optional[str], *, overwrite: bool = False, rank: int = 0, world: int = 1,
              config: Optional[dict] = None, inputs: Sequence[str] = ()):
    """``None`` or ``-``: stdout; ``pipe:CMD``: CMD's stdin; anything else: a shard folder."""
    if not is_folder_output(output):
        if world > 1:
            raise PartkitError("several processes cannot share one output stream; pass --output DIR when "
                               "distributed")
        return PipeSink(output[5:]) if output and output.startswith("pipe:") else StdoutSink()
    return FolderSink(output, overwrite=overwrite, rank=rank, world=world, config=config, inputs=inputs)
