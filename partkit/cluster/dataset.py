"""Scope dataset: one faiss k-means over the cells of all samples (or ``--fit-on``), then every sample
assigned to the nearest centroid, so part id j+1 means centroid j everywhere; ``--centroids`` skips the fit."""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from .._log import log
from ..errors import Handler, PartkitError
from ..io import Output, encode_npy, run_stage, write_atomic
from ..io.sink import is_folder_output
from ..io.urls import expand_urls
from ..kmeans import KMeansResult, faiss_assign, faiss_kmeans, nearest_center
from ._config import Job
from ._items import finalize, iter_items, load, replayable, rounded, write_item


def run(inputs: Sequence[str], job: Job, *, output: Output, handler: Handler) -> dict:
    """Fit (unless ``--centroids``), save the centroids if asked, then assign every sample."""
    cfg, fixed = job.cfg, job.centroids
    given = expand_urls(inputs) if is_folder_output(output.path) else ()  # what resume fingerprints
    with replayable(inputs if fixed is None and not cfg.fit_on else []) as replay:
        inputs = replay or inputs
        if fixed is None:
            centers, settings = fit(list(cfg.fit_on) if cfg.fit_on else inputs, int(cfg.k), job, handler)
            extra = {"faiss": settings}
        else:
            centers, extra = fixed, {"centroids": os.path.basename(cfg.centroids)}
        if cfg.save_centroids:
            write_atomic(cfg.save_centroids, encode_npy(centers))
            log(f"cluster: saved {len(centers)} centroids to {cfg.save_centroids}")
        extra["centroids_sha1"] = _digest(centers)
        return run_stage(inputs, lambda items: assign(items, centers, job, extra), output=output, name="cluster",
                         batch_size=cfg.batch_size, prepare=lambda sample: load(sample, job), handler=handler,
                         config=cfg.fingerprint(), input_files=given)


def fit(fit_inputs: Sequence[str], k: int, job: Job, handler: Handler):
    """Global centroids (ordered by cluster size) from a seeded uniform sample of the fit cells."""
    cfg, warm = job.cfg, job.warm
    m = k * cfg.max_points_per_centroid
    rng = np.random.default_rng([cfg.seed, 3])
    buf_x, buf_key, buf_pos = [], [], []
    held = total = samples = 0
    for item in iter_items(fit_inputs, job, handler):
        idx = np.concatenate(item.cells) if item.cells else np.zeros(0, np.int64)
        samples += 1
        if not len(idx):
            continue
        if isinstance(warm, np.ndarray) and warm.shape[1] != item.X.shape[1]:
            raise PartkitError(f"--warm-start centroids have {warm.shape[1]} channels, the features have "
                               f"{item.X.shape[1]}; use centroids from the same model and layers")
        buf_x.append(item.X[idx])
        buf_key.append(rng.random(len(idx)))  # keep the m smallest keys: a uniform sample without replacement
        buf_pos.append(total + np.arange(len(idx)))
        total += len(idx)
        held += len(idx)
        if held > 2 * m:
            buf_x, buf_key, buf_pos = _keep_smallest(buf_x, buf_key, buf_pos, m)
            held = m
    if total == 0:
        raise PartkitError("--scope dataset found no feature cells to fit on; check the inputs (and --fg-from)")
    x, _, pos = _keep_smallest(buf_x, buf_key, buf_pos, m)
    train = x[0][np.argsort(pos[0], kind="stable")]
    k_used = min(k, len(train))
    init = warm if isinstance(warm, np.ndarray) else cfg.init
    if isinstance(init, np.ndarray) and len(init) != k:
        raise PartkitError(f"--warm-start has {len(init)} centroids but -k is {k}")
    centers, settings = faiss_kmeans(train, k_used, max_iter=cfg.max_iter, seed=cfg.seed, init=init,
                                     max_points_per_centroid=cfg.max_points_per_centroid)
    labels, dist = faiss_assign(train, centers, settings["threads"])
    sizes = np.bincount(labels, minlength=k_used)
    order = sorted(range(k_used), key=lambda j: (-sizes[j], j))
    settings.update(fit_samples=samples, fit_cells=int(total), fit_inertia_per_cell=rounded(float(dist.mean())))
    log(f"cluster: fitted {k_used} centroids on {len(train)} of {total} cells from {samples} samples")
    return centers[order], settings


def _keep_smallest(xs, keys, pos, m):
    x, key, p = np.concatenate(xs), np.concatenate(keys), np.concatenate(pos)
    if len(key) > m:
        sel = np.argpartition(key, m - 1)[:m]
        x, key, p = x[sel], key[sel], p[sel]
    return [x], [key], [p]


def assign(items: list, centers: np.ndarray, job: Job, extra: dict) -> list:
    """Nearest global centroid per cell; part id j+1 means centroid j in every sample."""
    cfg = job.cfg
    ids = np.arange(1, len(centers) + 1)
    outputs = []
    for item in items:
        if item.X.shape[1] != centers.shape[1]:
            raise PartkitError(f"the centroids have {centers.shape[1]} channels, the features of {item.key!r} have "
                               f"{item.X.shape[1]}; use centroids fitted on the same model and layers")
        per_object = []
        for rec, idx in zip(item.objects, item.cells):
            if len(idx) == 0:
                per_object.append((np.zeros(len(idx), np.int64), {**rec, "cells": int(len(idx)), "parts": []}))
                continue
            labels, dist = nearest_center(item.X[idx], centers, job.device)
            r = KMeansResult(centers, labels, float(dist.sum(dtype=np.float64)), 0, len(centers), True)
            cell_ids, more = finalize(item.X[idx], r, cfg, 1, ids)
            per_object.append((cell_ids, {**rec, "cells": int(len(idx)), "inertia": rounded(r.inertia), **more}))
        outputs.append(write_item(item, per_object, cfg, extra))
    return outputs


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr, np.float32).tobytes()).hexdigest()[:16]
