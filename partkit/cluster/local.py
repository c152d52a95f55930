"""Scopes image and object: a k-means per image or per object, a batch of samples solved together.

Each problem is seeded by its sample key, so results do not depend on batching, sharding or resuming.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from ..errors import Handler, PartkitError
from ..io import Output, run_stage
from ..kmeans import KMeansResult, batched_kmeans, elbow_kmeans, partition_centers
from ._config import Job
from ._items import Item, finalize, load, rounded, write_item


def run(inputs: Sequence[str], job: Job, *, output: Output, handler: Handler) -> dict:
    """The stage for scopes image and object: :func:`solve` on each batch of samples."""
    return run_stage(inputs, lambda items: solve(items, job), output=output, name="cluster",
                     batch_size=job.cfg.batch_size, prepare=lambda sample: load(sample, job), handler=handler,
                     config=job.cfg.fingerprint())


def _object_record(rec: dict, res: KMeansResult, k_requested, n: int) -> dict:
    out = {**rec, "cells": n, "k": res.n_clusters, "inertia": rounded(res.inertia), "iterations": res.n_iter,
           "converged": res.converged}
    if isinstance(k_requested, int) and res.n_clusters < k_requested and n < k_requested:
        out["note"] = (out.get("note", "") + "; " if out.get("note") else "") + f"k reduced to its {n} cells"
    return out


def _problem_seed(seed: int, key: str, j: int) -> list:
    # Seeded by the sample key, so results do not depend on batching, sharding or resuming.
    return [seed, zlib.crc32(key.encode("utf-8")), j]


def _warm_init(item: Item, idx: np.ndarray, job: Job):
    """(init centres, fixed ids) for one object, or (None, None) when it starts from scratch."""
    warm = job.warm
    if warm is None:
        return None, None
    if isinstance(warm, np.ndarray):
        if warm.shape[1] != item.X.shape[1]:
            raise PartkitError(f"--warm-start centroids have {warm.shape[1]} channels, the features of "
                               f"{item.key!r} have {item.X.shape[1]}; use centroids from the same model and layers")
        return warm, None
    centers, ids = partition_centers(item.X[idx], item.prev[idx], min_id=1)  # id 0: no previous part
    return (centers, ids) if len(ids) else (None, None)


def solve(items: list, job: Job) -> list:
    """Per-image / per-object k-means for a batch of samples, all problems solved together."""
    cfg = job.cfg
    problems, seeds, inits, where = [], [], [], []
    for a, item in enumerate(items):
        for j, idx in enumerate(item.cells):
            if len(idx) == 0:
                continue
            init, ids = _warm_init(item, idx, job)
            problems.append(item.X[idx])
            seeds.append(_problem_seed(cfg.seed, item.key, j))
            inits.append((init, ids))
            where.append((a, j))
    results: list = [None] * len(problems)
    fresh = [i for i, (init, _) in enumerate(inits) if init is None]
    warm = [i for i, (init, _) in enumerate(inits) if init is not None]
    kw = dict(max_iter=cfg.max_iter, tol=cfg.tol, device=job.device)
    if fresh:
        probs = [problems[i] for i in fresh]
        sds = [seeds[i] for i in fresh]
        if cfg.k == "auto":
            got = elbow_kmeans(probs, k_range=(2, cfg.k_max), fraction=cfg.elbow, init=cfg.init,
                               random_state=sds, **kw)
        else:
            got = batched_kmeans(probs, cfg.k, init=cfg.init, random_state=sds, **kw)
        for i, r in zip(fresh, got):
            results[i] = r
    if warm:
        got = batched_kmeans([problems[i] for i in warm], 1, init=[inits[i][0] for i in warm],
                             random_state=[seeds[i] for i in warm], **kw)
        for i, r in zip(warm, got):
            results[i] = r
    by_item: list = [dict() for _ in items]
    for (a, j), r, (init, ids) in zip(where, results, inits):
        by_item[a][j] = (r, ids, init is not None)
    outputs = []
    for a, item in enumerate(items):
        # with --warm-start parts, objects that start afresh number after the previous ids
        per_object, next_id = [], 1 if item.prev is None else int(item.prev.max(initial=0)) + 1
        for j, (rec, idx) in enumerate(zip(item.objects, item.cells)):
            if j not in by_item[a]:
                per_object.append((np.zeros(len(idx), np.int64), {**rec, "cells": int(len(idx)), "k": 0, "parts": []}))
                continue
            r, ids, is_warm = by_item[a][j]
            if is_warm and ids is None:  # warm start from a centroid file: object j owns a fixed block of ids
                K = len(r.centers)
                ids = j * K + 1 + np.arange(K)
            cell_ids, extra = finalize(item.X[idx], r, cfg, next_id, ids)
            orec = _object_record(rec, r, cfg.k, len(idx))
            orec.update(extra)
            per_object.append((cell_ids, orec))
            next_id = max([next_id - 1, *extra["parts"]]) + 1
        outputs.append(write_item(item, per_object, cfg))
    return outputs
