"""k-means seeding: per-problem random draws made up front, greedy k-means++ (optionally weighted)
and k-means|| on padded batches, and k-means++ in numpy for the faiss path.

Every draw comes from the problem's own seed on the CPU (:func:`draws`), so a problem's seeds do
not depend on which other problems share its batch, and CPU and CUDA runs pick the same points.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

# k-means|| seeding: rounds, and candidates drawn per round per centre
PARALLEL_ROUNDS, PARALLEL_OVERSAMPLE = 2, 2


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def n_local_trials(k: int) -> int:
    """Candidates per greedy k-means++ step, as scikit-learn."""
    return 2 + int(math.log(k)) if k > 1 else 1


def problem_draws(seed, n: int, k: int, init: str, trials: Optional[int]) -> dict:
    """A problem's random numbers, drawn up front so chunking cannot change them."""
    rng = _rng(seed)
    if init == "random":
        return {"pick": rng.choice(n, size=k, replace=False)}
    L = trials or n_local_trials(k)
    if init == "k-means||":
        return {"first": rng.random(), "rounds": rng.random((PARALLEL_ROUNDS, PARALLEL_OVERSAMPLE * k)),
                "u": rng.random((max(k - 1, 0), L))}
    return {"first": rng.random(), "u": rng.random((max(k - 1, 0), L))}


def gather_rows(X: torch.Tensor, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``X[b, i]`` for a ``B x N x ...`` tensor, via ``index_select`` (advanced indexing is several times
    slower on CPU)."""
    B, N = X.shape[:2]
    return X.reshape(B * N, *X.shape[2:]).index_select(0, (b * N + i).flatten()).view(*i.shape, *X.shape[2:])


def min_first(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s.min(1)`` of a ``B x K x N`` tensor, ties to the lowest index as ``torch.min``: the values with
    ``amin`` and the index as the smallest ``K * sign(s - min) + j`` (``j`` where ``s`` attains the
    minimum). ``torch.min`` with indices is 2.2-2.5x slower on CPU (measured at K = 4 and 25, 13 x 784
    cells: 110 / 460 us against 44 / 200 us); it still serves a batch holding NaN (distances of finite
    values that overflow float32), whose index the key cannot give."""
    import torch

    m = s.amin(1)
    if bool(torch.isnan(m).any()):
        return s.min(1)
    K = s.shape[1]
    key = torch.sub(s, m[:, None, :]).sign_().mul_(K).add_(torch.arange(K, dtype=s.dtype, device=s.device)[:, None])
    return m, key.amin(1).long()


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
    C[:, 0] = gather_rows(X, ar, first)
    closest = torch.baddbmm((x2 + gather_rows(x2, ar, first)[:, None])[:, None, :], C[:, :1], X.transpose(1, 2),
                            alpha=-2)
    closest = closest[:, 0].clamp_min(0) * mask
    labels = torch.zeros((B, N), dtype=torch.long, device=dev)
    pot = closest.sum(1, dtype=torch.float64)
    for c in range(1, K):
        cum = closest.cumsum(1, dtype=torch.float64)
        r = U[:, c - 1] * pot[:, None]
        cand = torch.minimum(torch.searchsorted(cum, r), (n - 1)[:, None])  # B x L
        Xc = gather_rows(X, ar[:, None], cand)  # B x L x D
        raw = torch.baddbmm(x2[:, None, :] + x2.gather(1, cand)[:, :, None], Xc, X.transpose(1, 2), alpha=-2)
        d = torch.minimum(raw.clamp_min_(0), closest[:, None, :]) * mask[:, None, :]
        p = d.sum(2, dtype=torch.float64).masked_fill(~trial_ok, math.inf)
        best = p.argmin(1)
        take = c < kk
        C[:, c] = torch.where(take[:, None], gather_rows(Xc, ar, best), C[:, c])
        labels = torch.where(take[:, None] & (gather_rows(raw, ar, best) < closest), c, labels)
        closest = torch.where(take[:, None], gather_rows(d, ar, best), closest)
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
    closest = torch.baddbmm((x2 + gather_rows(x2, ar, first)[:, None])[:, None, :], gather_rows(X, ar, first)[:, None],
                            X.transpose(1, 2), alpha=-2)[:, 0].clamp_min(0) * mask
    owner = torch.zeros((B, N), dtype=torch.long, device=dev)
    for r in range(R):
        cum = closest.cumsum(1, dtype=torch.float64)
        cand = torch.minimum(torch.searchsorted(cum, U[:, r] * cum[:, -1:]), (n - 1)[:, None])  # B x L
        d = torch.baddbmm(x2[:, None, :] + x2.gather(1, cand)[:, :, None], gather_rows(X, ar[:, None], cand),
                          X.transpose(1, 2), alpha=-2).masked_fill_(~ok[:, :, None], math.inf)
        dmin, arg = min_first(d)
        closer = dmin < closest
        owner = torch.where(closer, arg + 1 + r * Lmax, owner)
        closest = torch.where(closer, dmin.clamp_min(0), closest) * mask
        picks.append(cand)
    cand = torch.cat(picks, 1)  # B x M
    M = cand.shape[1]
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), ok.repeat(1, R)], 1)
    w = torch.zeros(B, M, dtype=X.dtype, device=dev).scatter_add_(1, owner, mask.to(X.dtype))
    Y = gather_rows(X, ar[:, None], cand)
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
    cl = gather_rows(G, ar, j0)
    for c in range(1, K):
        wc = (w * cl).cumsum(1, dtype=torch.float64)
        t = torch.searchsorted(wc, Ut[:, c - 1] * wc[:, -1:]).clamp_max_(M - 1)
        nd = torch.minimum(gather_rows(G, ar[:, None], t), cl[:, None, :])
        p = (nd * w[:, None, :]).sum(2, dtype=torch.float64).masked_fill(~trial_ok, math.inf)
        best = p.argmin(1)
        take = c < kk
        chosen[:, c] = torch.where(take, t.gather(1, best[:, None])[:, 0], chosen[:, c])
        cl = torch.where(take[:, None], gather_rows(nd, ar, best), cl)
    return gather_rows(Y, ar[:, None], chosen)


def columns(Xt, b, i) -> torch.Tensor:
    """Rows ``(b, i)`` of a batch stored transposed (``B x D x N``), as ``len(b) x D``."""
    return Xt[b, :, i]


def weighted_plusplus(Xt, x2, W, n, kk, draws):
    """Greedy k-means++ with sample weights (scikit-learn's rule) on a padded batch ``Xt`` (``B x D x N``).

    Returns the centres and, for free, each row's nearest centre and squared distance to it (the
    first Lloyd assignment).
    """
    import torch

    B, D, N = Xt.shape
    K = int(kk.max())
    dev = Xt.device
    ar = torch.arange(B, device=dev)
    U, trial_ok = trial_table(draws, B, K, dev)
    cw = W.cumsum(1, dtype=torch.float64)
    r0 = torch.tensor([d["first"] for d in draws], device=dev, dtype=torch.float64)[:, None] * cw[:, -1:]
    first = torch.minimum(torch.searchsorted(cw, r0)[:, 0], n - 1)  # the first centre is drawn with p ~ weight
    C = Xt.new_zeros(B, K, D)
    C[:, 0] = columns(Xt, ar, first)
    closest = (x2 + x2.gather(1, first[:, None]) - 2 * torch.bmm(C[:, :1], Xt)[:, 0]).clamp_min_(0)
    labels = torch.zeros(B, N, dtype=torch.long, device=dev)
    for c in range(1, K):
        cum = (closest * W).cumsum(1, dtype=torch.float64)
        cand = torch.minimum(torch.searchsorted(cum, U[:, c - 1] * cum[:, -1:]), (n - 1)[:, None])  # B x L
        Xc = columns(Xt, ar[:, None], cand)  # B x L x D
        # bmm then in-place adds: baddbmm with a broadcast input measured 4x slower on CPU
        d = torch.bmm(Xc, Xt).mul_(-2).add_(x2[:, None, :]).add_(x2.gather(1, cand)[:, :, None]).clamp_min_(0)
        d = torch.minimum(d, closest[:, None, :], out=d)
        p = torch.bmm(d, W[:, :, None])[..., 0].masked_fill_(~trial_ok, math.inf)  # potential per candidate
        best = p.argmin(1)
        take = (c < kk)[:, None]
        C[:, c] = torch.where(take, Xc[ar, best], C[:, c])
        new = d[ar, best]  # already min(distance to the new centre, closest)
        labels = torch.where(take & (new < closest), c, labels)
        closest = torch.where(take, new, closest)
    return C, labels, closest


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
