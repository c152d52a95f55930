"""Benchmark: pooled NMI + ARI over 10^8 label pairs, partkit vs sklearn on the same arrays.

partkit accumulates a contingency table image by image (``np.bincount`` on combined ids);
sklearn builds a sparse contingency from ``np.unique`` over all pairs, twice. Both scores
must agree to 1e-9. Peak memory of the partkit path is measured with tracemalloc at two
image counts over the same pixels, to show it does not grow with the number of images.

    python benchmarks/metrics.py            # 10^8 pairs (about a minute, mostly sklearn)
    python benchmarks/metrics.py --tiny     # 10^5 pairs, for CI
"""
from __future__ import annotations

import argparse
import os
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import timed  # noqa: E402

from partkit.metrics import Contingency, ari_score, nmi_score  # noqa: E402


def make_labels(pairs: int, images: int, n_true: int, n_pred: int, seed: int):
    """(images x pixels) uint8 ground truth and a noisy, correlated prediction."""
    rng = np.random.default_rng(seed)
    per_image = pairs // images
    true = rng.integers(0, n_true, (images, per_image), dtype=np.uint8)
    pred = true % n_pred
    pred += rng.integers(0, 3, pred.shape, dtype=np.uint8)  # agreement, not identity
    pred %= n_pred
    return true, pred


def partkit_scores(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    table = Contingency()
    for t, p in zip(true, pred):  # one image at a time, as `partkit eval` reads them
        table.update(t, p)
    return nmi_score(contingency=table.table_), ari_score(contingency=table.table_)


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=float, default=1e8, help="label pairs in total (default 1e8)")
    ap.add_argument("--images", type=int, default=100, help="images the pairs are split into (default 100)")
    ap.add_argument("--tiny", action="store_true", help="10^5 pairs in 10 images: a CI smoke run in seconds")
    ap.add_argument("--true-labels", type=int, default=20)
    ap.add_argument("--pred-labels", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pairs, images = (int(1e5), 10) if args.tiny else (int(args.pairs), args.images)
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true, pred = make_labels(pairs, images, args.true_labels, args.pred_labels, args.seed)
    pairs = true.size
    print(f"NMI + ARI on {pairs:,} label pairs ({images} images of {true.shape[1]:,} pixels; "
          f"{args.true_labels} true x {args.pred_labels} predicted labels, uint8)")

    t_partkit, (nmi, ari) = timed(partkit_scores, true, pred)
    flat_true, flat_pred = true.ravel(), pred.ravel()
    t_nmi, ref_nmi = timed(normalized_mutual_info_score, flat_true, flat_pred)
    t_ari, ref_ari = timed(adjusted_rand_score, flat_true, flat_pred)
    t_sklearn = t_nmi + t_ari

    d_nmi, d_ari = abs(nmi - ref_nmi), abs(ari - ref_ari)
    same = d_nmi <= 1e-9 and d_ari <= 1e-9
    more = images * 10
    peak_few = peak_mb(partkit_scores, true, pred)
    peak_many = peak_mb(partkit_scores, true.reshape(more, -1), pred.reshape(more, -1))
    labels_mb = (true.nbytes + pred.nbytes) / 2**20

    print(f"partkit  {t_partkit:8.3f} s   NMI {nmi:.12f}  ARI {ari:.12f}")
    print(f"sklearn  {t_sklearn:8.3f} s   NMI {ref_nmi:.12f}  ARI {ref_ari:.12f}  (NMI {t_nmi:.3f} s + ARI {t_ari:.3f} s)")
    print(f"speed-up ratio sklearn / partkit: {t_sklearn / t_partkit:.1f}x (target >= 30x)")
    print(f"max |difference|: NMI {d_nmi:.1e}, ARI {d_ari:.1e} -> {'identical' if same else 'DIFFERENT'} to 1e-9")
    print(f"peak memory beyond the {labels_mb:,.0f} MB of label arrays (tracemalloc): "
          f"{peak_few:,.1f} MB at {images} images, {peak_many:,.1f} MB at {more} images; "
          f"ratio {peak_many / peak_few:.2f} (bounded: <= ~1)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
