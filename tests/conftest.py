"""Shared fixtures: tiny shards built on the fly, paths to the shared real data."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARTKIT_SHARED", ROOT.parent / "shared")) / "data"
CIHP = SHARED / "cihp"
SHAPENET = SHARED / "shapenetpart"


def write_shard(path, samples) -> str:
    """Write ``[{"__key__": k, ext: bytes|str|ndarray}, ...]`` as a tar with partkit's writer."""
    from partkit.io import TarSampleWriter, encode_npy

    with open(path, "wb") as f:
        w = TarSampleWriter(f)
        for s in samples:
            s = {k: (encode_npy(v) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            w.write(s)
        w.close()
    return str(path)


def read_shard(data_or_path) -> list[dict]:
    """Samples of a tar given as bytes or a path (fields stay bytes)."""
    from partkit.io import iter_tar

    stream = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else open(data_or_path, "rb")
    with stream:
        return list(iter_tar(stream, "test"))


def invoke(args, **kw):
    """Run the CLI in process (typer's CliRunner); arguments may be paths."""
    from typer.testing import CliRunner

    from partkit.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_error_line(res, *needles) -> str:
    """Exit 2 and exactly one ``partkit: error:`` line holding every needle."""
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("partkit: error:"), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getnames()


@pytest.fixture
def shard_factory(tmp_path):
    counter = {"n": 0}

    def make(samples, name=None):
        counter["n"] += 1
        return write_shard(tmp_path / (name or f"in{counter['n']:03d}.tar"), samples)

    return make


@pytest.fixture(scope="session")
def cihp_dir():
    if not CIHP.exists():
        pytest.fail(f"shared data missing at {CIHP}; set PARTKIT_SHARED to the shared/ folder")
    return CIHP
