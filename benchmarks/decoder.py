"""Training-step throughput of the part decoder: cached feat.npy vs recomputing the backbone.

    python benchmarks/decoder.py          # 224 px, batch 8, 30 steps per mode
    python benchmarks/decoder.py --tiny   # seconds, for CI

Prints images/s for both modes (for information: the former target cached >= 2x online is
retired, see benchmarks/train_scale.py for the data path at scale), the share of step time spent
outside the model (data: batch assembly, augmentation, collation; matching: Hungarian
assignment) with target < 15%, and peak RSS.
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
from _common import natural_like_jpegs, self_peak_rss_mb  # noqa: E402


def make_shards(tmp: str, n: int, size: int) -> str:
    """Images with a 4-part block layout as parts.png, then efficientnet_lite0 features."""
    from partkit.extract import extract
    from partkit.io import Output, TarSampleWriter, encode_png

    grid = -(-size // 8)
    rng = np.random.default_rng(0)
    raw = os.path.join(tmp, "raw.tar")
    with open(raw, "wb") as f:
        w = TarSampleWriter(f)
        for i, jpg in enumerate(natural_like_jpegs(n, size=(size, size))):
            lab = np.zeros((grid, grid), np.uint8)
            cy, cx = rng.integers(grid // 4, 3 * grid // 4, 2)
            lab[:cy, :cx], lab[:cy, cx:], lab[cy:, :cx], lab[cy:, cx:] = 1, 2, 3, 4
            w.write({"__key__": f"im{i:05d}", "jpg": jpg, "parts.png": encode_png(lab)})
        w.close()
    extract([raw], model="efficientnet_lite0", size=size, output=Output(os.path.join(tmp, "feats")))
    return os.path.join(tmp, "feats", "000000.tar")


def run(shard: str, online: bool, steps: int, batch: int, size: int) -> dict:
    from partkit.decoder import DecoderConfig, PartDecoder
    from partkit.decoder.criterion import SetCriterion
    from partkit.decoder.data import Example, augment, collate
    from partkit.decoder.features import OnlineFeatures, batch_features as _features, load_examples
    from partkit.training import epoch_batch_indices as _batch_indices

    feats_src = OnlineFeatures("efficientnet_lite0", None, None, size, torch.device("cpu")) if online else None
    examples = load_examples([shard], field="parts.png", min_part_area=0.05, online=feats_src)
    meta = examples[0].meta
    net = PartDecoder(DecoderConfig(in_channels=meta["channels"], level_channels=meta["level_channels"]))
    crit = SetCriterion()
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    match_time = [0.0]
    inner = crit.matcher.forward

    def timed_match(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        match_time[0] += time.perf_counter() - t
        return out

    crit.matcher.forward = timed_match
    t_data = t_backbone = t_total = 0.0
    for step in range(steps + 1):  # step 0 warms up
        if step == 1:
            t_data = t_backbone = t_total = match_time[0] = 0.0
        t0 = time.perf_counter()
        batch_ex = [examples[i] for i in _batch_indices(step, len(examples), batch, 0)]
        t1 = time.perf_counter()
        feats = _features(batch_ex, feats_src)
        t2 = time.perf_counter()
        items = [augment(Example(e.key, f, e.target, e.ids, e.classes, e.meta), 32, gen) for e, f in zip(batch_ex, feats)]
        x, targets = collate(items, batch_ex, "cpu")
        t3 = time.perf_counter()
        loss, _ = crit(net(x), targets, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t4 = time.perf_counter()
        t_data += (t1 - t0) + (t3 - t2)
        t_backbone += t2 - t1
        t_total += t4 - t0
    return {"ips": steps * batch / t_total, "data": t_data / t_total, "match": match_time[0] / t_total,
            "backbone": t_backbone / t_total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if args.tiny:
        args.images, args.steps, args.batch, args.size = 4, 2, 2, 64
    from partkit._log import set_verbosity

    set_verbosity(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        shard = make_shards(tmp, args.images, args.size)
        print(f"decoder benchmark: {args.size}px, batch {args.batch}, {args.steps} steps, "
              f"{torch.get_num_threads()} threads", flush=True)
        cached = run(shard, False, args.steps, args.batch, args.size)
        online = run(shard, True, args.steps, args.batch, args.size)
        for name, r in (("cached feat.npy", cached), ("online efficientnet_lite0", online)):
            print(f"  {name:26s} {r['ips']:7.2f} img/s | data {100 * r['data']:4.1f}% | matching "
                  f"{100 * r['match']:4.1f}% | backbone {100 * r['backbone']:4.1f}% of step time", flush=True)
        outside = cached["data"] + cached["match"]
        # no target: the backbone is a small share of an online step with efficientnet_lite0; data at
        # scale is measured by benchmarks/train_scale.py
        print(f"  cached/online speed ratio {cached['ips'] / online['ips']:.2f} (for information)", flush=True)
        print(f"  outside-model share (cached) ratio {outside:.3f} (target < 0.15)", flush=True)
        print(f"  peak RSS {self_peak_rss_mb():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
