"""The README's pipeline end to end vs the sum of its stages run alone.

    python benchmarks/pipeline.py          # 200 images of 224 px
    python benchmarks/pipeline.py --tiny   # seconds, for CI

    partkit pack images/ --labels labels/ | partkit extract --model efficientnet_lite0 \\
      | partkit cluster --scope object --fg-from gt_parts -k 4 | partkit eval nmi ari miou

Each stage alone reads a file holding its input (written by a first pass) and writes to
/dev/null; the pipe runs the four processes at once, as the README does. Both include each
command's start-up. Prints the seconds of each stage, their sum, the piped run, and the ratio
sum / piped (target >= 0.8: piping costs at most 25% over running the stages one by one),
and checks that the piped scores equal the staged ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import natural_like_jpegs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_inputs(folder: str, n: int, size: int) -> tuple[str, str]:
    """JPEGs and a 4-part label PNG per image (quadrants of an off-centre object)."""
    from PIL import Image

    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    os.makedirs(images)
    os.makedirs(labels)
    rng = np.random.default_rng(0)
    for i, jpg in enumerate(natural_like_jpegs(n, size=(size, size), seed=3)):
        with open(os.path.join(images, f"im{i:05d}.jpg"), "wb") as f:
            f.write(jpg)
        lab = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 4, 2)
        y1, x1 = rng.integers(3 * size // 4, size, 2)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        lab[y0:cy, x0:cx], lab[y0:cy, cx:x1], lab[cy:y1, x0:cx], lab[cy:y1, cx:x1] = 1, 2, 3, 4
        Image.fromarray(lab).save(os.path.join(labels, f"im{i:05d}.png"))
    return images, labels


def sh(cmd: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{out.stderr[-3000:]}")
    return secs, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if args.tiny:
        args.images, args.size = 6, 64
    pk = f"{shlex.quote(sys.executable)} -c 'from partkit.cli.main import main; main()' -q"
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = write_inputs(tmp, args.images, args.size)
        f = {name: os.path.join(tmp, f"{name}.tar") for name in ("packed", "feats", "parts")}
        stages = [
            ("pack", f"{pk} pack {images} --labels {labels}", None, f["packed"]),
            ("extract", f"{pk} extract --model efficientnet_lite0 --size {args.size} -", f["packed"], f["feats"]),
            ("cluster", f"{pk} cluster --scope object --fg-from gt_parts -k 4 -", f["feats"], f["parts"]),
            ("eval", f"{pk} eval nmi ari miou -", f["parts"], None),
        ]
        for _, cmd, src, dst in stages:  # first pass: every stage's input as a file
            sh(cmd + (f" < {src}" if src else "") + (f" > {dst}" if dst else " > /dev/null"))
        alone, staged_scores = {}, None
        for name, cmd, src, dst in stages:
            secs, out = sh(cmd + (f" < {src}" if src else "") + (" > /dev/null" if dst else ""))
            alone[name] = secs
            if dst is None:
                staged_scores = json.loads(out)
        piped, out = sh(" | ".join(cmd for _, cmd, _, _ in stages))
        piped_scores = json.loads(out)
        total = sum(alone.values())
        print(f"pipeline benchmark: {args.images} images of {args.size} px, {os.cpu_count()} cores", flush=True)
        print("  alone: " + " + ".join(f"{k} {v:.1f}s" for k, v in alone.items()) + f" = {total:.1f}s", flush=True)
        print(f"  piped pack | extract | cluster | eval: {piped:.1f}s", flush=True)
        same = piped_scores["metrics"] == staged_scores["metrics"]
        print(f"  scores piped == staged: {same}", flush=True)
        print(f"  ratio sum-of-stages / piped {total / piped:.2f} (target >= 0.8)", flush=True)
        if not same:
            raise SystemExit("the piped run scored differently from the staged one")


if __name__ == "__main__":
    main()
