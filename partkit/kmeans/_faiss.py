"""k-means of one big problem with faiss (numpy and faiss only, no torch), its traps set explicitly."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ._seeding import _rng, kmeans_plusplus_numpy, problem_draws


def _faiss_threads(threads: Optional[int]) -> int:
    import faiss

    return int(threads or faiss.omp_get_max_threads())


# k-means++ for the faiss path runs on this many rows per centroid: seeding streams its input once
# per centre, so on all k*256 training rows it would cost a third of the whole fit at k=256.
SEED_POINTS_PER_CENTROID = 32


def faiss_kmeans(X: np.ndarray, k: int, *, max_iter: int, seed: int, max_points_per_centroid: int = 256,
                 init: str | np.ndarray = "k-means++", trials: Optional[int] = None, threads: Optional[int] = None):
    """k-means on one big ``n x D`` float32 array with faiss; returns ``(centers, settings)``.

    faiss's traps are set explicitly: ``verbose`` off (it prints to fd 1 with C printf), our own
    seeded subsample of ``k * max_points_per_centroid`` rows (faiss would draw one with seed 1234),
    and greedy k-means++ seeds (faiss's random start loses badly at large k), drawn from
    ``k * SEED_POINTS_PER_CENTROID`` of those rows. Needs no torch, so the footprint is faiss's.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    n, D = X.shape
    rng = _rng([seed, 1])
    m = k * max_points_per_centroid
    train = X[np.sort(rng.choice(n, size=m, replace=False))] if n > m else X
    train = np.ascontiguousarray(train, dtype=np.float32)
    threads = _faiss_threads(threads)
    if isinstance(init, str):
        pool = train
        if init != "random" and len(train) > k * SEED_POINTS_PER_CENTROID:
            pool = train[np.sort(_rng([seed, 3]).choice(len(train), k * SEED_POINTS_PER_CENTROID, replace=False))]
        picks = problem_draws([seed, 2], len(pool), k, "random" if init == "random" else "k-means++", trials)
        # one BLAS thread: the seeding's products are small, and a second OpenBLAS thread made it ~3x slower
        with threadpool_limits(1):
            C0 = pool[picks["pick"]] if init == "random" else kmeans_plusplus_numpy(pool, k, picks)
    else:
        C0 = np.asarray(init, np.float32)
    with threadpool_limits(threads):
        settings = {"niter": int(max_iter), "seed": int(seed), "max_points_per_centroid": int(max_points_per_centroid),
                    "min_points_per_centroid": 1, "trained_on": int(len(train)), "nredo": 1, "spherical": False,
                    "verbose": False, "threads": threads,
                    "init": ("random" if init == "random" else "k-means++") if isinstance(init, str) else "warm-start",
                    "seeded_from": int(min(len(train), k * SEED_POINTS_PER_CENTROID))}
        km = faiss.Kmeans(D, k, niter=max_iter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                          min_points_per_centroid=1, nredo=1, spherical=False, verbose=False)
        previous = faiss.omp_get_max_threads()
        try:
            faiss.omp_set_num_threads(threads)
            km.train(train, init_centroids=np.ascontiguousarray(C0, np.float32))
        finally:
            faiss.omp_set_num_threads(previous)
    return np.asarray(km.centroids, np.float32).reshape(k, D), settings


def faiss_assign(X: np.ndarray, centers: np.ndarray, threads: Optional[int] = None):
    """Nearest centre of each row with a flat faiss index: ``(labels int64, squared distances float32)``."""
    import faiss
    from threadpoolctl import threadpool_limits

    threads = _faiss_threads(threads)
    index = faiss.IndexFlatL2(centers.shape[1])
    index.add(np.ascontiguousarray(centers, np.float32))
    previous = faiss.omp_get_max_threads()
    try:
        with threadpool_limits(threads):
            faiss.omp_set_num_threads(threads)
            dist, lab = index.search(np.ascontiguousarray(X, np.float32), 1)
    finally:
        faiss.omp_set_num_threads(previous)
    return lab[:, 0].astype(np.int64), dist[:, 0]
