"""The k-means engine: many small problems solved together on padded tensors, weights optional.

Problems (the cells of one image or one object, or the proposals of one class) are sorted by size,
cut into chunks that fit in cache, zero-padded and solved together: k-means++ seeding
(:mod:`._seeding`), then Lloyd with scikit-learn's stopping rules and its relocation of empty
clusters. After the first iteration the centroid sums are updated only for the rows that changed
cluster. All random draws are made per problem on the CPU from the problem's own seed, so a
problem's result does not depend on which others share its chunk, and CPU and CUDA runs make the
same choices.

Two layouts serve two kinds of caller:

- :func:`run_batched` (unweighted): ``B x N x D`` chunks, distances with one ``baddbmm``, sums with
  ``index_add_``; converged problems leave the chunk; on CPU, chunks run in parallel threads of
  one torch thread each.
- :func:`run_weighted` (per-row weights, problems given as row groups of one matrix, for
  ``partkit rank``): ``B x D x N`` chunks in one reused buffer, distances with ``bmm``
  (measured 1.5-2x faster for k <= 8), weighted sums; rows are L2-normalised inside the chunk.

torch is imported only where it is used: the faiss path (:mod:`._faiss`) needs numpy and faiss
alone (importing torch costs ~500 MB of RSS).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import PartkitError
from ._seeding import columns, kmeans_parallel, kmeans_plusplus, min_first, problem_draws, weighted_plusplus

__all__ = ["KMeansResult", "NonFinite", "normalize_rows", "run_batched", "run_weighted", "nearest_center", "METRICS",
           "INITS", "CHUNK_BYTES", "resolve_init", "PARALLEL_FROM_K"]

METRICS = ("cosine", "l2")
INITS = ("auto", "k-means++", "k-means||", "random")
# "auto" (the default): k-means|| from this k on, greedy k-means++ below it. Measured per image
# (784 x 384, 1 thread): k-means|| took 0.82x, 0.64x, 1.01x, 1.16x, 1.23x the speed of k-means++
# at k = 4, 8, 12, 16, 25, at the same mean inertia (within 0.3%)
PARALLEL_FROM_K = 12


def resolve_init(init, k: int):
    """The seeding ``"auto"`` stands for at ``k`` clusters; any other ``init`` as given."""
    if isinstance(init, str) and init == "auto":
        return "k-means||" if k >= PARALLEL_FROM_K else "k-means++"
    return init
# Working-set size of one chunk: big enough that each op's fixed cost is shared by many problems,
# small enough to stay in cache across the iterations. Measured per image (784 x 384, images/s,
# 1 / 2 threads): k=4 586 / 690 at 8 MB, 690 / 960 at 16, 676 / 927 at 32, 445 / 679 at 64;
# k=25 193 / 281, 209 / 338, 195 / 321, 167 / 285.
CHUNK_BYTES = 16 << 20


class NonFinite(PartkitError):
    """Problem ``index`` holds NaN or inf values (found while it is copied into its chunk)."""

    def __init__(self, index: int):
        super().__init__(f"problem {index} holds NaN or inf values; clean the features first")
        self.index = index


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
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf rows stay non-finite: refused when solved
            norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
            x = x / np.maximum(norm, 1e-12)[:, None]
    return x


def _sqnorm(X: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.linalg.vector_norm(X, dim=-1).square()


def _assign(X: torch.Tensor, x2: torch.Tensor, C: torch.Tensor, cbad: torch.Tensor):
    """Nearest centre per cell: (labels, squared distance to it)."""
    import torch

    c2 = _sqnorm(C).masked_fill(cbad, math.inf)
    # scores as B x K x N: measured ~1.6x faster than B x N x K for small K
    s = torch.baddbmm(c2[:, :, None], C, X.transpose(1, 2), alpha=-2)
    d1, labels = min_first(s)
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


def _compact(X: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``X.index_select(0, keep)`` for increasing ``keep``, made in place: each kept problem moves down
    to its new slot (slots below it are already free) and the result is a view of ``X``'s front. A
    fresh copy of the chunk costs more than the iteration it serves (measured 2.3-3.2 ms for 10 of
    13 images of 784 x 384, 0.9 ms copying into existing memory)."""
    for dst, src in enumerate(keep.tolist()):
        if dst != src:
            X[dst].copy_(X[src])
    return X[:len(keep)]


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
                if name != "X":
                    st[name] = v.index_select(0, keep)
            st["X"] = _compact(st["X"], keep)
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
    # a NaN or inf value makes its row's squared norm non-finite, so only then is the problem
    # looked for (rows of finite values above ~1e19 overflow the norm too: they are solved as before)
    if not bool(torch.isfinite(x2).all()):
        for j, i in enumerate(chunk):
            if not np.isfinite(Xn[j, :sizes[i]]).all():
                raise NonFinite(i)
    K = int(kk.max())
    first = None
    if warm:
        Cn = np.zeros((B, K, D), np.float32)
        for j, i in enumerate(chunk):
            Cn[j, :kk_all[i]] = init[i]
        C = torch.from_numpy(Cn).to(dev)
    else:
        draws = [problem_draws(seeds[i], sizes[i], kk_all[i], init, trials) for i in chunk]
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
    """Solve ``problems[i]`` (``n_i x D`` float32, already in the metric's space) with ``ks[i]`` clusters;
    :class:`NonFinite` if one holds NaN or inf values.

    ``init`` is ``"auto"`` (:func:`resolve_init`), ``"k-means++"``, ``"k-means||"``, ``"random"`` or a list
    of per-problem ``k_i x D`` arrays (warm start,
    which keeps empty clusters in place so that ids keep their meaning).

    On CPU with several torch threads, chunks run in parallel, one thread each: the ops on a
    cache-sized chunk are too small to split, and OpenMP barriers on many small ops collapse
    when the cores are shared (measured 5-20x slower under load).
    """
    import torch

    dev = torch.device(device)
    D = problems[0].shape[1] if problems else 0
    results: list[Optional[KMeansResult]] = [None] * len(problems)
    if isinstance(init, str) and init == "auto":  # per problem, so a result never depends on the others
        results = [None] * len(problems)
        for kind in ("k-means++", "k-means||"):
            idx = [i for i in range(len(problems)) if resolve_init("auto", int(ks[i])) == kind]
            if idx:
                try:
                    got = run_batched([problems[i] for i in idx], [ks[i] for i in idx], init=kind,
                                      max_iter=max_iter, tol=tol, seeds=[seeds[i] for i in idx], device=device,
                                      trials=trials, chunk_bytes=chunk_bytes)
                except NonFinite as e:
                    raise NonFinite(idx[e.index]) from None
                for i, r in zip(idx, got):
                    results[i] = r
        return results
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


def _assign_columns(Xt, x2, C, cbad):
    """Nearest valid centre per row of a ``B x D x N`` batch: (labels, squared distance)."""
    import torch

    c2 = (C * C).sum(-1).masked_fill_(cbad, math.inf)
    # C @ Xt with Xt contiguous (B x D x N): measured 1.5-2x faster on CPU than X @ C^T for k <= 8
    d, labels = torch.bmm(C, Xt).mul_(-2).add_(c2[:, :, None]).min(1)
    return labels, d.add_(x2).clamp_min_(0)


def _weighted_lloyd(Xt, x2, W, valid, C, cbad, max_iter: int, tol: torch.Tensor, first: tuple):
    """Lloyd iterations with scikit-learn's stopping rules (strict label convergence, or a centre shift
    below ``tol``; then one more assignment) and its relocation of empty clusters to far points.

    The weighted centroid sums are computed in full once, then updated only for the rows that
    changed cluster (few after the first iterations), which halves the passes over the data.
    """
    import torch

    B, D, N = Xt.shape
    K = C.shape[1]
    dev = Xt.device
    active = torch.ones(B, dtype=torch.bool, device=dev)
    strict = torch.zeros_like(active)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    labels_old = owner = sums = wsum = None
    for it in range(max_iter):
        labels, d = first if it == 0 else _assign_columns(Xt, x2, C, cbad)
        if it == 0:
            onehot = Xt.new_zeros(B, K, N).scatter_(1, labels[:, None, :], W[:, None, :])
            sums, wsum = torch.bmm(onehot, Xt.transpose(1, 2)), onehot.sum(2)
            owner = labels.clone()  # the cluster whose sums hold each row
        else:
            bi, ii = ((labels != owner) & valid & active[:, None]).nonzero(as_tuple=True)
            if bi.numel():
                w = W[bi, ii]
                rows = columns(Xt, bi, ii) * w[:, None]
                new, old = bi * K + labels[bi, ii], bi * K + owner[bi, ii]
                sums.view(B * K, D).index_add_(0, new, rows).index_add_(0, old, rows, alpha=-1)
                wsum.view(-1).index_add_(0, new, w).index_add_(0, old, w, alpha=-1)
                owner[bi, ii] = labels[bi, ii]
        empty = (wsum <= 0) & ~cbad & active[:, None]
        for b in empty.any(1).nonzero().flatten().tolist():
            far = torch.argsort(d[b].masked_fill(~valid[b], -1.0), descending=True, stable=True)
            for j, i in zip(empty[b].nonzero().flatten().tolist(), far.tolist()):
                old_j, xw = int(owner[b, i]), Xt[b, :, i] * W[b, i]
                sums[b, old_j] -= xw
                wsum[b, old_j] -= W[b, i]
                sums[b, j], wsum[b, j], owner[b, i] = xw, W[b, i], j
        C_new = torch.where(wsum[..., None] > 0, sums / wsum.clamp_min(1e-30)[..., None], C)
        shift = ((C_new - C) ** 2).sum((1, 2))
        same = torch.zeros_like(active) if labels_old is None else ((labels == labels_old) | ~valid).all(1)
        n_iter += active.long()
        C = torch.where(active[:, None, None], C_new, C)
        strict |= active & same
        active &= ~same & (shift > tol)
        if not active.any():
            break
        labels_old = labels
    if not bool(strict.all()):  # else labels and distances already belong to the final centres
        labels, d = _assign_columns(Xt, x2, C, cbad)
    return C, labels, (d * W).sum(1, dtype=torch.float64), n_iter, strict | ~active


def run_weighted(X: np.ndarray, w_all: np.ndarray, groups: Sequence[np.ndarray], ks: Sequence[int], *,
                 metric: str, max_iter: int, tol: float, seeds: Sequence, device,
                 chunk_bytes: int = CHUNK_BYTES) -> list[KMeansResult]:
    """Weighted k-means of each row group ``X[groups[i]]`` (weights ``w_all``) with ``min(ks[i], n_i)`` centres.

    Inputs are checked by the caller (:func:`partkit.kmeans.weighted_kmeans`). ``metric="cosine"``
    L2-normalises the rows inside each chunk, so ``X`` is never copied whole.
    """
    import torch

    dev = torch.device(device)
    D = X.shape[1]
    results: list[Optional[KMeansResult]] = [None] * len(groups)
    sizes = [len(g) for g in groups]
    for i, n in enumerate(sizes):
        if n == 0:
            results[i] = KMeansResult(np.zeros((0, D), np.float32), np.zeros(0, np.int64), 0.0, 0, 0, True)
    chunks = list(_chunks(sizes, D, chunk_bytes))
    # one buffer for every chunk: fresh 10-100 MB allocations cost page faults on each chunk
    buf = torch.empty(max((len(c) * sizes[c[0]] for c in chunks), default=0) * D)
    Xs, ws = torch.from_numpy(X), torch.from_numpy(w_all)
    for chunk in chunks:
        B, N = len(chunk), sizes[chunk[0]]
        Xn, Wn, x2 = buf[:B * D * N].view(B, D, N), torch.zeros(B, N), torch.zeros(B, N)
        for j, i in enumerate(chunk):
            g = torch.from_numpy(groups[i])
            rows = Xs.index_select(0, g)
            norm = torch.linalg.vector_norm(rows, dim=1)
            if metric == "cosine":
                rows /= norm.clamp_min(1e-12)[:, None]
                norm = (norm > 0).to(norm.dtype)  # unit rows; zero rows stay zero
            Xn[j, :, :sizes[i]].copy_(rows.T)
            Xn[j, :, sizes[i]:] = 0
            Wn[j, :sizes[i]], x2[j, :sizes[i]] = ws.index_select(0, g), norm.square()
        if not bool(torch.isfinite(x2).all()):
            raise PartkitError("features hold NaN or inf values")
        Xt, W, x2 = Xn.to(dev), Wn.to(dev), x2.to(dev)
        n = torch.tensor([sizes[i] for i in chunk], device=dev)
        kk = torch.tensor([min(ks[i], sizes[i]) for i in chunk], device=dev)
        valid = torch.arange(N, device=dev)[None, :] < n[:, None]
        # scikit-learn's tolerance: tol x the mean per-feature variance, = (E||x||^2 - ||E x||^2) / D
        mean = Xt.sum(2).double() / n[:, None]
        tol_b = tol * (x2.sum(1, dtype=torch.float64) / n - (mean * mean).sum(1)).clamp_min(0) / D
        draws = [problem_draws(seeds[i], sizes[i], min(ks[i], sizes[i]), "k-means++", None) for i in chunk]
        C, labels0, d0 = weighted_plusplus(Xt, x2, W, n, kk, draws)
        cbad = torch.arange(C.shape[1], device=dev)[None, :] >= kk[:, None]
        C, labels, inertia, n_iter, conv = _weighted_lloyd(Xt, x2, W, valid, C, cbad, max_iter, tol_b.to(Xt.dtype),
                                                           (labels0, d0))
        for j, i in enumerate(chunk):
            k = int(kk[j])
            results[i] = KMeansResult(C[j, :k].cpu().numpy(), labels[j, :sizes[i]].cpu().numpy().astype(np.int64),
                                      float(inertia[j]), int(n_iter[j]), k, bool(conv[j]))
    return results  # type: ignore[return-value]


def nearest_center(X: np.ndarray, centers: np.ndarray, device="cpu", rows: int = 65536):
    """Nearest centre of each row of ``X`` (in the metric's space): ``(labels int64, squared distances
    float32)``, with torch on ``device``, in row chunks to bound memory."""
    import torch

    dev = torch.device(device)
    C = torch.from_numpy(np.ascontiguousarray(centers, np.float32)).to(dev)
    c2 = (C * C).sum(1)
    labels = np.empty(len(X), np.int64)
    dist = np.empty(len(X), np.float32)
    for s in range(0, len(X), rows):
        x = torch.from_numpy(np.ascontiguousarray(X[s:s + rows], np.float32)).to(dev)
        d = torch.addmm(c2[None, :], x, C.T, alpha=-2)
        v, j = d.min(1)
        labels[s:s + rows] = j.cpu().numpy()
        dist[s:s + rows] = (v + (x * x).sum(1)).clamp_min(0).cpu().numpy()
    return labels, dist
