"""Cost of a self-training step (teacher pseudo-labelling + EMA) vs a plain train-decoder step.

    python benchmarks/selftrain.py          # 28x28 grids of 472-d features, batch 8, 20 steps
    python benchmarks/selftrain.py --tiny   # seconds, for CI

Prints seconds per step for both, measured in the same run on the same data, and their ratio
(target <= 1.6), plus peak RSS.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import self_peak_rss_mb  # noqa: E402


def synthetic_shard(path: str, n: int, grid: int, channels: int) -> str:
    from partkit.io import TarSampleWriter, encode_json, encode_npy, encode_png

    rng = np.random.default_rng(0)
    levels = [channels // 4, channels // 4, channels - 2 * (channels // 4)]
    with open(path, "wb") as f:
        w = TarSampleWriter(f)
        for i in range(n):
            lab = np.zeros((grid, grid), np.uint8)
            cy, cx = rng.integers(grid // 4, 3 * grid // 4, 2)
            lab[:cy, :cx], lab[:cy, cx:], lab[cy:, :cx], lab[cy:, cx:] = 1, 2, 3, 4
            feat = rng.normal(0, 0.2, (channels, grid, grid)) + np.repeat(np.eye(5)[lab].transpose(2, 0, 1),
                                                                            channels // 5 + 1, 0)[:channels]
            meta = {"grid": [grid, grid], "stride": 8, "image_size": [grid * 8] * 2, "resized": [grid * 8] * 2,
                    "channels": channels, "level_channels": levels}
            w.write({"__key__": f"s{i:05d}", "feat.npy": encode_npy(feat.astype(np.float16)),
                     "feat.json": encode_json(meta), "parts.png": encode_png(lab)})
        w.close()
    return path


def seconds_per_step(trainer, steps: int) -> float:
    def one(step):
        loss, _ = trainer.step_loss(step)
        trainer.opt.zero_grad()
        loss.backward()
        trainer.opt.step()
        trainer.after_step(step + 1)

    one(0)  # warm-up
    t = time.perf_counter()
    for s in range(1, steps + 1):
        one(s)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--channels", type=int, default=472)
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.batch, args.grid, args.channels = 2, 2, 8, 40
    from partkit._log import set_verbosity
    from partkit.decoder import TrainConfig
    from partkit.decoder.train import DecoderTrainer
    from partkit.selftrain import SelfTrainer

    set_verbosity(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        shard = synthetic_shard(os.path.join(tmp, "s.tar"), max(8, args.batch), args.grid, args.channels)
        tc = TrainConfig(max_steps=1000, batch_size=args.batch, warmup=1, crop_grid=32 if not args.tiny else 8)
        print(f"self-train benchmark: grid {args.grid}, {args.channels}-d features, batch {args.batch}, "
              f"{args.steps} steps, {torch.get_num_threads()} threads", flush=True)
        plain = DecoderTrainer([shard], os.path.join(tmp, "dec"), train=tc, seed=0)
        t_plain = seconds_per_step(plain, args.steps)
        plain.checkpoint(args.steps)  # the plain run, now trained a little, is the teacher
        selft = SelfTrainer([shard], os.path.join(tmp, "st"), os.path.join(tmp, "dec"), score_threshold=0.5,
                            burn_in=1, train=tc, seed=0)
        counts = []
        inner = selft.pseudo_labels
        selft.pseudo_labels = lambda *a: (lambda t: counts.append(sum(len(x["masks"]) for x in t)) or t)(inner(*a))
        t_self = seconds_per_step(selft, args.steps)
        print(f"  train-decoder step {t_plain:.3f} s | self-train step (teacher + EMA) {t_self:.3f} s | "
              f"{sum(counts) / max(1, len(counts)) / args.batch:.1f} pseudo-labels per image (4 true parts)",
              flush=True)
        print(f"  self-train/train-decoder step ratio {t_self / t_plain:.2f} (target <= 1.6)", flush=True)
        print(f"  peak RSS {self_peak_rss_mb():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
