"""Benchmark: k-means for part discovery, partkit vs scikit-learn and faiss, measured in one run.

Per image (``--scope image/object``): 1,000 images x 784 cells x 384 dims, k = 4 and 25.
partkit solves all images in one batched call (default options: ``init="auto"``, greedy k-means++
below k = 12 and k-means|| from there on; and ``--init k-means||`` at every k); the baselines loop over images with
``sklearn.cluster.KMeans(n_init=1)`` and ``faiss.Kmeans`` (defaults: 25 iterations, random start); with
several threads, each baseline is also run as a loop spread over that many one-thread processes
(on these small problems both libraries run faster that way than on several threads), and the faster
of the two ways is the baseline.
Reports images/s, the ratios, and the mean inertia of partkit over scikit-learn's on the same
images. The data has real cluster structure: each image draws 25 sub-part centres grouped
into 5 parts, and cells are a centre plus Gaussian noise.

Dataset scope: 1,000,000 x 256 (k = 8 and 256), ``partkit.cluster.KMeans(backend="faiss")``
(k-means++ seeding, explicit seed and subsample) vs ``faiss.Kmeans`` directly (train, then
assign every row), each in a fresh process: seconds and peak RSS (the data is in both).

    python benchmarks/cluster.py           # full size (a few minutes)
    python benchmarks/cluster.py --tiny    # seconds, for CI
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def part_images(n: int, cells: int, dim: int, seed: int = 0, parts: int = 5, sub: int = 25) -> list[np.ndarray]:
    """Cells drawn around ``sub`` sub-part centres grouped into ``parts`` parts, plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        P = rng.standard_normal((parts, dim), dtype=np.float32) * 0.6
        S = P[np.arange(sub) % parts] + rng.standard_normal((sub, dim), dtype=np.float32) * 0.25
        lab = rng.choice(sub, cells, p=rng.dirichlet(np.full(sub, 3.0)))
        out.append(S[lab] + rng.standard_normal((cells, dim), dtype=np.float32))
    return out


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def assignment_floor(images: list, k: int, iters: float, batch: int = 8) -> float:
    """Seconds per image of ``iters`` bare assignment passes (``baddbmm`` distances + the nearest centre, as
    partkit's engine computes them, with fixed centres) over each batch of images in turn, as Lloyd makes
    them (the batch stays in cache between passes): the least the iterations alone cost, made this way."""
    import torch

    from partkit.kmeans._seeding import min_first

    passes = max(1, round(iters))
    xs = [torch.from_numpy(np.stack(images[s:s + batch])) for s in range(0, len(images), batch)]
    cs = [x[:, :k].clone() for x in xs]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for x, c in zip(xs, cs):
            for _ in range(passes):
                min_first(torch.baddbmm((c * c).sum(-1)[:, :, None], c, x.transpose(1, 2), alpha=-2))
        best = min(best, time.perf_counter() - t)
    return best / len(images) * iters / passes


def _one_thread() -> None:
    # a baseline worker process: every library on one thread (the loop is parallel over images instead)
    import faiss
    from threadpoolctl import threadpool_limits

    global _LIMIT
    _LIMIT = threadpool_limits(1)
    faiss.omp_set_num_threads(1)


def _sklearn_fit(task):
    from sklearn.cluster import KMeans as SkKMeans

    i, x, k = task
    return float(SkKMeans(k, n_init=1, random_state=i).fit(x).inertia_)


def _faiss_fit(task):
    import faiss

    _, x, k = task
    km = faiss.Kmeans(x.shape[1], k, min_points_per_centroid=1)  # default niter=25, seed 1234
    km.train(x)
    dist, _ = km.index.search(x, 1)
    return float(dist.sum(dtype=np.float64))


def process_loops(images: list, k: int, n_sk: int, n_fa: int, procs: int) -> tuple[float, float]:
    """Seconds of the sklearn and faiss loops spread over ``procs`` one-thread processes (started and
    warmed before the clock): on small problems the fastest way to use several cores with either."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
        warm = [(i, images[i], k) for i in range(procs)]
        list(pool.map(_sklearn_fit, warm))
        list(pool.map(_faiss_fit, warm))
        t = time.perf_counter()
        list(pool.map(_sklearn_fit, [(i, images[i], k) for i in range(n_sk)], chunksize=4))
        t_sk = time.perf_counter() - t
        t = time.perf_counter()
        list(pool.map(_faiss_fit, [(i, images[i], k) for i in range(n_fa)], chunksize=4))
        t_fa = time.perf_counter() - t
    return t_sk, t_fa


def per_image(args, threads: int) -> None:
    import faiss
    from sklearn.cluster import KMeans as SkKMeans
    from threadpoolctl import threadpool_limits

    from partkit.cluster import batched_kmeans

    images = part_images(args.images, args.cells, args.dim, args.seed)
    n_sk, n_fa = min(args.sklearn_images, len(images)), min(args.faiss_images, len(images))
    print(f"per image: {len(images)} images x {args.cells} cells x {args.dim} dims, {threads} threads "
          f"(sklearn on {n_sk} images, faiss on {n_fa})")
    for k in args.k:
        batched_kmeans(images[:2], k, random_state=0)  # warm-up (allocator, MKL)
        t = time.perf_counter()
        ours = batched_kmeans(images, k, random_state=0)
        t_ours = time.perf_counter() - t
        with threadpool_limits(threads):
            t = time.perf_counter()
            ref = [SkKMeans(k, n_init=1, random_state=i).fit(x) for i, x in enumerate(images[:n_sk])]
            t_sk = time.perf_counter() - t
            faiss.omp_set_num_threads(threads)
            t = time.perf_counter()
            fa = []
            for x in images[:n_fa]:
                km = faiss.Kmeans(x.shape[1], k, min_points_per_centroid=1)  # default niter=25, seed 1234
                km.train(x)
                dist, _ = km.index.search(x, 1)
                fa.append(float(dist.sum(dtype=np.float64)))
            t_fa = time.perf_counter() - t
        r_ours, r_sk, r_fa = rate(len(images), t_ours), rate(n_sk, t_sk), rate(n_fa, t_fa)
        if threads > 1:  # the baselines' fastest way to use the cores: the better of threads and processes
            p_sk, p_fa = process_loops(images, k, n_sk, n_fa, threads)
            p_sk, p_fa = rate(n_sk, p_sk), rate(n_fa, p_fa)
            print(f"  k={k:<3d} baselines: sklearn loop {r_sk:6.1f} img/s on {threads} threads, {p_sk:6.1f} in {threads} "
                  f"one-thread processes; faiss loop {r_fa:6.1f} / {p_fa:6.1f} img/s: the faster of each is the baseline")
            r_sk, r_fa = max(r_sk, p_sk), max(r_fa, p_fa)
        inertia = np.mean([r.inertia for r in ours[:n_sk]]) / np.mean([m.inertia_ for m in ref])
        inertia_fa = np.mean(fa) / np.mean([m.inertia_ for m in ref[:n_fa]]) if n_fa <= n_sk else float("nan")
        iters = np.mean([r.n_iter for r in ours])
        t = time.perf_counter()
        par = batched_kmeans(images, k, init="k-means||", random_state=0)
        r_par = rate(len(images), time.perf_counter() - t)
        inertia_par = np.mean([r.inertia for r in par[:n_sk]]) / np.mean([m.inertia_ for m in ref])
        print(f"  k={k:<3d} partkit {r_ours:7.1f} img/s ({iters:.1f} iterations)   sklearn loop {r_sk:6.1f} img/s   "
              f"faiss loop {r_fa:6.1f} img/s")
        print(f"  k={k:<3d} speed ratio partkit/sklearn-loop {r_ours / r_sk:6.2f}x (target >= 10)   "
              f"partkit/faiss-loop {r_ours / r_fa:5.2f}x (target >= 1.2)")
        print(f"  k={k:<3d} mean inertia ratio partkit/sklearn {inertia:.4f} (target within 1%)"
              + ("" if np.isnan(inertia_fa) else f"   faiss/sklearn {inertia_fa:.4f}"))
        print(f"  k={k:<3d} --init k-means||: {r_par:7.1f} img/s, ratio to sklearn-loop {r_par / r_sk:.2f}x, "
              f"to faiss-loop {r_par / r_fa:.2f}x, inertia ratio to sklearn {inertia_par:.4f}")
        floor = assignment_floor(images, k, iters)
        print(f"  k={k:<3d} floor: partkit's {iters:.1f} Lloyd assignments alone (a batched distance + argmin each, "
              f"no seeding, no update) take {floor * 1e3:.3f} ms per image: at most {(1 / floor) / r_sk:.2f}x the "
              f"sklearn loop at this iteration count")


_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from benchmarks.cluster import blob_rows
which = sys.argv[2]
n, d, k, seed, threads = map(int, sys.argv[3:8])
import faiss
if which == "partkit":
    from partkit.cluster import KMeans  # imports no torch on this path
faiss.omp_set_num_threads(threads)
X = blob_rows(n, d, seed)
t = time.perf_counter()
if which == "faiss":
    km = faiss.Kmeans(d, k, seed=seed)
    km.train(X)
    dist, labels = km.index.search(X, 1)
    inertia = float(dist.sum(dtype=np.float64))
else:
    km = KMeans(k, backend="faiss", random_state=seed).fit(X)
    inertia = km.inertia_
seconds = time.perf_counter() - t
# VmHWM: this process's own peak (ru_maxrss would include the parent's at fork time)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "rss_mb": int(hwm.split()[1]) / 1024,
                  "inertia": inertia}))
"""


def blob_rows(n: int, d: int, seed: int = 0, centers: int = 512) -> np.ndarray:
    """``n x d`` float32 rows around ``centers`` Gaussian centres (made in blocks to bound memory)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((centers, d), dtype=np.float32) * 2
    X = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 16):
        m = min(n, s + (1 << 16)) - s
        X[s:s + m] = C[rng.integers(0, centers, m)] + rng.standard_normal((m, d), dtype=np.float32)
    return X


def dataset(args, threads: int) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"dataset: {args.rows:,} x {args.rows_dim} rows, {threads} threads, each run in a fresh process")
    for k in args.dataset_k:
        res = {}
        for which in ("faiss", "partkit"):
            out = subprocess.run([sys.executable, "-c", _CHILD, root, which, str(args.rows), str(args.rows_dim), str(k),
                                  str(args.seed), str(threads)], capture_output=True, text=True, check=True)
            res[which] = json.loads(out.stdout.strip().splitlines()[-1])
        f, p = res["faiss"], res["partkit"]
        print(f"  k={k:<3d} partkit {p['seconds']:6.2f} s {p['rss_mb']:7.0f} MiB   faiss.Kmeans {f['seconds']:6.2f} s "
              f"{f['rss_mb']:7.0f} MiB   inertia partkit/faiss {p['inertia'] / f['inertia']:.4f}")
        print(f"  k={k:<3d} time ratio partkit/faiss {p['seconds'] / f['seconds']:.2f}x   "
              f"peak RSS ratio partkit/faiss {p['rss_mb'] / f['rss_mb']:.2f}x (targets <= 1.2)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a CI smoke run in seconds")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=784)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 25])
    ap.add_argument("--sklearn-images", type=int, default=100, help="images the sklearn loop runs on (it is slow)")
    ap.add_argument("--faiss-images", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-dim", type=int, default=256)
    ap.add_argument("--dataset-k", type=int, nargs="+", default=[8, 256])
    ap.add_argument("--threads", type=int, default=None, help="threads for every library (default: all cores)")
    ap.add_argument("--skip", choices=("image", "dataset"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.cells, args.dim, args.k = 8, 64, 32, [4]
        args.sklearn_images = args.faiss_images = 4
        args.rows, args.rows_dim, args.dataset_k = 20_000, 16, [8]
    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.skip != "image":
        per_image(args, threads)
    if args.skip != "dataset":
        dataset(args, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
