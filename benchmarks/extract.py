"""Throughput of `partkit extract` end to end (tar in, tar out) vs the bare timm forward pass.

    python benchmarks/extract.py            # full size (256 images per model, RSS at 1k vs 10k images)
    python benchmarks/extract.py --tiny     # seconds, for CI

Prints images/s for both and their ratio (target: end-to-end >= 0.80 of the bare forward pass;
the bare forward is the fastest of eager NCHW, eager channels-last and a traced, frozen graph),
and the peak RSS of extracting N and 10N images to /dev/null (bounded memory: about equal).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import child_peak_rss_mb, natural_like_jpegs, timed, write_image_shard  # noqa: E402

CASES = [  # (label, partkit model, weights, extra extract kwargs)
    ("efficientnet_lite0 hypercolumns", "efficientnet_lite0", None, {}),
    ("vit_small_patch16_224 tokens", "timm:vit_small_patch16_224", "none", {"facet": "token"}),
]


class _Intermediates(torch.nn.Module):
    """The backbone's feature maps as a module (what ``torch.jit.trace`` takes)."""

    def __init__(self, net, indices):
        super().__init__()
        self.net, self.indices = net, indices

    def forward(self, x):
        return tuple(self.net.forward_intermediates(x, indices=self.indices, intermediates_only=True))


def bare_forward(model: str, weights, n: int, batch: int, size: int, kwargs: dict) -> tuple[float, str]:
    """(images/s, variant) of the fastest bare forward of the backbone on ready tensors that we could
    write: eager NCHW, eager channels-last (CNNs), and a traced, frozen graph (conv+BN folded,
    ``torch.jit.optimize_for_inference``) in the faster layout; timed alike, the best one wins."""
    from partkit.models import create_backbone

    bb = create_backbone(model, weights).eval()
    indices = [2, 3, 4] if bb.family == "cnn" else [11]
    x = torch.randn(batch, 3, size, size)
    layouts = {"NCHW": torch.contiguous_format}
    if bb.family == "cnn":
        layouts["channels-last"] = torch.channels_last
    steps = max(1, n // batch)
    best = (0.0, "")
    with torch.inference_mode():
        for name, fmt in layouts.items():
            mod = _Intermediates(bb.net.to(memory_format=fmt), indices).eval()
            xi = x.contiguous(memory_format=fmt)
            mod(xi)  # warm-up
            secs, _ = timed(lambda: [mod(xi) for _ in range(steps)])
            best = max(best, (steps * batch / secs, f"eager {name}"))
    # tracing must run outside inference mode (its tensors cannot be saved in a graph)
    for name, fmt in layouts.items():
        mod = _Intermediates(bb.net.to(memory_format=fmt), indices).eval()
        xi = x.contiguous(memory_format=fmt)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings (a baseline only)
                graph = torch.jit.optimize_for_inference(torch.jit.trace(mod, xi, check_trace=False))
                for _ in range(2):  # the profiling executor specialises on the first calls
                    graph(xi)
                secs, _ = timed(lambda: [graph(xi) for _ in range(steps)])
            best = max(best, (steps * batch / secs, f"traced+frozen {name}"))
        except Exception as e:  # a backbone that cannot be traced keeps the eager baselines
            print(f"  ({model}: tracing failed, {type(e).__name__}; eager baselines only)", flush=True)
    return best


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
            bare, variant = bare_forward(model, weights, args.images, args.batch, args.size, kw)
            e2e = end_to_end(shard, model, weights, args.batch, args.size, kw, os.path.join(tmp, "out"))
            print(f"  {label:34s} bare forward {bare:7.1f} img/s ({variant}, the fastest of the variants) | "
                  f"end-to-end {e2e:7.1f} img/s | ratio {e2e / bare:.2f} (target >= 0.80)", flush=True)
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
