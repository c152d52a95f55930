"""Part proposals by grouping dense features: k-means per image, per object, per dataset, or per group.

The k-means itself lives in :mod:`partkit.kmeans`; its public names are re-exported here.

>>> import numpy as np
>>> from partkit.cluster import KMeans, batched_kmeans
>>> X = np.random.default_rng(0).normal(size=(784, 64)).astype(np.float32)
>>> km = KMeans(4, metric="cosine", random_state=0).fit(X)  # scikit-learn style
>>> km.cluster_centers_.shape, km.labels_.shape
((4, 64), (784,))
>>> results = batched_kmeans([X, X[:100], X[:7]], 4)  # many small problems in one batched solve
>>> [r.n_clusters for r in results]
[4, 4, 4]

The ``partkit cluster`` stage is :func:`cluster`: it reads ``feat.npy`` + ``feat.json`` and writes
``parts.png`` (0 = background, parts 1..k) and ``parts.json``.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import fields
from ._log import log
from ._runtime import resolve_device
from ._version import __version__
from .errors import BadSample, Handler, PartkitError, stop
from .grid import grid_to_image, mask_to_grid
from .io import (
    Output, decode_label_map, decode_npy, encode_json, encode_npy, encode_png, iter_loaded, open_url,
    run_stage, write_atomic,
)
from .kmeans import (
    FAISS_MIN_ROWS, INITS, METRICS, KMeans, KMeansResult, batched_kmeans, elbow_kmeans, faiss_assign, faiss_kmeans,
    nearest_center, normalize_rows,
)
from .io.urls import expand_urls

__all__ = [
    "KMeans", "KMeansResult", "batched_kmeans", "elbow_kmeans", "cluster", "SCOPES", "FG_SOURCES", "DEFAULT_K",
]

SCOPES = ("image", "object", "dataset", "cosegment")
FG_SOURCES = ("gt_objects", "gt_parts", "saliency")
DEFAULT_K = {"image": 25, "object": 4, "dataset": 25, "cosegment": 4}
DEFAULT_FG = {"image": None, "object": "gt_objects", "dataset": None, "cosegment": "saliency"}


def _check_choice(value, choices, option: str):
    if value not in choices:
        raise PartkitError(f"unknown {option} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


# --------------------------------------------------------------------------------------------
# The stage: options


@dataclass
class _Opts:
    scope: str
    k: Union[int, str]
    metric: str
    init: str
    max_iter: int
    tol: float
    seed: int
    device: "torch.device"
    fg_from: Optional[str]
    fg_threshold: float
    coverage: float
    upsample: str
    min_area: float
    min_area_action: str
    warm: Union[None, str, np.ndarray]  # None, "parts", or a k x C array
    warm_name: Optional[str]
    elbow: float
    k_max: int
    votes: float
    group_by: Optional[str]
    max_points_per_centroid: int
    source: Optional[fields.FeatureSource] = None  # scopes dataset, cosegment: one model's features only

    def record(self) -> dict:
        """The options that shape every parts.json."""
        rec = {"scope": self.scope, "k": self.k, "metric": self.metric, "init": self.init, "max_iter": self.max_iter,
               "tol": self.tol, "seed": self.seed, "min_area": self.min_area, "fg_from": self.fg_from}
        if self.min_area:
            rec["min_area_action"] = self.min_area_action
        if self.fg_from in ("gt_objects", "gt_parts"):
            rec["coverage"] = self.coverage
        if self.fg_from == "saliency":
            rec["fg_threshold"] = self.fg_threshold
        if self.k == "auto":
            rec["elbow"] = {"fraction": self.elbow, "k_range": [2, self.k_max]}
        if self.warm_name:
            rec["warm_start"] = self.warm_name
        if self.scope == "cosegment":
            rec.update(group_by=self.group_by, votes=self.votes)
        return rec


def _load_centroids(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise PartkitError(f"{what} file {path!r} does not exist; give a .npy file of k x C centroids "
                           "(e.g. from --save-centroids)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:
        raise PartkitError(f"{what} file {path!r} is not a readable .npy array") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.dtype.kind not in "biuf":
        raise PartkitError(f"{what} file {path!r} holds {arr.dtype} {arr.shape}; expected k x C centroids")
    if not np.isfinite(arr).all():
        raise PartkitError(f"{what} file {path!r} holds NaN or inf values")
    return np.ascontiguousarray(arr, np.float32)


def _validate(scope, k, metric, init, max_iter, tol, fg_from, fg_threshold, coverage, upsample, min_area,
              min_area_action, warm_start, centroids, save_centroids, fit_on, group_by, votes, elbow, k_max,
              max_points_per_centroid, batch_size) -> None:
    _check_choice(scope, SCOPES, "--scope")
    _check_choice(metric, METRICS, "--metric")
    _check_choice(init, INITS, "--init")
    _check_choice(upsample, ("grid", "image"), "--upsample")
    _check_choice(min_area_action, ("merge", "drop"), "--min-area-action")
    if fg_from is not None:
        _check_choice(fg_from, FG_SOURCES, "--fg-from")
        if scope == "image":
            raise PartkitError("--fg-from does not apply to --scope image (it clusters every cell); "
                               "use --scope object --fg-from ... to cluster only the foreground")
    if k == "auto":
        if scope == "dataset":
            raise PartkitError("--k auto picks k per image, object or group; give --scope dataset a number, e.g. -k 25")
    elif not isinstance(k, (int, np.integer)) or k < 1:
        raise PartkitError(f"-k must be a positive integer or 'auto', got {k!r}")
    checks = [
        (max_iter is None or max_iter >= 1, f"--iters must be at least 1, got {max_iter}"),
        (tol >= 0, f"--tol must be >= 0, got {tol}"),
        (0 < coverage <= 1, f"--coverage must be in (0, 1], got {coverage}"),
        (min_area >= 0, f"--min-area must be >= 0 (cells, or a fraction below 1), got {min_area}"),
        (0 < elbow <= 1, f"--elbow must be in (0, 1], got {elbow}"),
        (k_max >= 2, f"--k-max must be at least 2, got {k_max}"),
        (0 < votes <= 1, f"--votes must be in (0, 1], got {votes}"),
        (max_points_per_centroid >= 1, f"--max-points-per-centroid must be at least 1, got {max_points_per_centroid}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (math.isfinite(fg_threshold), f"--fg-threshold must be a number, got {fg_threshold}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PartkitError(message)
    if scope != "dataset":
        for value, option in ((centroids, "--centroids"), (save_centroids, "--save-centroids"), (fit_on, "--fit-on")):
            if value:
                raise PartkitError(f"{option} applies to --scope dataset only")
    if centroids and fit_on:
        raise PartkitError("--centroids skips fitting, so --fit-on has nothing to do; give one of them")
    if centroids and warm_start:
        raise PartkitError("--centroids reuses centroids as they are; --warm-start refits from them; give one")
    if warm_start and scope == "cosegment":
        raise PartkitError("--warm-start is not supported with --scope cosegment")
    if warm_start == "parts" and scope == "dataset":
        raise PartkitError("--warm-start parts continues per-image partitions; for --scope dataset give a "
                           ".npy of centroids")
    if save_centroids:
        parent = os.path.dirname(os.path.abspath(save_centroids))
        if not os.path.isdir(parent):
            raise PartkitError(f"--save-centroids folder {parent!r} does not exist; create it first")


# --------------------------------------------------------------------------------------------
# The stage: reading samples


@dataclass
class _Item:
    """One decoded sample: its cells in the metric's space and the cells of each object."""

    sample: dict
    key: str
    meta: dict
    shape: tuple  # (h, w)
    X: np.ndarray  # (h*w, C)
    objects: list  # per-object records (id, category, ...)
    cells: list  # per-object cell indices into X
    saliency: Optional[np.ndarray] = None  # (h*w,) for cosegment voting
    prev: Optional[np.ndarray] = None  # (h*w,) previous part ids (--warm-start parts)
    group: Optional[str] = None


def _coverage_cells(covs: np.ndarray, coverage: float, areas: Sequence[float]) -> tuple[list, list]:
    """Cells of each object from per-object coverage maps (O x h x w).

    A cell goes to the object covering most of it (the first on ties) when that cover reaches
    ``coverage``. An object smaller than one cell gets its best-covered cell if no other object
    holds it, so that small objects still get one part.
    """
    O = covs.shape[0]
    flat = covs.reshape(O, -1)
    owner = flat.argmax(0)
    best = flat.max(0)
    taken = best >= coverage
    cells, notes = [], []
    for o in range(O):
        idx = np.flatnonzero(taken & (owner == o))
        note = None
        if len(idx) == 0:
            if areas[o] <= 0:
                note = "empty mask"
            else:
                j = int(flat[o].argmax())
                if flat[o, j] > 0 and not taken[j]:
                    idx = np.array([j])
                    taken[j] = True
                    note = f"smaller than the coverage threshold; kept its best cell ({flat[o, j]:.3f} covered)"
                else:
                    note = "no feature cell left for it (covered by other objects)"
        cells.append(idx)
        notes.append(note)
    return cells, notes


def _foreground(sample: dict, meta: dict, opts: _Opts, h: int, w: int, key: str):
    """(object records, cell indices per object, saliency per cell or None)."""
    fg = opts.fg_from
    if fg is None:
        return [{"id": None}], [np.arange(h * w)], None
    if fg == "saliency":
        sal = decode_npy(sample, "saliency.npy").astype(np.float32)
        if sal.shape != (h, w):
            raise BadSample(key, f"saliency.npy has shape {sal.shape}, not the feature grid {h}x{w}")
        flat = sal.reshape(-1)
        return [{"id": None, "source": "saliency"}], [np.flatnonzero(flat > opts.fg_threshold)], flat
    fields.geometry(meta, key)
    H, W = meta["image_size"]
    if fg == "gt_parts":
        mask = fields.foreground(fields.gt_parts(sample, size=(H, W)))
        cells, notes = _coverage_cells(mask_to_grid(mask, meta)[None], opts.coverage, [mask.sum()])
        rec = {"id": None, "source": "gt_parts"}
        if notes[0]:
            rec["note"] = notes[0]
        return [rec], cells, None
    objs, masks = fields.object_masks(sample, (H, W))
    records, covs, areas, crowd = [], [], [], []
    for o, mask in zip(objs, masks):
        rec = {"id": o.get("id")}
        if o.get("category") is not None:
            rec["category"] = o["category"]
        records.append(rec)
        covs.append(mask_to_grid(mask, meta))
        areas.append(float(mask.sum()))
        crowd.append(bool(o.get("iscrowd")))
    if not records:
        return [], [], None
    covs = np.stack(covs)
    covs[np.array(crowd)] = 0  # crowd regions are not instances
    cells, notes = _coverage_cells(covs, opts.coverage, areas)
    for rec, note, is_crowd in zip(records, notes, crowd):
        if is_crowd:
            rec["note"] = "crowd region (iscrowd); not clustered"
        elif note:
            rec["note"] = note
    return records, cells, None


def _load(sample: dict, opts: _Opts) -> _Item:
    key = sample["__key__"]
    feat, meta = fields.features(sample, require_geometry=opts.upsample == "image")
    C, h, w = feat.shape
    if opts.source is not None:
        opts.source.check(sample, meta, C)
    X = normalize_rows(feat.reshape(C, h * w).T, opts.metric)
    objects, cells, sal = _foreground(sample, meta, opts, h, w, key)
    item = _Item(sample, key, meta, (h, w), X, objects, cells, saliency=sal)
    if isinstance(opts.warm, str):  # "parts"
        prev = decode_label_map(sample, "parts.png")
        if prev.shape != (h, w):
            raise BadSample(key, f"the previous parts.png is {prev.shape[1]}x{prev.shape[0]}, not the feature grid "
                                 f"{w}x{h}; run the previous round with --upsample grid")
        item.prev = prev.reshape(-1).astype(np.int64)
    if opts.scope == "cosegment" and opts.group_by:
        value = fields.info(sample).get(opts.group_by)
        item.group = None if value is None else str(value)
    return item


# --------------------------------------------------------------------------------------------
# The stage: turning k-means results into label maps and parts.json


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _finalize(X: np.ndarray, res: KMeansResult, opts: _Opts, first_id: int, fixed_ids: Optional[np.ndarray] = None):
    """Part ids per cell (0 = dropped) and the object's record entries.

    Clusters smaller than ``--min-area`` merge into the nearest remaining centre (or drop to 0);
    ids go by size (largest first, ties by centre index) from ``first_id``, unless ``fixed_ids``
    (warm start, dataset or group centroids) pins them.
    """
    labels = res.labels.copy()
    k = len(res.centers)
    sizes = np.bincount(labels, minlength=k)
    n = len(labels)
    rec: dict = {}
    thr = opts.min_area if opts.min_area >= 1 else math.ceil(opts.min_area * n)
    if thr > 0 and n:
        small = (sizes > 0) & (sizes < thr)
        if small.any() and not ((sizes > 0) & ~small).any():
            small[int(np.argmax(sizes))] = False  # every cluster is small: keep the largest
        if small.any():
            hit = small[labels]
            if opts.min_area_action == "merge":
                kept = np.flatnonzero((sizes > 0) & ~small)
                labels[hit] = kept[nearest_center(X[hit], res.centers[kept])[0]]
            else:
                labels[hit] = -1
            rec["small_parts_" + ("merged" if opts.min_area_action == "merge" else "dropped")] = int(small.sum())
            sizes = np.bincount(labels[labels >= 0], minlength=k)
    present = np.flatnonzero(sizes > 0)
    if fixed_ids is None:
        order = sorted(present.tolist(), key=lambda j: (-sizes[j], j))
        ids = np.zeros(k, np.int64)
        ids[order] = first_id + np.arange(len(order))
    else:
        ids = np.asarray(fixed_ids, np.int64)
        order = sorted(present.tolist(), key=lambda j: ids[j])
    out = np.where(labels >= 0, ids[np.maximum(labels, 0)], 0)
    rec.update(parts=[int(ids[j]) for j in order], sizes=[int(sizes[j]) for j in order])
    return out, rec


def _write(item: _Item, per_object: list, opts: _Opts, extra: Optional[dict] = None) -> dict:
    """Assemble parts.png and parts.json; ``per_object`` holds (cell ids, record) per object."""
    h, w = item.shape
    grid = np.zeros(h * w, np.int64)
    objects = []
    for idx, (ids, rec) in zip(item.cells, per_object):
        grid[idx] = ids
        objects.append(rec)
    grid = grid.reshape(h, w)
    parts = sorted({p for rec in objects for p in rec.get("parts", [])})
    record = {**opts.record(), **(extra or {}), "objects": objects, "num_parts": len(parts),
              "iterations": max([r.get("iterations", 0) for r in objects], default=0),
              "inertia": _round(sum(r.get("inertia", 0.0) for r in objects)),
              "partkit_version": __version__, "resolution": opts.upsample}
    if opts.upsample == "image":
        labels = grid_to_image(grid, item.meta)
        record["image_size"] = list(item.meta["image_size"])
    else:
        labels = grid
        record.update({k: item.meta[k] for k in (*fields.GEOMETRY_KEYS, "offset") if k in item.meta})
        record["grid"] = [h, w]
    out = dict(item.sample)
    out["parts.png"] = encode_png(labels)
    out["parts.json"] = encode_json(record)
    return out


def _object_record(rec: dict, res: KMeansResult, k_requested, n: int) -> dict:
    out = {**rec, "cells": n, "k": res.n_clusters, "inertia": _round(res.inertia), "iterations": res.n_iter,
           "converged": res.converged}
    if isinstance(k_requested, int) and res.n_clusters < k_requested and n < k_requested:
        out["note"] = (out.get("note", "") + "; " if out.get("note") else "") + f"k reduced to its {n} cells"
    return out


# --------------------------------------------------------------------------------------------
# Scopes image and object: one batched solve per run_stage batch


def _problem_seed(seed: int, key: str, j: int) -> list:
    # Seeded by the sample key, so results do not depend on batching, sharding or resuming.
    return [seed, zlib.crc32(key.encode("utf-8")), j]


def _warm_init(item: _Item, idx: np.ndarray, opts: _Opts):
    """(init centres, fixed ids) for one object, or (None, None) when it starts from scratch."""
    if opts.warm is None:
        return None, None
    if isinstance(opts.warm, np.ndarray):
        if opts.warm.shape[1] != item.X.shape[1]:
            raise PartkitError(f"--warm-start centroids have {opts.warm.shape[1]} channels, the features of "
                               f"{item.key!r} have {item.X.shape[1]}; use centroids from the same model and layers")
        return opts.warm, None
    prev = item.prev[idx]
    ids = np.unique(prev[prev > 0])
    if len(ids) == 0:
        return None, None
    sel = prev > 0
    inv = np.searchsorted(ids, prev[sel])
    sums = np.zeros((len(ids), item.X.shape[1]), np.float64)
    np.add.at(sums, inv, item.X[idx][sel])
    return (sums / np.bincount(inv, minlength=len(ids))[:, None]).astype(np.float32), ids


def _solve_local(items: list, opts: _Opts) -> list:
    """Per-image / per-object k-means for a batch of samples, all problems solved together."""
    problems, seeds, inits, where = [], [], [], []
    for a, item in enumerate(items):
        for j, idx in enumerate(item.cells):
            if len(idx) == 0:
                continue
            init, ids = _warm_init(item, idx, opts)
            problems.append(item.X[idx])
            seeds.append(_problem_seed(opts.seed, item.key, j))
            inits.append((init, ids))
            where.append((a, j))
    results: list = [None] * len(problems)
    fresh = [i for i, (init, _) in enumerate(inits) if init is None]
    warm = [i for i, (init, _) in enumerate(inits) if init is not None]
    kw = dict(max_iter=opts.max_iter, tol=opts.tol, device=opts.device)
    if fresh:
        probs = [problems[i] for i in fresh]
        sds = [seeds[i] for i in fresh]
        if opts.k == "auto":
            got = elbow_kmeans(probs, k_range=(2, opts.k_max), fraction=opts.elbow, init=opts.init,
                               random_state=sds, **kw)
        else:
            got = batched_kmeans(probs, opts.k, init=opts.init, random_state=sds, **kw)
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
            cell_ids, extra = _finalize(item.X[idx], r, opts, next_id, ids)
            orec = _object_record(rec, r, opts.k, len(idx))
            orec.update(extra)
            per_object.append((cell_ids, orec))
            next_id = max([next_id - 1, *extra["parts"]]) + 1
        outputs.append(_write(item, per_object, opts))
    return outputs


# --------------------------------------------------------------------------------------------
# Scope dataset: fit (faiss) on all samples, then assign


@contextmanager
def _replayable(inputs: Sequence[str]) -> Iterator[list]:
    """Inputs that can be read twice: stdin and ``pipe:`` streams are buffered to a temporary file."""
    if not any(s == "-" or s.startswith("pipe:") for s in inputs):
        yield list(inputs)
        return
    with _term_raises(), tempfile.TemporaryDirectory(prefix="partkit-cluster-") as tmp:
        out = []
        for i, spec in enumerate(inputs):
            if spec == "-" or spec.startswith("pipe:"):
                path = os.path.join(tmp, f"input-{i:04d}.tar")
                stream = open_url(spec)
                with open(path, "wb") as f:
                    shutil.copyfileobj(stream, f, 1 << 20)
                if stream is not sys.stdin.buffer:
                    stream.close()
                out.append(path)
            else:
                out.append(spec)
        log("cluster: this scope reads the input twice; buffered the stream to a temporary file")
        yield out


@contextmanager
def _term_raises() -> Iterator[None]:
    """While the temporary copy exists, SIGTERM unwinds (removing it) instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _iter_items(inputs: Sequence[str], opts: _Opts, handler: Handler) -> Iterator[_Item]:
    return iter_loaded(inputs, lambda sample: _load(sample, opts), handler=handler)


def _fit_dataset(fit_inputs: Sequence[str], k: int, opts: _Opts, handler: Handler):
    """Global centroids (ordered by cluster size) from a seeded uniform sample of the fit cells."""
    m = k * opts.max_points_per_centroid
    rng = np.random.default_rng([opts.seed, 3])
    buf_x, buf_key, buf_pos = [], [], []
    held = total = samples = 0
    for item in _iter_items(fit_inputs, opts, handler):
        idx = np.concatenate(item.cells) if item.cells else np.zeros(0, np.int64)
        samples += 1
        if not len(idx):
            continue
        if isinstance(opts.warm, np.ndarray) and opts.warm.shape[1] != item.X.shape[1]:
            raise PartkitError(f"--warm-start centroids have {opts.warm.shape[1]} channels, the features have "
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
    init = opts.warm if isinstance(opts.warm, np.ndarray) else opts.init
    if isinstance(init, np.ndarray) and len(init) != k:
        raise PartkitError(f"--warm-start has {len(init)} centroids but -k is {k}")
    centers, settings = faiss_kmeans(train, k_used, max_iter=opts.max_iter, seed=opts.seed, init=init,
                                     max_points_per_centroid=opts.max_points_per_centroid)
    labels, dist = faiss_assign(train, centers, settings["threads"])
    sizes = np.bincount(labels, minlength=k_used)
    order = sorted(range(k_used), key=lambda j: (-sizes[j], j))
    settings.update(fit_samples=samples, fit_cells=int(total), fit_inertia_per_cell=_round(float(dist.mean())))
    log(f"cluster: fitted {k_used} centroids on {len(train)} of {total} cells from {samples} samples")
    return centers[order], settings


def _keep_smallest(xs, keys, pos, m):
    x, key, p = np.concatenate(xs), np.concatenate(keys), np.concatenate(pos)
    if len(key) > m:
        sel = np.argpartition(key, m - 1)[:m]
        x, key, p = x[sel], key[sel], p[sel]
    return [x], [key], [p]


def _assign_global(items: list, centers: np.ndarray, opts: _Opts, extra: dict) -> list:
    """Nearest global centroid per cell; part id j+1 means centroid j in every sample."""
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
            labels, dist = nearest_center(item.X[idx], centers, opts.device)
            r = KMeansResult(centers, labels, float(dist.sum(dtype=np.float64)), 0, len(centers), True)
            cell_ids, more = _finalize(item.X[idx], r, opts, 1, ids)
            per_object.append((cell_ids, {**rec, "cells": int(len(idx)), "inertia": _round(r.inertia), **more}))
        outputs.append(_write(item, per_object, opts, extra))
    return outputs


# --------------------------------------------------------------------------------------------
# Scope cosegment: parts shared by a group of images (Amir et al.)


def _fit_group(X: np.ndarray, k, opts: _Opts, seed: list) -> KMeansResult:
    """One k-means over a group's cells (torch below FAISS_MIN_ROWS rows, else faiss); ``k`` may be 'auto'."""
    if len(X) >= FAISS_MIN_ROWS and k != "auto":
        km = KMeans(k, metric="l2", init=opts.init, max_iter=opts.max_iter, random_state=zlib.crc32(str(seed).encode()),
                    backend="faiss", max_points_per_centroid=opts.max_points_per_centroid).fit(X)
        return KMeansResult(km.cluster_centers_, km.labels_, km.inertia_, km.n_iter_, len(km.cluster_centers_), True)
    kw = dict(init=opts.init, max_iter=opts.max_iter, tol=opts.tol, random_state=[seed], device=opts.device)
    if k == "auto":
        return elbow_kmeans([X], k_range=(2, opts.k_max), fraction=opts.elbow, **kw)[0]
    return batched_kmeans([X], k, **kw)[0]


def _cosegment_group(items: list, opts: _Opts, name: str) -> dict:
    """Part labels for a group: key -> (per-object (ids, record), extra parts.json fields)."""
    extra: dict = {"group": name, "group_size": len(items)}
    seed_base = [opts.seed, zlib.crc32(name.encode("utf-8"))]
    if opts.fg_from == "saliency":
        allX = np.concatenate([it.X for it in items])
        fg_res = _fit_group(allX, "auto", opts, seed_base + [0])
        k_fg = len(fg_res.centers)
        votes = np.zeros(k_fg, np.int64)
        start = 0
        for it in items:
            lab = fg_res.labels[start:start + len(it.X)]
            start += len(it.X)
            for c in np.unique(lab):
                votes[c] += int(it.saliency[lab == c].mean() > opts.fg_threshold)
        need = math.ceil(opts.votes * len(items))
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
    res = _fit_group(np.concatenate(fgX), opts.k, opts, seed_base + [1])
    k = len(res.centers)
    sizes = np.bincount(res.labels, minlength=k)
    order = sorted(range(k), key=lambda j: (-sizes[j], j))
    ids = np.zeros(k, np.int64)
    ids[order] = np.arange(1, k + 1)
    extra.update(group_k=k, group_inertia=_round(res.inertia), group_iterations=res.n_iter)
    start = 0
    for it, c, x in zip(items, fg_cells, fgX):
        lab = res.labels[start:start + len(c)]
        start += len(c)
        dist = ((x - res.centers[lab]) ** 2).sum(1) if len(c) else np.zeros(0)
        r = KMeansResult(res.centers, lab, float(dist.sum(dtype=np.float64)), res.n_iter, k, res.converged)
        cell_ids, more = _finalize(x, r, opts, 1, ids)
        rec = {"id": None, "cells": int(len(c)), "inertia": _round(r.inertia), **more}
        out[it.key] = ([(cell_ids, rec)], [c], extra)
    return out


def _cosegment(inputs: Sequence[str], opts: _Opts, handler: Handler) -> dict:
    groups: dict = {}
    ungrouped = 0
    for item in _iter_items(inputs, opts, handler):
        if opts.group_by and item.group is None:
            ungrouped += 1
        item.sample = {"__key__": item.key}  # pass 2 re-reads the sample; keep only what voting needs
        groups.setdefault(item.group if opts.group_by else "all", []).append(item)
    if ungrouped:
        log(f"cluster: {ungrouped} samples have no '{opts.group_by}' in their json; they form one group")
    keys = [it.key for g in groups.values() for it in g]
    if len(set(keys)) != len(keys):
        raise PartkitError("--scope cosegment needs unique sample keys, and the input repeats some; re-pack the inputs")
    results = {}
    for name in sorted(groups, key=lambda g: (g is None, str(g))):
        results.update(_cosegment_group(groups[name], opts, "" if name is None else str(name)))
        log(f"cluster: group {'(no ' + str(opts.group_by) + ')' if name is None else name}: {len(groups[name])} images")
    return results


# --------------------------------------------------------------------------------------------
# The stage


def cluster(
    inputs: Sequence[str],
    *,
    output: Output = Output(),
    scope: str = "image",
    k: Union[int, str, None] = None,
    metric: str = "cosine",
    init: str = "k-means++",
    max_iter: Optional[int] = None,
    tol: float = 1e-4,
    seed: int = 0,
    device: str = "auto",
    fg_from: Optional[str] = None,
    fg_threshold: float = 0.065,
    coverage: float = 0.5,
    upsample: str = "grid",
    min_area: float = 0,
    min_area_action: str = "merge",
    warm_start: Optional[str] = None,
    centroids: Optional[str] = None,
    save_centroids: Optional[str] = None,
    fit_on: Optional[Sequence[str]] = None,
    group_by: Optional[str] = "category",
    votes: float = 0.75,
    elbow: float = 0.975,
    k_max: int = 14,
    max_points_per_centroid: int = 256,
    batch_size: int = 64,
    handler: Handler = stop,
) -> dict:
    """Group feature cells into parts and write ``parts.png`` + ``parts.json`` per sample.

    ``scope``: ``image`` (k-means over one image's cells), ``object`` (inside each object mask,
    part ids numbered on across objects), ``dataset`` (one faiss k-means over all samples: global
    part ids) or ``cosegment`` (parts shared within groups of images, e.g. one category).
    ``k`` defaults per scope (:data:`DEFAULT_K`); ``"auto"`` picks it with the elbow rule.
    ``handler`` decides what a bad sample does (:mod:`partkit.errors`: ``stop`` or ``SkipBad()``).
    Returns the summary of :func:`partkit.io.run_stage`.

    >>> cluster(["feats.tar"], output=Output("parts/"), scope="object", k=4)  # doctest: +SKIP
    """
    k = DEFAULT_K.get(scope, 4) if k is None else k
    if isinstance(k, str) and k != "auto":
        if not k.strip().isdigit():
            raise PartkitError(f"-k must be a positive integer or 'auto', got {k!r}")
        k = int(k)
    if fg_from is None:
        fg_from = DEFAULT_FG.get(scope)
    if group_by is not None and group_by.lower() == "none":
        group_by = None
    _validate(scope, k, metric, init, max_iter, tol, fg_from, fg_threshold, coverage, upsample, min_area,
              min_area_action, warm_start, centroids, save_centroids, fit_on, group_by, votes, elbow, k_max,
              max_points_per_centroid, batch_size)
    warm: Union[None, str, np.ndarray] = None
    if warm_start == "parts":
        warm = "parts"
    elif warm_start:
        warm = _load_centroids(warm_start, "--warm-start")
        if isinstance(k, int) and k != DEFAULT_K.get(scope) and k != len(warm):
            raise PartkitError(f"--warm-start has {len(warm)} centroids but -k is {k}; drop -k or match it")
        k = len(warm)
    fixed = _load_centroids(centroids, "--centroids") if centroids else None
    if fixed is not None:
        if isinstance(k, int) and k != DEFAULT_K["dataset"] and k != len(fixed):
            raise PartkitError(f"--centroids has {len(fixed)} centroids but -k is {k}; drop -k or match it")
        k = len(fixed)
    opts = _Opts(scope=scope, k=k, metric=metric, init=init,
                 max_iter=max_iter or (25 if scope == "dataset" else 100), tol=tol, seed=int(seed),
                 device=resolve_device(device), fg_from=fg_from, fg_threshold=fg_threshold, coverage=coverage,
                 upsample=upsample, min_area=min_area, min_area_action=min_area_action, warm=warm,
                 warm_name=warm_start if warm_start in (None, "parts") else os.path.basename(warm_start),
                 elbow=elbow, k_max=k_max, votes=votes, group_by=group_by,
                 max_points_per_centroid=max_points_per_centroid,
                 source=fields.FeatureSource(f"cluster --scope {scope}") if scope in ("dataset", "cosegment") else None)
    config = {"options": opts.record(), "upsample": upsample, "centroids": centroids, "fit_on": list(fit_on or [])}

    def prepare(sample):
        return _load(sample, opts)

    if scope in ("image", "object"):
        return run_stage(inputs, lambda items: _solve_local(items, opts), output=output, name="cluster",
                         batch_size=batch_size, prepare=prepare, handler=handler, config=config)

    if scope == "dataset":
        given = expand_urls(inputs) if output.path not in (None, "-") else ()  # what resume fingerprints
        with _replayable(inputs if fixed is None and not fit_on else []) as replay:
            inputs = replay or inputs
            if fixed is None:
                centers, settings = _fit_dataset(list(fit_on) if fit_on else inputs, int(k), opts, handler)
                extra = {"faiss": settings}
            else:
                centers, extra = fixed, {"centroids": os.path.basename(centroids)}
            if save_centroids:
                write_atomic(save_centroids, encode_npy(centers))
                log(f"cluster: saved {len(centers)} centroids to {save_centroids}")
            extra["centroids_sha1"] = _digest(centers)
            return run_stage(inputs, lambda items: _assign_global(items, centers, opts, extra), output=output,
                             name="cluster", batch_size=batch_size, prepare=prepare, handler=handler, config=config,
                             input_files=given)

    # cosegment
    given = expand_urls(inputs) if output.path not in (None, "-") else ()
    with _replayable(inputs) as replay:
        results = _cosegment(replay, opts, handler)

        def write_group(items):
            outs = []
            for item in items:
                if item.key not in results:
                    outs.append(BadSample(item.key, "was not readable in the first pass"))
                    continue
                per_object, cells, extra = results[item.key]
                item.cells = cells
                outs.append(_write(item, per_object, opts, extra))
            return outs

        return run_stage(replay, write_group, output=output, name="cluster", batch_size=batch_size,
                         prepare=lambda s: _load_light(s, opts), handler=handler, config=config, input_files=given)


def _load_light(sample: dict, opts: _Opts) -> _Item:
    """Pass 2 of cosegment: only what writing needs (the grid shape and geometry)."""
    key = sample["__key__"]
    feat, meta = fields.features(sample, require_geometry=opts.upsample == "image")
    return _Item(sample, key, meta, tuple(feat.shape[1:]), np.zeros((0, 0), np.float32), [], [])


def _digest(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(arr, np.float32).tobytes()).hexdigest()[:16]
