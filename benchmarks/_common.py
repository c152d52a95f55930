"""Helpers shared by the benchmarks: timing, peak RSS of a child process, synthetic images."""
from __future__ import annotations

import io
import resource
import subprocess
import sys
import time

import numpy as np


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def child_peak_rss_mb(cmd: str) -> float:
    """Run a shell command in a fresh process group and return its peak RSS in MiB (Linux)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1], shell=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", code, cmd], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def natural_like_jpegs(n: int, size=(160, 120), seed: int = 0) -> list[bytes]:
    """Smooth random images (blobs of colour), JPEG-encoded: decode cost like real photos."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_image_shard(path: str, jpegs: list[bytes]) -> str:
    from partkit.io import TarSampleWriter

    with open(path, "wb") as f:
        w = TarSampleWriter(f)
        for i, data in enumerate(jpegs):
            w.write({"__key__": f"img{i:07d}", "jpg": data})
        w.close()
    return path
