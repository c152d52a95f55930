"""Samples as items (cells in the metric's space, the cells of each object), and items back to samples.

Every scope reads with :func:`load` and writes with :func:`finalize` + :func:`write_item`;
:func:`replayable` lets the scopes that read their input twice (dataset, cosegment) take stdin.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .. import fields
from .._log import log
from .._version import __version__
from ..errors import BadSample, Handler
from ..grid import grid_to_image, mask_to_grid
from ..io import decode_label_map, encode_json, encode_png, iter_loaded, open_url
from ..kmeans import KMeansResult, nearest_center, normalize_rows
from ._config import ClusterConfig, Job


# --------------------------------------------------------------------------------------------
# Samples to items


@dataclass
class Item:
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


def coverage_cells(covs: np.ndarray, coverage: float, areas: Sequence[float]) -> tuple[list, list]:
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


def object_cells(sample: dict, meta: dict, cfg: ClusterConfig, h: int, w: int, key: str):
    """(object records, cell indices per object, saliency per cell or None)."""
    fg = cfg.fg_from
    if fg is None:
        return [{"id": None}], [np.arange(h * w)], None
    if fg == "saliency":
        flat = fields.saliency(sample, (h, w)).reshape(-1)
        return [{"id": None, "source": "saliency"}], [np.flatnonzero(fields.salient(flat, cfg.fg_threshold))], flat
    fields.geometry(meta, key)
    H, W = meta["image_size"]
    if fg == "gt_parts":
        mask = fields.foreground(fields.gt_parts(sample, size=(H, W)))
        cells, notes = coverage_cells(mask_to_grid(mask, meta)[None], cfg.coverage, [mask.sum()])
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
    cells, notes = coverage_cells(covs, cfg.coverage, areas)
    for rec, note, is_crowd in zip(records, notes, crowd):
        if is_crowd:
            rec["note"] = "crowd region (iscrowd); not clustered"
        elif note:
            rec["note"] = note
    return records, cells, None


def load(sample: dict, job: Job) -> Item:
    """The item of one sample (its features, foreground cells, and what the scope and warm start need)."""
    cfg = job.cfg
    key = sample["__key__"]
    feat, meta = fields.features(sample, require_geometry=cfg.upsample == "image")
    C, h, w = feat.shape
    if job.source is not None:
        job.source.check(sample, meta, C)
    X = normalize_rows(feat.reshape(C, h * w).T, cfg.metric)
    objects, cells, sal = object_cells(sample, meta, cfg, h, w, key)
    item = Item(sample, key, meta, (h, w), X, objects, cells, saliency=sal)
    if isinstance(job.warm, str):  # "parts"
        prev = decode_label_map(sample, "parts.png")
        if prev.shape != (h, w):
            raise BadSample(key, f"the previous parts.png is {prev.shape[1]}x{prev.shape[0]}, not the feature grid "
                                 f"{w}x{h}; run the previous round with --upsample grid")
        item.prev = prev.reshape(-1).astype(np.int64)
    if cfg.scope == "cosegment" and cfg.group_by:
        value = fields.info(sample).get(cfg.group_by)
        item.group = None if value is None else str(value)
    return item


def iter_items(inputs: Sequence[str], job: Job, handler: Handler) -> Iterator[Item]:
    return iter_loaded(inputs, lambda sample: load(sample, job), handler=handler)


def load_light(sample: dict, cfg: ClusterConfig) -> Item:
    """Pass 2 of cosegment: only what writing needs (the grid shape and geometry)."""
    key = sample["__key__"]
    feat, meta = fields.features(sample, require_geometry=cfg.upsample == "image")
    return Item(sample, key, meta, tuple(feat.shape[1:]), np.zeros((0, 0), np.float32), [], [])


# --------------------------------------------------------------------------------------------
# Items back to samples: k-means results as label maps and parts.json


def rounded(x: float) -> float:
    return float(f"{x:.6g}")


def finalize(X: np.ndarray, res: KMeansResult, cfg: ClusterConfig, first_id: int,
             fixed_ids: Optional[np.ndarray] = None):
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
    thr = cfg.min_area if cfg.min_area >= 1 else math.ceil(cfg.min_area * n)
    if thr > 0 and n:
        small = (sizes > 0) & (sizes < thr)
        if small.any() and not ((sizes > 0) & ~small).any():
            small[int(np.argmax(sizes))] = False  # every cluster is small: keep the largest
        if small.any():
            hit = small[labels]
            if cfg.min_area_action == "merge":
                kept = np.flatnonzero((sizes > 0) & ~small)
                labels[hit] = kept[nearest_center(X[hit], res.centers[kept])[0]]
            else:
                labels[hit] = -1
            rec["small_parts_" + ("merged" if cfg.min_area_action == "merge" else "dropped")] = int(small.sum())
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


def write_item(item: Item, per_object: list, cfg: ClusterConfig, extra: Optional[dict] = None) -> dict:
    """Assemble parts.png and parts.json; ``per_object`` holds (cell ids, record) per object."""
    h, w = item.shape
    grid = np.zeros(h * w, np.int64)
    objects = []
    for idx, (ids, rec) in zip(item.cells, per_object):
        grid[idx] = ids
        objects.append(rec)
    grid = grid.reshape(h, w)
    parts = sorted({p for rec in objects for p in rec.get("parts", [])})
    record = {**cfg.record(), **(extra or {}), "objects": objects, "num_parts": len(parts),
              "iterations": max([r.get("iterations", 0) for r in objects], default=0),
              "inertia": rounded(sum(r.get("inertia", 0.0) for r in objects)),
              "partkit_version": __version__, "resolution": cfg.upsample}
    if cfg.upsample == "image":
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


# --------------------------------------------------------------------------------------------
# Inputs read twice (scopes dataset and cosegment)


@contextmanager
def replayable(inputs: Sequence[str]) -> Iterator[list]:
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
