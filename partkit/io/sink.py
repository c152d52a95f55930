"""Where samples go: stdout as one tar stream, or a folder of numbered, resumable shards.

A folder shard ``000012.tar`` is written under a temporary name and renamed when closed;
then ``000012.stats.json`` is written (also via rename). A shard counts as done only when
its stats file exists, so a rerun after a crash redoes exactly the unfinished shards.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Optional

from ..errors import PartkitError
from .tario import TarSampleWriter

__all__ = ["StdoutSink", "FolderSink", "open_sink", "write_atomic"]


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename."""
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


class FolderSink:
    """Numbered shards in a folder; with ``world`` processes, rank r writes shards r, r+W, ..."""

    def __init__(self, folder: str, *, overwrite: bool = False, rank: int = 0, world: int = 1,
                 config: Optional[dict] = None):
        self.folder = folder
        self.name = folder
        self.overwrite = overwrite
        self.rank, self.world = rank, world
        self.config = config or {}
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise PartkitError(f"--output {folder!r} exists and is not a folder; pick a folder path")
        os.makedirs(folder, exist_ok=True)
        self._cleanup()
        self.writer: Optional[TarSampleWriter] = None
        self.file = None
        self.tmp: Optional[str] = None

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
        tar, stats = self.paths(shard)
        if not (os.path.exists(stats) and os.path.exists(tar)):
            return False
        try:
            with open(stats) as f:
                previous = json.load(f).get("config", {})
        except (OSError, ValueError):
            return False
        if previous != self.config:
            raise PartkitError(
                f"{self.folder!r} holds shards from a different run (options differ); "
                "pass --overwrite to redo them or write to a new folder"
            )
        return True

    def start(self, shard: int) -> None:
        tar, _ = self.paths(shard)
        self.tmp = f"{os.path.join(self.folder, '.' + os.path.basename(tar))}.tmp-{os.getpid()}"
        self.file = open(self.tmp, "wb")
        self.writer = TarSampleWriter(self.file)

    def write(self, sample: dict) -> None:
        self.writer.write(sample)

    def finish(self, shard: int, stats: dict) -> None:
        tar, stats_path = self.paths(shard)
        self.writer.close()
        self.file.close()
        os.replace(self.tmp, tar)
        self.writer = self.file = self.tmp = None
        stats = {"shard": os.path.basename(tar), **stats, "config": self.config}
        write_atomic(stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        pass

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.discard()
        if self.file is not None:
            self.file.close()
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.writer = self.file = self.tmp = None


def open_sink(output: Optional[str], *, overwrite: bool = False, rank: int = 0, world: int = 1,
              config: Optional[dict] = None):
    """``None`` or ``-``: stdout; anything else: a shard folder."""
    if output in (None, "-"):
        if world > 1:
            raise PartkitError("several processes cannot share stdout; pass --output DIR when distributed")
        return StdoutSink()
    return FolderSink(output, overwrite=overwrite, rank=rank, world=world, config=config)
