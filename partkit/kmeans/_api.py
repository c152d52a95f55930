"""The public k-means API: a scikit-learn style estimator (torch below ``FAISS_MIN_ROWS`` rows,
faiss from there on), many problems batched, the elbow rule, and sample weights (``weighted_kmeans``,
for ``partkit rank``). Arguments are checked here; the solving is :mod:`._engine`'s and :mod:`._faiss`'s.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .._runtime import resolve_device
from ..errors import PartkitError
from ._engine import (
    CHUNK_BYTES, INITS, METRICS, KMeansResult, nearest_center, normalize_rows, run_batched, run_weighted,
)
from ._faiss import faiss_assign, faiss_kmeans

__all__ = ["KMeans", "batched_kmeans", "elbow_kmeans", "elbow_pick", "weighted_kmeans", "partition_centers",
           "FAISS_MIN_ROWS"]

# One big problem goes to faiss from this many rows on (below it, exact batched Lloyd is as fast).
FAISS_MIN_ROWS = 100_000


def _check_matrix(X, what: str = "X", finite: bool = True) -> np.ndarray:
    """``X`` as a 2-D numeric array; NaN / inf refused unless ``finite`` is False (the batched engine tests
    each problem as it copies it into its chunk)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise PartkitError(f"{what} must be 2-D (n_samples x n_features), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise PartkitError(f"{what} must be numeric, got dtype {X.dtype}")
    if finite and not _all_finite(X):
        raise PartkitError(f"{what} holds NaN or inf values; clean the features first")
    return X


def _all_finite(X: np.ndarray, rows: int = 1 << 16) -> bool:
    # in row blocks: np.isfinite on a 1 GB matrix would allocate a 256 MB mask
    return all(np.isfinite(X[s:s + rows]).all() for s in range(0, len(X), rows))


def _check_choice(value, choices, option: str):
    if value not in choices:
        raise PartkitError(f"unknown {option} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def _seeds(random_state, count: int) -> list:
    if random_state is None or isinstance(random_state, (int, np.integer)):
        base = 0 if random_state is None else int(random_state)
        return [[base, i] for i in range(count)]
    seeds = list(random_state)
    if len(seeds) != count:
        raise PartkitError(f"random_state lists {len(seeds)} seeds for {count} problems; give one per problem")
    return seeds


def batched_kmeans(problems: Sequence[np.ndarray], n_clusters: Union[int, Sequence[int]], *, metric: str = "l2",
                   init: Union[str, np.ndarray, Sequence[np.ndarray]] = "auto", max_iter: int = 100,
                   tol: float = 1e-4, random_state=0, device="cpu",
                   chunk_bytes: int = CHUNK_BYTES) -> list[KMeansResult]:
    """Solve many small k-means problems at once (exact Lloyd, batched on padded tensors).

    ``problems`` are ``n_i x D`` arrays; ``n_clusters`` is one k or one per problem (a problem with
    fewer rows than k uses k = n_i, see ``KMeansResult.n_clusters``). ``init`` is ``"auto"`` (the
    default: ``"k-means||"`` from k = 12 on, else ``"k-means++"``), ``"k-means++"`` (greedy, as
    scikit-learn), ``"k-means||"`` (Bahmani et al.), ``"random"``, one ``k x D`` array for all problems or a list of
    per-problem arrays (warm start: ids keep their meaning, empty clusters stay empty).
    ``random_state`` is an int (problem i uses seed ``(random_state, i)``, so
    ``KMeans(random_state=s).fit(X)`` equals ``batched_kmeans([X], k, random_state=s)[0]``) or a
    list of per-problem seeds. Results do not depend on which problems are solved together (nor on
    ``chunk_bytes``, the working-set size of one padded batch).
    """
    _check_choice(metric, METRICS, "metric")
    if max_iter < 1:
        raise PartkitError(f"max_iter must be at least 1, got {max_iter}")
    if tol < 0:
        raise PartkitError(f"tol must be >= 0, got {tol}")
    mats = [normalize_rows(_check_matrix(p, f"problem {i}", finite=False), metric) for i, p in enumerate(problems)]
    if not mats:
        return []
    dims = {m.shape[1] for m in mats}
    if len(dims) > 1:
        raise PartkitError(f"problems have different feature sizes {sorted(dims)}; they must share D")
    ks = [int(n_clusters)] * len(mats) if np.isscalar(n_clusters) else [int(k) for k in n_clusters]
    if len(ks) != len(mats):
        raise PartkitError(f"n_clusters lists {len(ks)} values for {len(mats)} problems")
    if min(ks) < 1:
        raise PartkitError(f"n_clusters must be at least 1, got {min(ks)}")
    if not isinstance(init, str):
        inits = [init] * len(mats) if isinstance(init, np.ndarray) else list(init)
        if len(inits) != len(mats):
            raise PartkitError(f"init lists {len(inits)} arrays for {len(mats)} problems")
        init = [np.asarray(c, np.float32).reshape(-1, mats[0].shape[1]) for c in inits]
    else:
        _check_choice(init, INITS, "init")
    return run_batched(mats, ks, init=init, max_iter=max_iter, tol=tol, seeds=_seeds(random_state, len(mats)),
                       device=resolve_device(str(device)), chunk_bytes=chunk_bytes)


def partition_centers(X: np.ndarray, labels: np.ndarray, min_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The start of a k-means that continues a previous partition: ``(centres, ids)``.

    ``labels`` gives each row of ``X`` its previous part id (ids below ``min_id`` mean "no part");
    the centres are the means of each present part's rows, in the order of ``ids`` (the sorted
    present ids), so result cluster ``j`` continues part ``ids[j]``. Used by ``cluster
    --warm-start parts`` and by part-contrast's later rounds (PARTICLE Sec. 6.3).
    """
    labels = np.asarray(labels).ravel()
    sel = labels >= min_id
    ids = np.unique(labels[sel])
    if len(ids) == 0:
        return np.zeros((0, X.shape[1]), np.float32), ids
    inv = np.searchsorted(ids, labels[sel])
    sums = np.zeros((len(ids), X.shape[1]), np.float64)
    np.add.at(sums, inv, X[sel])
    return (sums / np.bincount(inv, minlength=len(ids))[:, None]).astype(np.float32), ids


def _sse_about_mean(x: np.ndarray) -> float:
    """Inertia at k = 1."""
    if len(x) == 0:
        return 0.0
    return float(((x - x.mean(0, dtype=np.float64)) ** 2).sum())


def elbow_kmeans(problems: Sequence[np.ndarray], *, k_range: tuple[int, int] = (2, 14), fraction: float = 0.975,
                 metric: str = "l2", **kwargs) -> list[KMeansResult]:
    """k-means with k chosen per problem by the elbow rule (Amir et al.): the smallest k in
    ``k_range`` whose inertia drop from k = 1 reaches ``fraction`` of the drop at the largest k."""
    lo, hi = k_range
    if not 1 <= lo <= hi:
        raise PartkitError(f"k range {lo}..{hi} is empty; need 1 <= low <= high")
    if not 0 < fraction <= 1:
        raise PartkitError(f"elbow fraction must be in (0, 1], got {fraction}")
    ks = list(range(lo, hi + 1))
    runs = [batched_kmeans(problems, k, metric=metric, **kwargs) for k in ks]
    out = []
    for i, x in enumerate(problems):
        total = _sse_about_mean(normalize_rows(np.asarray(x), metric))
        best = elbow_pick(np.array([r[i].inertia for r in runs]), total, ks, fraction)
        out.append(runs[ks.index(best)][i])
    return out


class KMeans:
    """k-means with scikit-learn's estimator API: ``KMeans(4).fit(X).labels_``.

    ``metric="cosine"`` L2-normalises the rows first (centres are means of unit vectors);
    ``"l2"`` is plain Euclidean k-means, as scikit-learn. ``backend="auto"`` runs exact batched
    Lloyd on torch (``device``) below 100,000 rows and faiss from there on (with our own seeded
    subsample of ``k * max_points_per_centroid`` rows and k-means++ seeding; the settings are in
    ``faiss_settings_``). ``max_iter`` defaults to 100 (torch, stops at ``tol``) or 25 (faiss).

    Attributes: ``cluster_centers_``, ``labels_``, ``inertia_``, ``n_iter_``, ``n_features_in_``.
    """

    def __init__(self, n_clusters: int = 8, *, metric: str = "l2", init: Union[str, np.ndarray] = "auto",
                 max_iter: Optional[int] = None, tol: float = 1e-4, random_state: Optional[int] = 0,
                 device="cpu", backend: str = "auto", max_points_per_centroid: int = 256):
        self.n_clusters = n_clusters
        self.metric = metric
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.backend = backend
        self.max_points_per_centroid = max_points_per_centroid

    def _pick_backend(self, n: int) -> str:
        _check_choice(self.backend, ("auto", "torch", "faiss"), "backend")
        if self.backend != "auto":
            return self.backend
        return "faiss" if n >= FAISS_MIN_ROWS else "torch"

    def fit(self, X, y=None) -> "KMeans":
        X = _check_matrix(X)
        _check_choice(self.metric, METRICS, "metric")
        if self.n_clusters < 1:
            raise PartkitError(f"n_clusters must be at least 1, got {self.n_clusters}")
        if len(X) == 0:
            raise PartkitError("X has no rows; k-means needs at least one sample")
        if not isinstance(self.init, str) and np.shape(self.init) != (self.n_clusters, X.shape[1]):
            raise PartkitError(f"init has shape {np.shape(self.init)}; expected (n_clusters, n_features) = "
                               f"({self.n_clusters}, {X.shape[1]})")
        seed = 0 if self.random_state is None else int(self.random_state)
        backend = self._pick_backend(len(X))
        if backend == "torch":
            init = self.init if isinstance(self.init, str) else [np.asarray(self.init, np.float32)]
            r = batched_kmeans([X], self.n_clusters, metric=self.metric, init=init, max_iter=self.max_iter or 100,
                               tol=self.tol, random_state=seed, device=self.device)[0]
            self.cluster_centers_, self.labels_, self.inertia_, self.n_iter_ = r.centers, r.labels, r.inertia, r.n_iter
            self.faiss_settings_ = None
        else:
            Xm = np.ascontiguousarray(normalize_rows(X, self.metric))
            k = min(int(self.n_clusters), len(Xm))
            init = self.init if isinstance(self.init, str) else np.asarray(self.init, np.float32)
            if isinstance(init, str):
                _check_choice(init, INITS, "init")
            centers, settings = faiss_kmeans(Xm, k, max_iter=self.max_iter or 25, seed=seed, init=init,
                                             max_points_per_centroid=self.max_points_per_centroid)
            self.labels_, dist = faiss_assign(Xm, centers, settings["threads"])
            self.cluster_centers_, self.inertia_ = centers, float(dist.sum(dtype=np.float64))
            self.n_iter_, self.faiss_settings_ = settings["niter"], settings
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        if not hasattr(self, "cluster_centers_"):
            raise PartkitError("this KMeans is not fitted yet; call fit(X) first")
        X = _check_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise PartkitError(f"X has {X.shape[1]} features, but KMeans was fitted with {self.n_features_in_}")
        return nearest_center(normalize_rows(X, self.metric), self.cluster_centers_, self.device)[0]

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_


def weighted_kmeans(X: np.ndarray, sample_weight: np.ndarray, groups: Sequence[np.ndarray], n_clusters, *,
                    metric: str = "l2", max_iter: int = 300, tol: float = 1e-4, seeds: Optional[Sequence] = None,
                    device="cpu", chunk_bytes: int = CHUNK_BYTES) -> list[KMeansResult]:
    """Weighted k-means (k-means++ seeding, Lloyd) of each group of rows of ``X``, all groups batched.

    ``groups[i]`` holds the row numbers of problem i; ``sample_weight`` (one positive weight per row)
    weights the means and the inertia, as scikit-learn's ``sample_weight``. ``n_clusters`` is one k or
    one per problem (``min(k, n_i)`` centres are used). ``metric="cosine"`` L2-normalises the rows
    first (inside each batch, so ``X`` is never copied whole). Problem i draws its random numbers
    from ``seeds[i]`` (default ``[0, i]``) alone, so its result does not depend on the other groups.

    >>> X = np.random.default_rng(0).normal(size=(52, 4)).astype(np.float32)
    >>> [r.n_clusters for r in weighted_kmeans(X, np.ones(52), [np.arange(50), np.arange(50, 52)], 3)]
    [3, 2]
    """
    if max_iter < 1:
        raise PartkitError(f"max_iter must be at least 1, got {max_iter}")
    if metric not in ("l2", "cosine"):
        raise PartkitError(f"unknown metric {metric!r}; use l2 or cosine")
    X = np.asarray(X, dtype=np.float32)
    w_all = np.asarray(sample_weight, dtype=np.float32).reshape(-1)
    if X.ndim != 2 or len(w_all) != len(X):
        raise PartkitError(f"X must be n x D with one weight per row; got X {X.shape} and {len(w_all)} weights")
    if len(w_all) and not (np.isfinite(w_all).all() and w_all.min() > 0):
        raise PartkitError("sample weights must be positive and finite")
    groups = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
    ks = [int(n_clusters)] * len(groups) if np.isscalar(n_clusters) else [int(k) for k in n_clusters]
    if len(ks) != len(groups) or (ks and min(ks) < 1):
        raise PartkitError("n_clusters must be one positive k, or one per group")
    seeds = [[0, i] for i in range(len(groups))] if seeds is None else list(seeds)
    return run_weighted(X, w_all, groups, ks, metric=metric, max_iter=max_iter, tol=tol, seeds=seeds,
                        device=resolve_device(str(device)), chunk_bytes=chunk_bytes)


def elbow_pick(inertias: np.ndarray, total: float, ks: Sequence[int], fraction: float) -> int:
    """Smallest k whose inertia drop from k=1 reaches ``fraction`` of the drop at the largest k."""
    drop = total - np.asarray(inertias, np.float64)
    goal = fraction * drop[-1]
    for k, d in zip(ks, drop):
        if d >= goal - 1e-12 * max(total, 1.0):
            return int(k)
    return int(ks[-1])
