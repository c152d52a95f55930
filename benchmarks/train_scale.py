"""Streaming decoder training: memory does not grow with the dataset, and the stream keeps up.

    python benchmarks/train_scale.py          # 1,000 vs 10,000 samples of 28x28 128-d features, 150 steps
    python benchmarks/train_scale.py --tiny   # seconds, for CI

Synthetic-feature samples (``feat.npy`` float16, ``feat.json``, a 4-part ``parts.png``) are
written to shards of 500. Each run is a fresh process training the decoder for the same steps
and batch size (``DecoderTrainer``, no run folder):

- peak memory of streaming training on N and 10 N samples: the training process's peak RSS plus
  ``--workers`` times the largest worker's (target: ratio 10 N / N <= 1.1);
- throughput at N of the streaming loader (scan, then ``--workers`` DataLoader processes decoding
  and augmenting the stream) vs the in-memory loader it replaced (``load_examples`` into a list,
  then the seeded epoch permutation, augmentation in the training process), in images per second
  of the training loop after ``--warmup`` steps (the loop's steady state; the first steps include
  the workers' start and the first shuffle buffer), and end to end including the scan / the
  loading (target: loop ratio >= 0.95).

Workers need cores of their own: the training process runs ``--train-threads`` torch threads
(default: the cores left after the workers, at least one), in both runs. A second comparison
gives training every core and decodes in the training process (``--workers 0``): what streaming
costs when no core is spare, as on a CPU-only laptop.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_shards(folder: str, n: int, grid: int, channels: int, per_shard: int = 500) -> list[str]:
    """``n`` samples in shards of ``per_shard``; features encode the part layout (a learnable task)."""
    from partkit.io import TarSampleWriter, encode_json, encode_npy, encode_png

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    levels = [channels // 4, channels // 4, channels - 2 * (channels // 4)]
    meta = encode_json({"grid": [grid, grid], "stride": 8, "image_size": [grid * 8] * 2,
                        "resized": [grid * 8] * 2, "channels": channels, "level_channels": levels})
    pool = []  # 16 distinct samples, reused under new keys: writing 10k samples stays fast
    for _ in range(16):
        lab = np.zeros((grid, grid), np.uint8)
        cy, cx = rng.integers(grid // 4, 3 * grid // 4, 2)
        lab[:cy, :cx], lab[:cy, cx:], lab[cy:, :cx], lab[cy:, cx:] = 1, 2, 3, 4
        feat = rng.normal(0, 0.2, (channels, grid, grid)) + np.repeat(np.eye(5)[lab].transpose(2, 0, 1),
                                                                        channels // 5 + 1, 0)[:channels]
        pool.append({"feat.npy": encode_npy(feat.astype(np.float16)), "feat.json": meta, "parts.png": encode_png(lab)})
    paths = []
    for s in range(0, n, per_shard):
        path = os.path.join(folder, f"{s // per_shard:06d}.tar")
        with open(path, "wb") as f:
            w = TarSampleWriter(f)
            for i in range(s, min(n, s + per_shard)):
                w.write({"__key__": f"s{i:07d}", **pool[i % len(pool)]})
            w.close()
        paths.append(path)
    return paths


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, folder, steps, batch, workers, buffer, crop, threads, warmup = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:11])
import torch
torch.set_num_threads(threads)
from partkit._log import set_verbosity
from partkit.decoder import TrainConfig
from partkit.decoder.features import load_examples
from partkit.decoder.train import DecoderTrainer
from partkit.training import epoch_batch_indices
set_verbosity(quiet=True)
tc = TrainConfig(max_steps=steps, batch_size=batch, warmup=1, crop_grid=crop, workers=workers, shuffle_buffer=buffer,
                 num_points=256, checkpoint_every=10 ** 9, log_every=10 ** 9)
small = {"num_queries": 20, "hidden_dim": 64, "num_heads": 2, "ffn_dim": 128, "num_layers": 2}


class InMemory(DecoderTrainer):
    # the loader streaming replaced: every example decoded into a list, then a seeded epoch permutation
    def batch(self, step):
        return [self.examples[i] for i in epoch_batch_indices(step, len(self.examples), batch, 31 * self.seed)]


STAMPS = []


class Timed:
    # the time after each step: the loop's steady state is measured after the warm-up steps
    def train_step(self, step):
        out = super().train_step(step)
        STAMPS.append(time.perf_counter())
        return out


t0 = time.perf_counter()
trainer = type("T", (Timed, InMemory if mode == "memory" else DecoderTrainer), {})([folder], None, decoder=small,
                                                                                  train=tc, device="cpu")
if mode == "memory":
    trainer.examples = load_examples([folder], field="parts.png", min_part_area=0.05)
t1 = time.perf_counter()
trainer.fit()
t2 = time.perf_counter()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"setup": t1 - t0, "loop": t2 - t1, "steady": STAMPS[-1] - STAMPS[warmup - 1], "rss_mb": int(hwm.split()[1]) / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run(mode: str, folder: str, args, workers: int, threads: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-c", _CHILD, root, mode, folder, str(args.steps), str(args.batch), str(workers),
           str(args.buffer), str(args.crop), str(threads), str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["total_mb"] = r["rss_mb"] + (workers if mode == "stream" else 0) * r["worker_rss_mb"]
    r["ips"] = (args.steps - args.warmup) * args.batch / r["steady"]
    r["ips_e2e"] = args.steps * args.batch / (r["setup"] + r["loop"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--samples", type=int, default=1000, help="N: the small dataset (the large one is 10 N)")
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10, help="steps before the loop's throughput is timed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--train-threads", type=int, default=None,
                    help="torch threads of the training process (default: the cores the workers leave, >= 1)")
    ap.add_argument("--buffer", type=int, default=256)
    ap.add_argument("--crop", type=int, default=16)
    args = ap.parse_args()
    if args.tiny:
        args.samples, args.grid, args.channels, args.steps, args.batch, args.workers, args.buffer = 20, 8, 16, 4, 2, 1, 8
        args.crop, args.warmup = 8, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.train_threads or max(1, cores - args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        small = os.path.join(tmp, "small")
        large = os.path.join(tmp, "large")
        write_shards(small, args.samples, args.grid, args.channels)
        write_shards(large, 10 * args.samples, args.grid, args.channels)
        mb = args.channels * args.grid ** 2 * 2 / 2 ** 20
        print(f"train-scale benchmark: {args.samples} vs {10 * args.samples} samples of {args.grid}x{args.grid} "
              f"{args.channels}-d float16 features ({mb:.2f} MiB each), {args.steps} steps ({args.warmup} warm-up), "
              f"batch {args.batch}, shuffle buffer {args.buffer}, {cores} cores", flush=True)
        print(f" workers on: {args.workers} workers, training on {threads} threads", flush=True)
        memory = run("memory", small, args, 0, threads)
        s_small = run("stream", small, args, args.workers, threads)
        s_large = run("stream", large, args, args.workers, threads)
        for name, r in ((f"in-memory loader, {args.samples}", memory), (f"streaming, {args.samples}", s_small),
                        (f"streaming, {10 * args.samples}", s_large)):
            print(f"  {name:24s} loop {r['ips']:7.2f} img/s | end to end {r['ips_e2e']:7.2f} img/s (setup "
                  f"{r['setup']:.1f}s) | peak RSS {r['rss_mb']:.0f} MiB + workers {r['worker_rss_mb']:.0f} MiB each "
                  f"= {r['total_mb']:.0f} MiB", flush=True)
        print(f"  peak memory ratio streaming {10 * args.samples}/{args.samples} "
              f"{s_large['total_mb'] / s_small['total_mb']:.3f} (target <= 1.1)", flush=True)
        print(f"  throughput ratio streaming/in-memory at {args.samples} {s_small['ips'] / memory['ips']:.3f} "
              f"(target >= 0.95); end to end {s_small['ips_e2e'] / memory['ips_e2e']:.3f}", flush=True)
        print(f" no core spare: training on {cores} threads, streaming with --workers 0", flush=True)
        memory_all = run("memory", small, args, 0, cores)
        stream_all = run("stream", small, args, 0, cores)
        print(f"  in-memory loop {memory_all['ips']:7.2f} img/s, streaming loop {stream_all['ips']:7.2f} img/s: "
              f"ratio {stream_all['ips'] / memory_all['ips']:.3f} (the decoding on the training cores); end to end "
              f"{stream_all['ips_e2e'] / memory_all['ips_e2e']:.3f}", flush=True)


if __name__ == "__main__":
    main()
