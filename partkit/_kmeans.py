"""k-means machinery: batched Lloyd for many small problems on padded tensors, faiss for one big one.

Many small problems (the cells of one image or one object) are sorted by size, cut into chunks
that fit in cache, zero-padded to ``B x N x D`` and solved together: distances with one
``baddbmm``, centroid sums with ``index_add_``. After the first iteration the sums are updated
only for the cells that changed cluster, and problems that converged leave the chunk. On CPU,
chunks run in parallel threads of one torch thread each. All random draws are made per problem on
the CPU from the problem's own seed, so a problem's result does not depend on which others share
its chunk, and CPU and CUDA runs make the same choices.

torch is imported only where it is used: the faiss path (one big problem) needs numpy and faiss
alone, so its memory footprint is faiss's (importing torch costs ~500 MB of RSS).

The public wrappers (``KMeans``, ``batched_kmeans``) live in :mod:`partkit.cluster`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import PartkitError

__all__ = ["KMeansResult", "normalize_rows", "run_batched", "kmeans_plusplus", "kmeans_parallel",
           "kmeans_plusplus_numpy", "faiss_kmeans", "faiss_assign", "elbow_pick"]

METRICS = ("cosine", "l2")
INITS = ("k-means++", "k-means||", "random")
# k-means|| seeding: rounds, and candidates drawn per round per centre
PARALLEL_ROUNDS, PARALLEL_OVERSAMPLE = 2, 2
# Working-set size of one chunk: a quarter of this machine's L3, so a chunk stays in cache across
# its iterations (one padded batch of a hundred images ran several times slower here).
CHUNK_BYTES = 8 << 20


@dataclass
class KMeansResult:
    """One problem's solution; ``centers`` are in the metric's space (unit rows for cosine)."""

    centers: np.ndarray  # (k, D) float32
    labels: np.ndarray  # (n,) int64 in 0..k-1
    inertia: float  # sum of squared distances to the assigned centre
    n_iter: int
    n_clusters: int  # centres used: min(k, n), or the rows of a warm-start init
    converged: bool


def normalize_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """float32 rows, L2-normalised for ``cosine`` (zero rows stay zero); a no-op copy-free path for ``l2``."""
    if metric not in METRICS:
        raise PartkitError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    x = np.asarray(x, dtype=np.float32)
    if metric == "cosine":
        norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
        x = x / np.maximum(norm, 1e-12)[:, None]
    return x


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def n_local_trials(k: int) -> int:
    """Candidates per greedy k-means++ step, as scikit-learn."""
    return 2 + int(math.log(k)) if k > 1 else 1


def _draws(seed, n: int, k: int, init: str, trials: Optional[int]) -> dict:
    """A problem's random numbers, drawn up front so chunking cannot change them."""
    rng = _rng(seed)
    if init == "random":
        return {"pick": rng.choice(n, size=k, replace=False)}
    L = trials or n_local_trials(k)
    if init == "k-means||":
        return {"first": rng.random(), "rounds": rng.random((PARALLEL_ROUNDS, PARALLEL_OVERSAMPLE * k)),
                "u": rng.random((max(k - 1, 0), L))}
    return {"first": rng.random(), "u": rng.random((max(k - 1, 0), L))}


def _take(X: torch.Tensor, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``X[b, i]`` for a ``B x N x ...`` tensor, via ``index_select`` (advanced indexing is several times
    slower on CPU)."""
    B, N = X.shape[:2]
    return X.reshape(B * N, *X.shape[2:]).index_select(0, (b * N + i).flatten()).view(*i.shape, *X.shape[2:])


def _select(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return v.index_select(0, rows)


def trial_table(draws: list, B: int, K: int, dev):
    """Per-problem uniform draws of k-means++ local trials, padded into ``B x (K-1) x L`` tensors.

    Returns ``(U, trial_ok)``: the draws and which of the ``L`` trial slots each problem uses.
    """
    import torch

    L = max(d["u"].shape[1] for d in draws) if K > 1 else 1
    U = np.zeros((B, max(K - 1, 0), L))
    trial_ok = np.zeros((B, L), dtype=bool)
    for b, d in enumerate(draws):
        U[b, :d["u"].shape[0], :d["u"].shape[1]] = d["u"]
        trial_ok[b, :d["u"].shape[1]] = True
    return torch.from_numpy(U).to(dev), torch.from_numpy(trial_ok).to(dev)


def kmeans_plusplus(X: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, kk: torch.Tensor,
                    draws: Sequence[dict]):
    """Greedy k-means++ seeding (as scikit-learn) for a padded batch ``B x N x D``.

    Returns the ``B x K x D`` centres and, for free, each cell's nearest centre and squared
    distance to it (the first Lloyd assignment).
    """
    import torch

    B, N, D = X.shape
    K = int(kk.max())
    dev = X.device
    ar = torch.arange(B, device=dev)
    U, trial_ok = trial_table(draws, B, K, dev)
    nf = n.to(torch.float64)
    first = torch.minimum((torch.tensor([d["first"] for d in draws], device=dev) * nf).long(), n - 1)
    C = X.new_zeros(B, K, D)
    C[:, 0] = _take(X, ar, first)
    closest = torch.baddbmm((x2 + _take(x2, ar, first)[:, None])[:, None, :], C[:, :1], X.transpose(1, 2), alpha=-2)
    closest = closest[:, 0].clamp_min(0) * mask
    labels = torch.zeros((B, N), dtype=torch.long, device=dev)
    pot = closest.sum(1, dtype=torch.float64)
    for c in range(1, K):
        cum = closest.cumsum(1, dtype=torch.float64)
        r = U[:, c - 1] * pot[:, None]
        cand = torch.minimum(torch.searchsorted(cum, r), (n - 1)[:, None])  # B x L
        Xc = _take(X, ar[:, None], cand)  # B x L x D
        raw = torch.baddbmm(x2[:, None, :] + x2.gather(1, cand)[:, :, None], Xc, X.transpose(1, 2), alpha=-2)
        d = torch.minimum(raw.clamp_min_(0), closest[:, None, :]) * mask[:, None, :]
        p = d.sum(2, dtype=torch.float64).masked_fill(~trial_ok, math.inf)
        best = p.argmin(1)
        take = c < kk
        C[:, c] = torch.where(take[:, None], _take(Xc, ar, best), C[:, c])
        labels = torch.where(take[:, None] & (_take(raw, ar, best) < closest), c, labels)
        closest = torch.where(take[:, None], _take(d, ar, best), closest)
        pot = torch.where(take, p.gather(1, best[:, None])[:, 0], pot)
    return C, labels, closest


def kmeans_parallel(X: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, kk: torch.Tensor,
                    draws: Sequence[dict]):
    """k-means|| seeding (Bahmani et al. 2012) for a padded batch: a few rounds that each draw
    ``PARALLEL_OVERSAMPLE * k`` candidates by D^2 sampling (one batched product per round instead
    of one pass over the cells per centre), then greedy k-means++ on the candidates weighted by
    the cells nearest to each. Returns the ``B x K x D`` centres."""
    import torch

    B, N, D = X.shape
    K = int(kk.max())
    dev = X.device
    ar = torch.arange(B, device=dev)
    R, Lmax = PARALLEL_ROUNDS, PARALLEL_OVERSAMPLE * K
    U = np.zeros((B, R, Lmax))
    ok = np.zeros((B, Lmax), dtype=bool)
    for b, d in enumerate(draws):
        U[b, :, :d["rounds"].shape[1]] = d["rounds"]
        ok[b, :d["rounds"].shape[1]] = True
    U, ok = torch.from_numpy(U).to(dev), torch.from_numpy(ok).to(dev)
    first = torch.minimum((torch.tensor([d["first"] for d in draws], device=dev) * n.to(torch.float64)).long(), n - 1)
    picks = [first[:, None]]
    closest = torch.baddbmm((x2 + _take(x2, ar, first)[:, None])[:, None, :], _take(X, ar, first)[:, None],
                            X.transpose(1, 2), alpha=-2)[:, 0].clamp_min(0) * mask
    owner = torch.zeros((B, N), dtype=torch.long, device=dev)
    for r in range(R):
        cum = closest.cumsum(1, dtype=torch.float64)
        cand = torch.minimum(torch.searchsorted(cum, U[:, r] * cum[:, -1:]), (n - 1)[:, None])  # B x L
        d = torch.baddbmm(x2[:, None, :] + x2.gather(1, cand)[:, :, None], _take(X, ar[:, None], cand),
                          X.transpose(1, 2), alpha=-2).masked_fill_(~ok[:, :, None], math.inf)
        dmin, arg = d.min(1)
        closer = dmin < closest
        owner = torch.where(closer, arg + 1 + r * Lmax, owner)
        closest = torch.where(closer, dmin.clamp_min(0), closest) * mask
        picks.append(cand)
    cand = torch.cat(picks, 1)  # B x M
    M = cand.shape[1]
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), ok.repeat(1, R)], 1)
    w = torch.zeros(B, M, dtype=X.dtype, device=dev).scatter_add_(1, owner, mask.to(X.dtype))
    Y = _take(X, ar[:, None], cand)
    y2 = x2.gather(1, cand)
    G = torch.baddbmm(y2[:, :, None] + y2[:, None, :], Y, Y.transpose(1, 2), alpha=-2).clamp_min_(0)
    # weighted greedy k-means++ over the M candidates (as kmeans_plusplus, on a tiny problem)
    Ut, trial_ok = trial_table(draws, B, K, dev)
    w = w * valid
    chosen = torch.zeros(B, K, dtype=torch.long, device=dev)
    j0 = torch.searchsorted(w.cumsum(1, dtype=torch.float64), (torch.tensor([d["first"] for d in draws], device=dev)
                                                               * w.sum(1, dtype=torch.float64))[:, None])
    j0 = torch.minimum(j0[:, 0], torch.full_like(j0[:, 0], M - 1))
    chosen[:, 0] = j0
    cl = _take(G, ar, j0)
    for c in range(1, K):
        wc = (w * cl).cumsum(1, dtype=torch.float64)
        t = torch.searchsorted(wc, Ut[:, c - 1] * wc[:, -1:]).clamp_max_(M - 1)
        nd = torch.minimum(_take(G, ar[:, None], t), cl[:, None, :])
        p = (nd * w[:, None, :]).sum(2, dtype=torch.float64).masked_fill(~trial_ok, math.inf)
        best = p.argmin(1)
        take = c < kk
        chosen[:, c] = torch.where(take, t.gather(1, best[:, None])[:, 0], chosen[:, c])
        cl = torch.where(take[:, None], _take(nd, ar, best), cl)
    return _take(Y, ar[:, None], chosen)


def _sqnorm(X: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.linalg.vector_norm(X, dim=-1).square()


def _assign(X: torch.Tensor, x2: torch.Tensor, C: torch.Tensor, cbad: torch.Tensor):
    """Nearest centre per cell: (labels, squared distance to it)."""
    import torch

    c2 = _sqnorm(C).masked_fill(cbad, math.inf)
    # scores as B x K x N: measured ~1.6x faster than B x N x K for small K
    s = torch.baddbmm(c2[:, :, None], C, X.transpose(1, 2), alpha=-2)
    d1, labels = s.min(1)
    return labels, (d1 + x2).clamp_min(0)


def _relocate_empty(b: int, X, mask, C_new, sums, counts, owner, cvalid, K: int) -> None:
    """Move each empty centre of problem ``b`` onto the cell farthest from its centre (scikit-learn's rule)."""
    import torch

    empty = ((counts[b, :K] == 0) & cvalid[b]).nonzero().flatten().tolist()
    valid = mask[b].nonzero().flatten()
    lab = owner[b, valid]
    dist = ((X[b].index_select(0, valid) - C_new[b].index_select(0, lab)) ** 2).sum(-1)
    order = torch.argsort(dist, descending=True, stable=True)
    for j, i in zip(empty, order[: len(empty)].tolist()):
        if float(dist[i]) <= 0:
            break  # every cell sits on a centre (constant features): leave the centre empty
        cell = int(valid[i])
        old = int(owner[b, cell])
        x = X[b, cell]
        sums[b, old] -= x
        counts[b, old] -= 1
        sums[b, j] = x
        counts[b, j] = 1
        owner[b, cell] = j
        C_new[b, j] = x
        if counts[b, old] > 0:
            C_new[b, old] = sums[b, old] / counts[b, old]


def _lloyd_chunk(X, x2, mask, n, kk, C, max_iter: int, tol: float, relocate: bool, first=None):
    """Lloyd iterations on one padded chunk; yields ``(index_in_chunk, labels, centers, inertia, n_iter, converged)``.

    Stops as scikit-learn: when no label changes (strict), or when the centres move less than
    ``tol`` times the mean feature variance (then one more assignment gives the labels). After the
    first iteration, the centroid sums are updated only for cells that changed cluster. Finished
    problems stay in the batch, frozen, until a quarter of it is done; then it is compacted, so
    copies stay rare. ``first`` is the (labels, squared distances) of the first assignment when
    the seeding already computed them.
    """
    import torch

    B, N, D = X.shape
    K = C.shape[1]
    dev = X.device
    st = {
        "X": X, "mask": mask, "x2": x2, "C": C, "ids": torch.arange(B, device=dev), "tol": None,
        "cbad": torch.arange(K, device=dev)[None, :] >= kk[:, None],
        "owner": torch.full((B, N), K, dtype=torch.long, device=dev),  # slot K collects padding
        "sums": X.new_zeros(B, K + 1, D), "counts": X.new_zeros(B, K + 1),
        "pending": torch.zeros(B, dtype=torch.bool, device=dev),  # converged by tol: one last assignment
        "alive": torch.ones(B, dtype=torch.bool, device=dev),
    }
    it = 0

    def finish(rows, labels, d1, converged):
        for b in rows.nonzero().flatten().tolist():
            m = st["mask"][b]
            yield int(st["ids"][b]), labels[b][m], st["C"][b], float(d1[b][m].sum(dtype=torch.float64)), it, \
                bool(converged[b])
        st["alive"] = st["alive"] & ~rows

    while True:
        alive = st["alive"]
        if int(alive.sum()) <= 0.75 * alive.numel():
            if not alive.any():
                return
            keep = alive.nonzero().flatten()
            for name, v in st.items():
                st[name] = v.index_select(0, keep)
            alive = st["alive"]
        X, mask, C, owner, sums, counts = st["X"], st["mask"], st["C"], st["owner"], st["sums"], st["counts"]
        B = X.shape[0]
        labels, d1 = first if it == 0 and first is not None else _assign(X, st["x2"], C, st["cbad"])
        labels = labels.masked_fill(~mask, K)
        fin = alive & (st["pending"] | (it >= max_iter))
        if fin.any():
            yield from finish(fin, labels, d1, st["pending"])
            alive = st["alive"]
            if not alive.any():
                return
        base = (torch.arange(B, device=dev) * (K + 1))[:, None]
        if it == 0:
            idx = (labels + base).flatten()
            sums.view(-1, D).index_add_(0, idx, X.reshape(-1, D))
            counts.view(-1).index_add_(0, idx, torch.ones_like(idx, dtype=X.dtype))
            changed_any = alive
            # scikit-learn's tolerance: relative to the mean per-feature variance
            nf = n.to(torch.float64)
            mean = sums.sum(1, dtype=torch.float64) / nf[:, None]
            var = (x2.sum(1, dtype=torch.float64) / nf - (mean * mean).sum(1)).clamp_min(0) / D
            st["tol"] = (tol * var).to(X.dtype)
        else:
            moved = (labels != owner) & alive[:, None]
            changed_any = moved.any(1)
            flat = moved.flatten().nonzero().flatten()
            if flat.numel():
                rows = X.reshape(B * N, D).index_select(0, flat)
                new = (labels + base).flatten().index_select(0, flat)
                old = (owner + base).flatten().index_select(0, flat)
                ones = torch.ones_like(new, dtype=X.dtype)
                sums.view(-1, D).index_add_(0, new, rows).index_add_(0, old, rows, alpha=-1)
                counts.view(-1).index_add_(0, new, ones).index_add_(0, old, ones, alpha=-1)
        st["owner"] = owner = torch.where(alive[:, None], labels, owner)
        it += 1
        cnt = counts[:, :K]
        C_new = torch.where(cnt[..., None] > 0, sums[:, :K] / cnt.clamp_min(1)[..., None], C)
        if relocate:
            for b in ((cnt == 0) & ~st["cbad"] & changed_any[:, None]).any(1).nonzero().flatten().tolist():
                _relocate_empty(b, X, mask, C_new, sums, counts, owner, ~st["cbad"], K)
        shift = ((C_new - C) ** 2).sum((1, 2))
        st["C"] = C_new
        # strict: no label changed, so the centres are already their means; no extra assignment
        strict = alive & ~changed_any
        if strict.any():
            yield from finish(strict, labels, d1, strict)
        st["pending"] = shift <= st["tol"]


def _chunks(sizes: Sequence[int], dim: int, chunk_bytes: int):
    """Consecutive runs of problems (sorted by size, largest first) whose padded batch fits ``chunk_bytes``."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    order = [i for i in order if sizes[i] > 0]
    start = 0
    while start < len(order):
        top = sizes[order[start]]
        per = max(1, chunk_bytes // max(1, top * dim * 4))
        yield order[start:start + per]
        start += per


def _solve_chunk(chunk: list, problems, sizes, kk_all, init, seeds, max_iter, tol, dev, trials, results) -> None:
    import torch

    warm = not isinstance(init, str)
    D = problems[chunk[0]].shape[1]
    B, N = len(chunk), sizes[chunk[0]]
    Xn = np.empty((B, N, D), np.float32)
    for j, i in enumerate(chunk):
        Xn[j, :sizes[i]] = problems[i]
        Xn[j, sizes[i]:] = 0
    X = torch.from_numpy(Xn).to(dev)
    n = torch.tensor([sizes[i] for i in chunk], device=dev)
    kk = torch.tensor([kk_all[i] for i in chunk], device=dev)
    mask = torch.arange(N, device=dev)[None, :] < n[:, None]
    x2 = _sqnorm(X)
    K = int(kk.max())
    first = None
    if warm:
        Cn = np.zeros((B, K, D), np.float32)
        for j, i in enumerate(chunk):
            Cn[j, :kk_all[i]] = init[i]
        C = torch.from_numpy(Cn).to(dev)
    else:
        draws = [_draws(seeds[i], sizes[i], kk_all[i], init, trials) for i in chunk]
        if init == "random":
            C = X.new_zeros(B, K, D)
            for j, d in enumerate(draws):
                C[j, :len(d["pick"])] = X[j, torch.from_numpy(d["pick"]).to(dev)]
        elif init == "k-means||":
            C = kmeans_parallel(X, x2, mask, n, kk, draws)
        else:
            C, lab0, d0 = kmeans_plusplus(X, x2, mask, n, kk, draws)
            first = (lab0, d0)
    for j, labels, centers, inertia, it, conv in _lloyd_chunk(X, x2, mask, n, kk, C, max_iter, tol, not warm, first):
        i = chunk[j]
        results[i] = KMeansResult(centers[:kk_all[i]].float().cpu().numpy(), labels.cpu().numpy().astype(np.int64),
                                  inertia, it, kk_all[i], conv)


def _single_threaded(fn):
    """Run ``fn`` with torch limited to one thread in the calling (worker) thread."""
    def run(*args):
        import torch

        torch.set_num_threads(1)
        return fn(*args)

    return run


def run_batched(problems: Sequence[np.ndarray], ks: Sequence[int], *, init, max_iter: int, tol: float,
                seeds: Sequence, device, trials: Optional[int] = None,
                chunk_bytes: int = CHUNK_BYTES) -> list[KMeansResult]:
    """Solve ``problems[i]`` (``n_i x D`` float32, already in the metric's space) with ``ks[i]`` clusters.

    ``init`` is ``"k-means++"``, ``"random"`` or a list of per-problem ``k_i x D`` arrays (warm start,
    which keeps empty clusters in place so that ids keep their meaning).

    On CPU with several torch threads, chunks run in parallel, one thread each: the ops on a
    cache-sized chunk are too small to split, and OpenMP barriers on many small ops collapse
    when the cores are shared (measured 5-20x slower under load).
    """
    import torch

    dev = torch.device(device)
    D = problems[0].shape[1] if problems else 0
    results: list[Optional[KMeansResult]] = [None] * len(problems)
    warm = not isinstance(init, str)
    kk_all = [len(init[i]) if warm else min(int(ks[i]), problems[i].shape[0]) for i in range(len(problems))]
    for i, x in enumerate(problems):
        if x.shape[0] == 0 or kk_all[i] == 0:
            results[i] = KMeansResult(np.zeros((kk_all[i] if warm else 0, D), np.float32),
                                      np.zeros(0, np.int64), 0.0, 0, kk_all[i] if warm else 0, True)
    sizes = [p.shape[0] if results[i] is None else 0 for i, p in enumerate(problems)]
    chunks = list(_chunks(sizes, D, chunk_bytes))
    args = (problems, sizes, kk_all, init, seeds, max_iter, tol, dev, trials, results)
    workers = min(torch.get_num_threads(), len(chunks))
    if dev.type != "cpu" or workers < 2:
        for chunk in chunks:
            _solve_chunk(chunk, *args)
        return results  # type: ignore[return-value]
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="partkit-kmeans") as pool:
            list(pool.map(_single_threaded(lambda c: _solve_chunk(c, *args)), chunks))
    finally:
        torch.set_num_threads(threads)  # MKL's thread count is process-wide
    return results  # type: ignore[return-value]


def kmeans_plusplus_numpy(X: np.ndarray, k: int, draws: dict) -> np.ndarray:
    """k-means++ seeds for one big ``n x D`` float32 array (numpy and BLAS only, no torch)."""
    n = len(X)
    x2 = np.einsum("ij,ij->i", X, X)
    C = np.empty((k, X.shape[1]), np.float32)
    first = min(int(draws["first"] * n), n - 1)
    C[0] = X[first]
    closest = np.maximum(x2 + x2[first] - 2 * (X @ X[first]), 0)
    pot = closest.sum(dtype=np.float64)
    for c in range(1, k):
        cand = np.minimum(np.searchsorted(np.cumsum(closest, dtype=np.float64), draws["u"][c - 1] * pot), n - 1)
        d = x2[None, :] + x2[cand][:, None] - 2 * (X[cand] @ X.T)
        np.maximum(d, 0, out=d)
        np.minimum(d, closest[None, :], out=d)
        p = d.sum(1, dtype=np.float64)
        best = int(p.argmin())
        C[c], closest, pot = X[cand[best]], d[best], p[best]
    return C


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
        draws = _draws([seed, 2], len(pool), k, "random" if init == "random" else "k-means++", trials)
        # one BLAS thread: the seeding's products are small, and a second OpenBLAS thread made it ~3x slower
        with threadpool_limits(1):
            C0 = pool[draws["pick"]] if init == "random" else kmeans_plusplus_numpy(pool, k, draws)
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


def elbow_pick(inertias: np.ndarray, total: float, ks: Sequence[int], fraction: float) -> int:
    """Smallest k whose inertia drop from k=1 reaches ``fraction`` of the drop at the largest k."""
    drop = total - np.asarray(inertias, np.float64)
    goal = fraction * drop[-1]
    for k, d in zip(ks, drop):
        if d >= goal - 1e-12 * max(total, 1.0):
            return int(k)
    return int(ks[-1])
