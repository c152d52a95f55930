"""Throughput of `partkit extract` end to end (tar in, tar out) vs the bare timm forward pass.

    python benchmarks/extract.py            # full size (256 images per model, RSS at 1k vs 10k images)
    python benchmarks/extract.py --tiny     # seconds, for CI

Prints images/s for both and their ratio (target: end-to-end >= 0.80 of the bare forward pass),
and the peak RSS of extracting N and 10N images to /dev/null (bounded memory: about equal).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import child_peak_rss_mb, natural_like_jpegs, timed, write_image_shard  # noqa: E402

CASES = [  # (label, partkit model, weights, extra extract kwargs)
    ("efficientnet_lite0 hypercolumns", "efficientnet_lite0", None, {}),
    ("vit_small_patch16_224 tokens", "timm:vit_small_patch16_224", "none", {"facet": "token"}),
]


def bare_forward(model: str, weights, n: int, batch: int, size: int, kwargs: dict) -> float:
    """images/s of the backbone alone on ready tensors (what extract wraps)."""
    from partkit.models import create_backbone

    bb = create_backbone(model, weights).eval()
    x = torch.randn(batch, 3, size, size)
    if bb.family == "cnn":
        bb = bb.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = bb.net
    with torch.inference_mode():
        if bb.family == "cnn":
            fn = lambda: net.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)  # noqa: E731
        else:
            fn = lambda: net.forward_intermediates(x, indices=[11], intermediates_only=True)  # noqa: E731
        fn()  # warm-up
        steps = max(1, n // batch)
        secs, _ = timed(lambda: [fn() for _ in range(steps)])
    return steps * batch / secs


def end_to_end(shard: str, model: str, weights, batch: int, size: int, kwargs: dict, out: str) -> float:
    from partkit.extract import extract
    from partkit.io import Output

    n = sum(1 for _ in __import__("partkit.io", fromlist=["iter_samples"]).iter_samples([shard]))
    extract([shard], model=model, weights=weights, batch_size=batch, size=size, device="cpu",
            output=Output(out + "-warm", overwrite=True), **kwargs)  # warm caches / lazy imports
    secs, _ = timed(extract, [shard], model=model, weights=weights, batch_size=batch, size=size, device="cpu",
                    output=Output(out, overwrite=True), **kwargs)
    return n / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few images, for CI")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rss-images", type=int, default=1000, help="RSS measured at N and 10N images")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.batch, args.size, args.rss_images = 8, 4, 64, 8
    from partkit._log import set_verbosity

    set_verbosity(quiet=True)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        shard = write_image_shard(os.path.join(tmp, "in.tar"), natural_like_jpegs(args.images, seed=1))
        print(f"extract benchmark: {args.images} images, batch {args.batch}, {args.size}px, "
              f"{torch.get_num_threads()} threads", flush=True)
        for label, model, weights, kw in CASES:
            bare = bare_forward(model, weights, args.images, args.batch, args.size, kw)
            e2e = end_to_end(shard, model, weights, args.batch, args.size, kw, os.path.join(tmp, "out"))
            print(f"  {label:34s} bare forward {bare:7.1f} img/s | end-to-end {e2e:7.1f} img/s | "
                  f"ratio {e2e / bare:.2f} (target >= 0.80)", flush=True)
        # Bounded memory: peak RSS for N and 10N images streamed to /dev/null.
        rss = []
        for n in (args.rss_images, 10 * args.rss_images):
            big = write_image_shard(os.path.join(tmp, f"rss{n}.tar"), natural_like_jpegs(n, size=(64, 48), seed=2))
            rss.append(child_peak_rss_mb(f"partkit -q extract {big} --model efficientnet_lite0 --size {args.size} "
                                         f"--batch-size {args.batch} > /dev/null"))
            os.unlink(big)
        print(f"  peak RSS extracting {args.rss_images} images: {rss[0]:.0f} MiB; {10 * args.rss_images} images: "
              f"{rss[1]:.0f} MiB; ratio {rss[1] / rss[0]:.2f} (bounded: ~1.0)", flush=True)


if __name__ == "__main__":
    main()
