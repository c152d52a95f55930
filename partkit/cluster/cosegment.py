"""Scope cosegment: parts shared by a group of images (Amir et al.), e.g. the images of one category.

Pass 1 reads every sample and clusters each group (with ``--fg-from saliency``, first the group's
cells, keeping the clusters salient in ``--votes`` of its images); pass 2 writes each sample.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

from .. import fields
from .._log import log
from ..errors import BadSample, Handler, PartkitError
from ..io import Output, run_stage
from ..io.sink import is_folder_output
from ..io.urls import expand_urls
from ..kmeans import FAISS_MIN_ROWS, KMeans, KMeansResult, batched_kmeans, elbow_kmeans
from ._config import Job
from ._items import finalize, iter_items, load_light, replayable, rounded, write_item


def run(inputs: Sequence[str], job: Job, *, output: Output, handler: Handler) -> dict:
    """Cluster every group (pass 1), then write each sample with its group's parts (pass 2)."""
    cfg = job.cfg
    given = expand_urls(inputs) if is_folder_output(output.path) else ()
    with replayable(inputs) as replay:
        results = solve(replay, job, handler)

        def write_group(items):
            outs = []
            for item in items:
                if item.key not in results:
                    outs.append(BadSample(item.key, "was not readable in the first pass"))
                    continue
                per_object, cells, extra = results[item.key]
                item.cells = cells
                outs.append(write_item(item, per_object, cfg, extra))
            return outs

        return run_stage(replay, write_group, output=output, name="cluster", batch_size=cfg.batch_size,
                         prepare=lambda s: load_light(s, cfg), handler=handler, config=cfg.fingerprint(),
                         input_files=given)


def _fit_group(X: np.ndarray, k, job: Job, seed: list) -> KMeansResult:
    """One k-means over a group's cells (torch below FAISS_MIN_ROWS rows, else faiss); ``k`` may be 'auto'."""
    cfg = job.cfg
    if len(X) >= FAISS_MIN_ROWS and k != "auto":
        km = KMeans(k, metric="l2", init=cfg.init, max_iter=cfg.max_iter, random_state=zlib.crc32(str(seed).encode()),
                    backend="faiss", max_points_per_centroid=cfg.max_points_per_centroid).fit(X)
        return KMeansResult(km.cluster_centers_, km.labels_, km.inertia_, km.n_iter_, len(km.cluster_centers_), True)
    kw = dict(init=cfg.init, max_iter=cfg.max_iter, tol=cfg.tol, random_state=[seed], device=job.device)
    if k == "auto":
        return elbow_kmeans([X], k_range=(2, cfg.k_max), fraction=cfg.elbow, **kw)[0]
    return batched_kmeans([X], k, **kw)[0]


def _solve_group(items: list, job: Job, name: str) -> dict:
    """Part labels for a group: key -> (per-object (ids, record), cells per object, extra parts.json fields)."""
    cfg = job.cfg
    extra: dict = {"group": name, "group_size": len(items)}
    seed_base = [cfg.seed, zlib.crc32(name.encode("utf-8"))]
    if cfg.fg_from == "saliency":
        allX = np.concatenate([it.X for it in items])
        fg_res = _fit_group(allX, "auto", job, seed_base + [0])
        k_fg = len(fg_res.centers)
        votes = np.zeros(k_fg, np.int64)
        start = 0
        for it in items:
            lab = fg_res.labels[start:start + len(it.X)]
            start += len(it.X)
            for c in np.unique(lab):
                votes[c] += int(fields.salient(it.saliency[lab == c].mean(), cfg.fg_threshold))
        need = math.ceil(cfg.votes * len(items))
        fg_clusters = np.flatnonzero(votes >= need)
        extra.update(fg_clusters=int(len(fg_clusters)), fg_k=k_fg, fg_votes=votes.tolist(), fg_votes_needed=need)
        fg_cells, start = [], 0
        for it in items:
            lab = fg_res.labels[start:start + len(it.X)]
            start += len(it.X)
            fg_cells.append(np.flatnonzero(np.isin(lab, fg_clusters)))
    else:
        fg_cells = [np.unique(np.concatenate(it.cells)) if it.cells else np.zeros(0, np.int64) for it in items]
    out = {}
    fgX = [it.X[c] for it, c in zip(items, fg_cells)]
    total = sum(len(c) for c in fg_cells)
    if total == 0:
        for it, c in zip(items, fg_cells):
            out[it.key] = ([(np.zeros(0, np.int64), {"id": None, "cells": 0, "parts": [], "note": "no foreground"})],
                           [c], extra)
        return out
    res = _fit_group(np.concatenate(fgX), cfg.k, job, seed_base + [1])
    k = len(res.centers)
    sizes = np.bincount(res.labels, minlength=k)
    order = sorted(range(k), key=lambda j: (-sizes[j], j))
    ids = np.zeros(k, np.int64)
    ids[order] = np.arange(1, k + 1)
    extra.update(group_k=k, group_inertia=rounded(res.inertia), group_iterations=res.n_iter)
    start = 0
    for it, c, x in zip(items, fg_cells, fgX):
        lab = res.labels[start:start + len(c)]
        start += len(c)
        dist = ((x - res.centers[lab]) ** 2).sum(1) if len(c) else np.zeros(0)
        r = KMeansResult(res.centers, lab, float(dist.sum(dtype=np.float64)), res.n_iter, k, res.converged)
        cell_ids, more = finalize(x, r, cfg, 1, ids)
        rec = {"id": None, "cells": int(len(c)), "inertia": rounded(r.inertia), **more}
        out[it.key] = ([(cell_ids, rec)], [c], extra)
    return out


def solve(inputs: Sequence[str], job: Job, handler: Handler) -> dict:
    """Pass 1: every group's parts; key -> (per-object (ids, record), cells per object, extra parts.json fields)."""
    cfg = job.cfg
    groups: dict = {}
    ungrouped = 0
    for item in iter_items(inputs, job, handler):
        if cfg.group_by and item.group is None:
            ungrouped += 1
        item.sample = {"__key__": item.key}  # pass 2 re-reads the sample; keep only what voting needs
        groups.setdefault(item.group if cfg.group_by else "all", []).append(item)
    if ungrouped:
        log(f"cluster: {ungrouped} samples have no '{cfg.group_by}' in their json; they form one group")
    keys = [it.key for g in groups.values() for it in g]
    if len(set(keys)) != len(keys):
        raise PartkitError("--scope cosegment needs unique sample keys, and the input repeats some; re-pack the inputs")
    results = {}
    for name in sorted(groups, key=lambda g: (g is None, str(g))):
        results.update(_solve_group(groups[name], job, "" if name is None else str(name)))
        log(f"cluster: group {'(no ' + str(cfg.group_by) + ')' if name is None else name}: {len(groups[name])} images")
    return results
