"""Class-specific part ranking: PartDistillation's stage two (Cho et al., CVPR 2023, Sec. 4.3).

Class-agnostic part proposals (``partkit predict``) become part clusters of each object class,
scored by how typical they are for that class:

1. **Association** (Eq. 1): each proposal goes to the object it overlaps most (mask IoU) and takes
   that object's class; proposals overlapping no object are dropped.
2. **Candidates**: every object pixel goes to its most confident proposal (argmax of mask x
   score); a proposal is a candidate when its score is above ``score_threshold`` and it wins at
   least ``min_area`` of its object.
3. **Clusters**: per class, weighted k-means (weights = scores) on the L2-normalised query
   features of the candidates pooled over the dataset; all classes are solved in one batch.
4. **Density** (Eq. 2): ``r_k = softmax_k(-||f - mu_k||^2)`` over the class's centroids; the part's
   cluster is ``argmax_k r_k``. The final score (``score=``, :data:`SCORES`) is ``max_k r_k`` by
   default (``density``: Sec. 4.1, "the final part score relies fully on the reranked model"), or
   ``objectness x max_k r_k`` (``objectness-density``: the official code's ``object_scores *
   class_scores``).

Part ids are global across classes: ``class_index * k + cluster + 1`` (0 = background), with
``class_index`` the position in the model's sorted class list.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X, y = rng.normal(size=(60, 16)).astype(np.float32), np.array(["cat", "dog"] * 30)
>>> ranker = PartRanker(3, random_state=0).fit(X, y, sample_weight=np.full(60, 0.9))
>>> score, cluster, _ = ranker.rank(X[:2], y[:2], objectness=np.array([0.9, 0.5]))
>>> ranker.part_ids(y[:2], cluster).tolist() == [int(cluster[0]) + 1, 3 + int(cluster[1]) + 1]
True

The stages are :func:`fit` (``partkit rank fit``) and :func:`apply` (``partkit rank apply``).
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ._log import log, progress
from ._runtime import resolve_device
from ._version import __version__
from . import fields
from .errors import BadSample, Handler, PartkitError, recorded, stop
from .io import (
    Output, decode_json, decode_npy, encode_json, encode_png, iter_loaded, run_stage,
    write_atomic,
)
from .kmeans import weighted_kmeans

__all__ = [
    "PartRanker", "Association", "weighted_kmeans", "density", "associate", "fit", "apply",
    "OBJECT_SOURCES", "ID_SCHEME", "SCORES", "UNKNOWN_CLASSES",
]

OBJECT_SOURCES = fields.OBJECT_SOURCES  # gt_objects, gt_parts, saliency
ID_SCHEME = "class_index * k + cluster + 1; 0 = background"
_FORMAT = "partkit-rank-1"
SCORES = ("density", "objectness-density")  # the final score: Sec. 4.1's, or the official code's
UNKNOWN_CLASSES = ("error", "drop", "keep")  # rank apply: proposals of classes the model has not seen


def density(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Eq. 2 for one class: ``r[i, k] = softmax_k(-||X[i] - centers[k]||^2)`` (rows of X as given)."""
    X = np.asarray(X, np.float32)
    return _softmax_neg_sqdist(X @ np.asarray(centers, np.float32).T, (X * X).sum(1, dtype=np.float64), centers)


def _softmax_neg_sqdist(dots: np.ndarray, x2: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """softmax_k(-||x - c_k||^2) from the dot products ``x . c_k`` and the squared norms ``||x||^2``."""
    C = np.asarray(centers, np.float32)
    d = x2[:, None] - 2.0 * dots.astype(np.float64) + (C * C).sum(1, dtype=np.float64)[None, :]
    z = -np.maximum(d, 0.0)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------------------------
# The estimator


def _group_rows(index: np.ndarray, count: int) -> list:
    """Row numbers of each value 0..count-1 of ``index``, in order (one sort, not ``count`` scans)."""
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(count + 1))
    return [order[bounds[j]:bounds[j + 1]] for j in range(count)]


def _class_seed(seed: int, name: str) -> list:
    # From the class name, so a class's clusters do not depend on which other classes exist.
    return [int(seed), zlib.crc32(name.encode("utf-8"))]


class _Pool:
    """Candidate rows pooled per class; past ``bound`` rows a class keeps a uniform sample of them
    (reservoir sampling, seeded per class name, so the sample depends only on the seed and that
    class's rows in input order). Memory: at most ``bound`` rows per class."""

    def __init__(self, bound: Optional[int], seed: int):
        self.bound, self.seed = bound, seed
        self.rows: dict = {}  # class -> [features, weights, fractions] (lists of rows, or arrays once full)
        self.seen: dict = {}
        self.rng: dict = {}

    def add(self, feats: np.ndarray, classes: np.ndarray, weights: np.ndarray, fractions: np.ndarray) -> None:
        for c in np.unique(classes):
            m = classes == c
            self._add(str(c), feats[m], weights[m], fractions[m])

    def _add(self, c: str, f: np.ndarray, w: np.ndarray, fr: np.ndarray) -> None:
        seen = self.seen.get(c, 0)
        if c not in self.rows:
            self.rows[c] = [[], [], []]
            self.rng[c] = np.random.default_rng(_class_seed(self.seed, c))
        pool = self.rows[c]
        bound = self.bound
        if bound is None or seen + len(f) <= bound:
            for lst, a in zip(pool, (f, w, fr)):
                lst.append(a)
            self.seen[c] = seen + len(f)
            return
        if isinstance(pool[0], list):  # full now: one array per column, ``bound`` rows
            have = [np.concatenate(lst) if lst else a[:0] for lst, a in zip(pool, (f, w, fr))]
            take = bound - seen
            pool[:] = [np.concatenate([h, a[:take]]) for h, a in zip(have, (f, w, fr))]
            f, w, fr = f[take:], w[take:], fr[take:]
            seen = bound
        slots = np.array([self.rng[c].integers(0, seen + i + 1) for i in range(len(f))], np.int64)
        for i in np.flatnonzero(slots < bound):  # algorithm R: row t replaces slot j < bound, j uniform in [0, t]
            for col, a in zip(pool, (f, w, fr)):
                col[slots[i]] = a[i]
        self.seen[c] = seen + len(f)

    def arrays(self) -> tuple:
        feats, classes, weights, fractions = [], [], [], []
        for c in sorted(self.rows):
            cols = [np.concatenate(col) if isinstance(col, list) else col for col in self.rows[c]]
            feats.append(cols[0])
            weights.append(cols[1])
            fractions.append(cols[2])
            classes.append(np.full(len(cols[0]), c, dtype=object))
        return np.concatenate(feats), np.concatenate(classes), np.concatenate(weights), np.concatenate(fractions)

    def record(self) -> dict:
        """What the model file says about the pooling: the bound and, per class, rows seen and kept."""
        return {"max_candidates": self.bound,
                "subsampled": {c: {"seen": n, "kept": min(n, self.bound)} for c, n in sorted(self.seen.items())
                               if self.bound is not None and n > self.bound}}


def _npz_bytes(arrays: dict) -> bytes:
    """An .npz with fixed member timestamps, so the same model gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


class PartRanker:
    """Per-class part clusters of proposal features and the density score of Eq. 2.

    ``fit(X, y, sample_weight)`` clusters the L2-normalised rows of ``X`` separately for each class
    in ``y`` (weighted k-means, all classes batched). ``max_object_fraction`` drops clusters whose
    members cover more than that share of their object on average (whole-object "parts", Sec. 5.4).

    Attributes: ``classes_`` (sorted), ``cluster_centers_`` (C x k x D, zero rows past a class's
    ``n_clusters_``), ``n_clusters_``, ``inertia_`` (per class, weighted), ``counts_`` and
    ``object_fraction_`` (C x k), ``dropped_`` (C x k bool), ``labels_``, ``n_features_in_``.
    """

    def __init__(self, n_clusters: int = 8, *, score_threshold: float = 0.3, min_area: float = 0.05,
                 max_object_fraction: Optional[float] = None, max_iter: int = 300, tol: float = 1e-4,
                 random_state: int = 0, device="cpu"):
        self.n_clusters = n_clusters
        self.score_threshold = score_threshold
        self.min_area = min_area
        self.max_object_fraction = max_object_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device

    def _check_params(self) -> None:
        if int(self.n_clusters) < 1:
            raise PartkitError(f"-k must be at least 1, got {self.n_clusters}")
        if not 0 <= self.score_threshold < 1:
            raise PartkitError(f"--score-threshold must be in [0, 1), got {self.score_threshold}")
        if not 0 <= self.min_area <= 1:
            raise PartkitError(f"--min-area must be a fraction of the object in [0, 1], got {self.min_area}")
        if self.max_object_fraction is not None and not 0 < self.max_object_fraction <= 1:
            raise PartkitError(f"--max-object-fraction must be in (0, 1], got {self.max_object_fraction}")
        if self.max_iter < 1:
            raise PartkitError(f"--max-iter must be at least 1, got {self.max_iter}")

    def fit(self, X, y, sample_weight=None, object_fraction=None) -> "PartRanker":
        self._check_params()
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).astype(str)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise PartkitError(f"X must be n x D with one class per row and n >= 1; got X {X.shape}, {len(y)} classes")
        w = np.ones(len(X), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        k = int(self.n_clusters)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        rows = _group_rows(inverse, len(self.classes_))
        res = weighted_kmeans(X, w, rows, k, metric="cosine", max_iter=self.max_iter, tol=self.tol,
                              seeds=[_class_seed(self.random_state, c) for c in self.classes_],
                              device=resolve_device(str(self.device)))
        C, D = len(self.classes_), X.shape[1]
        self.cluster_centers_ = np.zeros((C, k, D), np.float32)
        self.n_clusters_ = np.array([r.n_clusters for r in res], np.int64)
        self.inertia_ = np.array([r.inertia for r in res])
        self.n_iter_ = np.array([r.n_iter for r in res], np.int64)
        self.counts_ = np.zeros((C, k), np.int64)
        self.object_fraction_ = np.full((C, k), np.nan)
        self.labels_ = np.zeros(len(X), np.int64)
        frac = None if object_fraction is None else np.asarray(object_fraction, np.float64)
        for j, (r, rw) in enumerate(zip(res, rows)):
            self.cluster_centers_[j, :r.n_clusters] = r.centers
            self.labels_[rw] = r.labels
            self.counts_[j] = np.bincount(r.labels, minlength=k)
            if frac is not None:
                sums = np.bincount(r.labels, weights=frac[rw], minlength=k)
                self.object_fraction_[j] = np.where(self.counts_[j] > 0, sums / np.maximum(self.counts_[j], 1), np.nan)
        self.dropped_ = np.zeros((C, k), bool)
        if self.max_object_fraction is not None:
            self.dropped_ = np.nan_to_num(self.object_fraction_) > self.max_object_fraction
        self.n_features_in_ = D
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise PartkitError("this PartRanker is not fitted yet; call fit() or PartRanker.load(path)")

    def class_index(self, y) -> np.ndarray:
        """Index of each class name in ``classes_``, -1 for classes the model has not seen."""
        self._check_fitted()
        y = np.asarray(y).astype(str)
        pos = np.searchsorted(self.classes_, y)
        pos = np.minimum(pos, len(self.classes_) - 1)
        return np.where(self.classes_[pos] == y, pos, -1) if len(y) else np.zeros(0, np.int64)

    def predict_proba(self, X, y) -> np.ndarray:
        """``r`` of Eq. 2 (n x k) over each row's class clusters; 0 past a class's ``n_clusters_``."""
        self._check_fitted()
        X = np.asarray(X, np.float32)
        r = np.zeros((len(X), self.cluster_centers_.shape[1]))
        if len(X) == 0:
            return r
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise PartkitError(f"features have shape {X.shape} but the ranking model was fitted on "
                               f"{self.n_features_in_} dimensions; use proposals from the same decoder")
        ci = self.class_index(y)
        if (ci < 0).any():
            raise PartkitError(f"class {np.asarray(y)[ci < 0][0]!r} is not in the model; known: "
                               f"{', '.join(self.classes_[:10])}")
        # rows are L2-normalised on the fly (x / |x|, so |x|^2 = 1, 0 for zero rows) rather than copied
        norm = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
        if not np.isfinite(norm).all():
            raise PartkitError("proposal features hold NaN or inf values")
        inv = np.where(norm > 0, 1.0 / np.maximum(norm, 1e-12), 0.0)
        for j, rows in enumerate(_group_rows(ci, len(self.classes_))):  # one small product per class
            if len(rows):
                C = self.cluster_centers_[j, :int(self.n_clusters_[j])]
                r[rows, :len(C)] = _softmax_neg_sqdist((X[rows] @ C.T) * inv[rows, None], (norm[rows] > 0) * 1.0, C)
        return r

    def rank(self, X, y, objectness=None, score: str = "density") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: (final score, cluster = argmax_k r_k, density = max_k r_k).

        The final score is ``max_k r_k`` with ``score="density"`` (Sec. 4.1) and ``objectness x
        max_k r_k`` with ``score="objectness-density"`` (the official code), which needs ``objectness``.
        """
        if score not in SCORES:
            raise PartkitError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
        r = self.predict_proba(X, y)
        cluster = r.argmax(1) if len(r) else np.zeros(0, np.int64)
        best = r.max(1) if len(r) else np.zeros(0)
        if score == "density":
            return best.copy(), cluster, best
        if objectness is None:
            raise PartkitError("score='objectness-density' needs the proposals' objectness scores")
        return np.asarray(objectness, np.float64) * best, cluster, best

    def part_ids(self, y, cluster) -> np.ndarray:
        """Global part ids: ``class_index * k + cluster + 1``."""
        return self.class_index(y) * self.cluster_centers_.shape[1] + np.asarray(cluster) + 1

    def id_names(self) -> dict:
        """``{part id: "class/cluster"}`` for every cluster that was fitted and not dropped."""
        k = self.cluster_centers_.shape[1]
        return {int(j * k + c + 1): f"{name}/{c}" for j, name in enumerate(self.classes_)
                for c in range(int(self.n_clusters_[j])) if not self.dropped_[j, c]}

    def save(self, path: str, meta: Optional[dict] = None) -> str:
        """Write the model as an .npz (arrays + a JSON ``meta`` string), atomically."""
        self._check_fitted()
        info = {"format": _FORMAT, "classes": self.classes_.tolist(), "k": int(self.cluster_centers_.shape[1]),
                "id_scheme": ID_SCHEME, "params": {n: getattr(self, n) for n in (
                    "n_clusters", "score_threshold", "min_area", "max_object_fraction", "max_iter", "tol",
                    "random_state")}, "partkit_version": __version__, **(meta or {})}
        arrays = {"centroids": self.cluster_centers_, "n_clusters": self.n_clusters_, "inertia": self.inertia_,
                  "counts": self.counts_, "object_fraction": self.object_fraction_, "dropped": self.dropped_,
                  "meta": np.array(json.dumps(info, sort_keys=True))}
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise PartkitError(f"cannot write the model to {path!r}: {folder!r} is a file, not a folder")
        os.makedirs(folder, exist_ok=True)
        write_atomic(path, _npz_bytes(arrays))
        self.meta_ = info
        return path

    @classmethod
    def load(cls, path: str) -> "PartRanker":
        if not os.path.isfile(path):
            raise PartkitError(f"ranking model {path!r} not found; write one with "
                               f"`partkit rank fit ... --model-out {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            info = json.loads(str(arrays["meta"][()]))
        except Exception:
            raise PartkitError(f"{path!r} is not a ranking model written by `partkit rank fit`") from None
        if info.get("format") != _FORMAT:
            raise PartkitError(f"{path!r} is not a ranking model written by `partkit rank fit`")
        self = cls(**info["params"])
        self.classes_ = np.array(info["classes"])
        self.cluster_centers_ = arrays["centroids"].astype(np.float32)
        self.n_clusters_, self.inertia_ = arrays["n_clusters"], arrays["inertia"]
        self.counts_, self.dropped_ = arrays["counts"], arrays["dropped"]
        self.object_fraction_ = arrays["object_fraction"]
        self.n_features_in_ = self.cluster_centers_.shape[2]
        self.meta_ = info
        return self


# --------------------------------------------------------------------------------------------
# Association and candidates on one image


@dataclass
class Association:
    """Per proposal: its object (index, -1 if none), the IoU with it, and the share of the object's
    pixels it wins (most confident proposal there) and covers."""

    object_index: np.ndarray
    iou: np.ndarray
    win_fraction: np.ndarray
    cover_fraction: np.ndarray

    def candidates(self, scores, score_threshold: float, min_area: float) -> np.ndarray:
        """Proposals scoring above ``score_threshold`` that win at least ``min_area`` of their object."""
        return (self.object_index >= 0) & (np.asarray(scores) > score_threshold) & (self.win_fraction >= min_area)


def _winners(masks: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """For each pixel (column of ``masks``, n x P bool), the row with the highest ``conf`` that covers it
    (the argmax of mask x conf; ties to the lower row), or -1 where none does."""
    best = np.full(masks.shape[1], -1, np.int64)
    for i in np.argsort(-np.asarray(conf, np.float64), kind="stable"):
        best[masks[i] & (best < 0)] = i
    return best


def associate(masks: np.ndarray, scores: np.ndarray, object_masks: np.ndarray) -> Association:
    """Eq. 1 on one image: each proposal (K x H x W bool masks) to the object (M x H x W) of highest IoU.

    >>> m = np.zeros((2, 4, 4), bool); m[0, :2] = True; m[1, 2:, :2] = True
    >>> a = associate(m, np.array([0.9, 0.8]), m[:1].copy())
    >>> a.object_index.tolist(), a.win_fraction.tolist()
    ([0, -1], [1.0, 0.0])
    """
    K, M = len(masks), len(object_masks)
    out = Association(np.full(K, -1, np.int64), np.zeros(K), np.zeros(K), np.zeros(K))
    if K == 0 or M == 0:
        return out
    flat = masks.reshape(K, -1)
    area_p = flat.sum(1)
    subs = [flat[:, np.flatnonzero(om.ravel())] for om in object_masks]  # proposals on each object's pixels
    area_o = np.array([s.shape[1] for s in subs], np.float64)
    inter = np.stack([s.sum(1) for s in subs], 1).astype(np.float64)
    iou = inter / np.maximum(area_p[:, None] + area_o[None, :] - inter, 1)
    best = iou.argmax(1)
    out.iou = iou[np.arange(K), best]
    out.object_index = np.where(out.iou > 0, best, -1)
    for m in range(M):
        members = np.flatnonzero(out.object_index == m)
        if not len(members):
            continue
        sub = subs[m][members]
        win = _winners(sub, np.asarray(scores)[members])
        out.win_fraction[members] = np.bincount(win[win >= 0], minlength=len(members)) / area_o[m]
        out.cover_fraction[members] = sub.sum(1) / area_o[m]
    return out


# --------------------------------------------------------------------------------------------
# Reading samples


@dataclass
class _Objects:
    source: str  # gt_objects | gt_parts | saliency
    field: str  # the JSON field read for gt_objects
    default_class: Optional[str]
    fg_threshold: float = fields.SALIENCY_THRESHOLD  # saliency only

    def record(self) -> dict:
        rec = {"objects_from": self.source, "objects_field": self.field, "default_class": self.default_class}
        if self.source == "saliency":
            rec["fg_threshold"] = self.fg_threshold
        return rec


@dataclass
class _Image:
    key: str
    size: tuple
    proposals: list  # proposals.json entries
    scores: np.ndarray
    feats: np.ndarray
    masks: np.ndarray  # K x H x W bool
    objects: list  # {"id", "class"} per object
    object_masks: np.ndarray  # M x H x W bool
    assoc: Association

    def object_classes(self) -> np.ndarray:
        """The class of each proposal's object ('' when it has none)."""
        names = np.array([o["class"] for o in self.objects] + [""])
        return names[self.assoc.object_index]


def _sample_class(sample: dict, default: Optional[str]) -> str:
    name = fields.category(sample)
    if name is None and default is None:
        raise BadSample(sample["__key__"], "has no object class: its 'json' has no \"category\"; give --default-class "
                                           "NAME (e.g. person) or pack with --category")
    return name if name is not None else str(default)


def _image_size(sample: dict, objects: _Objects) -> tuple:
    info = fields.info(sample)
    if "height" in info and "width" in info:
        return int(info["height"]), int(info["width"])
    if objects.source == "gt_parts":
        return fields.gt_parts(sample).shape
    if objects.source == "saliency" and "feat.json" in sample:
        meta = fields.geometry(decode_json(sample, "feat.json"), sample["__key__"])
        return tuple(int(v) for v in meta["image_size"])
    raise BadSample(sample["__key__"], "has no image size in its 'json'; re-run `partkit pack`")


def _read_objects(sample: dict, size: tuple, opts: _Objects) -> tuple[list, np.ndarray]:
    key = sample["__key__"]
    if opts.source == "gt_objects" and opts.field not in sample and "gt_parts.png" in sample \
            and opts.field == "gt_objects.json":
        raise BadSample(key, "has no 'gt_objects.json'; use --objects-from gt_parts (the labelled pixels are one "
                             "object), --objects-from saliency (extract --saliency), or pack with --coco FILE")
    objs, masks = fields.objects_from(sample, opts.source, size, field=opts.field, fg_threshold=opts.fg_threshold)
    if opts.source != "gt_objects":  # one object: the sample's class
        return [{"id": 1, "class": _sample_class(sample, opts.default_class)} for _ in objs], masks
    keep = [i for i, o in enumerate(objs) if not o.get("iscrowd")]  # crowd regions are not instances
    records = []
    for i in keep:
        o = objs[i]
        name = o.get("category", o.get("category_id"))
        records.append({"id": o.get("id", i + 1),
                        "class": str(name) if name is not None else _sample_class(sample, opts.default_class)})
    return records, masks[keep]


def _read(sample: dict, opts: _Objects) -> _Image:
    key = sample["__key__"]
    size = _image_size(sample, opts)
    props = fields.proposals(sample, "proposals.json", *size)
    feats = decode_npy(sample, "proposals.npy")
    if feats.ndim != 2 or len(feats) != len(props):
        raise BadSample(key, f"proposals.npy has shape {feats.shape} for {len(props)} proposals; both must come "
                             "from the same `partkit predict` run")
    feats = feats.astype(np.float32)
    masks = fields.decode_masks([p["segmentation"] for p in props], key, "proposals.json", size)
    scores = np.array([p["score"] for p in props], np.float64)
    objects, object_masks = _read_objects(sample, size, opts)
    return _Image(key, size, props, scores, feats, masks, objects, object_masks,
                  associate(masks, scores, object_masks))


# --------------------------------------------------------------------------------------------
# The stages


def _objects(objects_from: Optional[str], objects_field: Optional[str], default_class: Optional[str],
             fitted: Optional[dict] = None, fg_threshold: Optional[float] = None) -> _Objects:
    """The object options given, else as fitted, else the defaults; checked."""
    fitted = fitted or {}
    source = objects_from or fitted.get("objects_from", "gt_objects")
    fields.check_object_source(source)
    if objects_field is not None and source != "gt_objects":
        raise PartkitError(f"--objects-field names instance masks for --objects-from gt_objects; with {source} "
                           "there is one object per image, so drop --objects-field")
    if fg_threshold is not None and source != "saliency":
        raise PartkitError(f"--fg-threshold applies to --objects-from saliency, not {source}; drop --fg-threshold")
    field = objects_field or fitted.get("objects_field", "gt_objects.json")
    if not field.endswith(".json"):
        raise PartkitError(f"--objects-field names a JSON field of instances (like gt_objects.json), got {field!r}")
    threshold = fg_threshold if fg_threshold is not None else fitted.get("fg_threshold", fields.SALIENCY_THRESHOLD)
    if not math.isfinite(threshold):
        raise PartkitError(f"--fg-threshold must be a number, got {threshold}")
    return _Objects(source, field, default_class if default_class is not None else fitted.get("default_class"),
                    float(threshold))


def fit(inputs: Sequence[str], model_out: str, *, n_clusters: int = 8, score_threshold: float = 0.3,
        min_area: float = 0.05, max_object_fraction: Optional[float] = None, objects_from: str = "gt_objects",
        objects_field: Optional[str] = None, default_class: Optional[str] = None,
        fg_threshold: Optional[float] = None, max_iter: int = 300,
        tol: float = 1e-4, seed: int = 0, device: str = "auto", handler: Handler = stop,
        max_candidates: Optional[int] = 100_000) -> PartRanker:
    """Pool candidate proposals per object class over the input, cluster them, save the model.

    A class with more than ``max_candidates`` candidates is clustered on a seeded uniform sample of
    that many (reservoir sampling; the model records seen and kept counts); ``None``: no bound.

    >>> fit(["preds/"], "rank.npz", n_clusters=8, objects_from="gt_parts", default_class="person")  # doctest: +SKIP
    """
    ranker = PartRanker(n_clusters, score_threshold=score_threshold, min_area=min_area,
                        max_object_fraction=max_object_fraction, max_iter=max_iter, tol=tol, random_state=seed,
                        device=device)
    ranker._check_params()
    if max_candidates is not None and (not isinstance(max_candidates, (int, np.integer)) or max_candidates < n_clusters):
        raise PartkitError(f"--max-candidates must be an integer >= -k ({n_clusters}), got {max_candidates!r}; "
                           "pass a larger bound, or 0 for none")
    opts = _objects(objects_from, objects_field, default_class, fg_threshold=fg_threshold)
    resolve_device(device)
    pool = _Pool(max_candidates, seed)
    counts = {"samples": 0, "proposals": 0, "associated": 0, "candidates": 0}
    skipped: list = []
    with progress("rank fit") as bar:
        for img in iter_loaded(inputs, lambda sample: _read(sample, opts), handler=recorded(handler, skipped)):
            cand = img.assoc.candidates(img.scores, score_threshold, min_area)
            pool.add(np.asarray(img.feats[cand], np.float32), img.object_classes()[cand], img.scores[cand],
                     img.assoc.cover_fraction[cand])
            counts["samples"] += 1
            counts["proposals"] += len(img.scores)
            counts["associated"] += int((img.assoc.object_index >= 0).sum())
            counts["candidates"] += int(cand.sum())
            bar.update()
    if counts["samples"] == 0:
        raise PartkitError("rank fit: the input holds no usable samples; check the input shards")
    if counts["candidates"] == 0:
        raise PartkitError(f"rank fit: no candidate parts in {counts['samples']} samples ({counts['associated']} of "
                           f"{counts['proposals']} proposals overlap an object); lower --score-threshold "
                           f"({score_threshold}) or --min-area ({min_area}), or check --objects-from")
    ranker.fit(*pool.arrays())
    ranker.save(model_out, {"objects": opts.record(), "counts": counts, "skipped": skipped, "seed": seed,
                            "pooling": pool.record()})
    for c, n in pool.record()["subsampled"].items():
        log(f"rank fit: class {c!r}: {n['seen']} candidates, clustered on a seeded sample of {n['kept']} "
            "(--max-candidates)")
    dropped = int(ranker.dropped_.sum())
    log(f"rank fit: {counts['candidates']} candidates of {counts['proposals']} proposals in {counts['samples']} "
        f"samples -> {len(ranker.classes_)} classes x k={n_clusters}"
        f"{f', {dropped} clusters dropped' if dropped else ''}; wrote {model_out}")
    return ranker


def _label_map(img: _Image, rows: np.ndarray, conf: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Object pixels to the part id of their most confident proposal among ``rows`` (others 0)."""
    out = np.zeros(img.size, np.int64)
    flat = out.reshape(-1)
    for m, om in enumerate(img.object_masks):
        sel = np.flatnonzero(img.assoc.object_index[rows] == m)
        if not len(sel):
            continue
        pix = np.flatnonzero(om.ravel())
        win = _winners(img.masks.reshape(len(img.masks), -1)[rows[sel]][:, pix], conf[sel])
        flat[pix[win >= 0]] = ids[sel][win[win >= 0]]
    return out


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _unknown(img: _Image, cls: np.ndarray, unknown: np.ndarray, ranker: PartRanker, model_name: str) -> None:
    names = sorted(set(cls[unknown].tolist()))
    raise PartkitError(f"rank apply: sample {img.key!r} has objects of {len(names)} class(es) the ranking model "
                       f"{model_name!r} was not fitted on: {', '.join(map(repr, names[:10]))} (it knows "
                       f"{', '.join(ranker.classes_[:10])}{', ...' if len(ranker.classes_) > 10 else ''}); fit the "
                       "model on data with these classes, or pass --unknown-classes drop (leave their proposals out) "
                       "or keep (list them unranked)")


def _apply_one(sample: dict, ranker: PartRanker, opts: _Objects, as_targets: bool, model_name: str,
               score_kind: str = "density", unknown_classes: str = "error") -> dict:
    img = _read(sample, opts)
    cls = img.object_classes()
    associated = img.assoc.object_index >= 0
    unknown = associated & (ranker.class_index(cls) < 0)
    if unknown.any() and unknown_classes == "error":
        _unknown(img, cls, unknown, ranker, model_name)
    rows = np.flatnonzero(associated & ~unknown)
    score, cluster, dens = ranker.rank(img.feats[rows], cls[rows], img.scores[rows], score=score_kind)
    ids = ranker.part_ids(cls[rows], cluster)
    keep = ~ranker.dropped_[ranker.class_index(cls[rows]), cluster]
    cand = img.assoc.candidates(img.scores, ranker.score_threshold, ranker.min_area)

    def entry(i: int, **ranked) -> dict:
        p, o = img.proposals[i], img.objects[img.assoc.object_index[i]]
        return {"proposal": p.get("id", i + 1), "object": o["id"], "class": o["class"], **ranked,
                "objectness": _round(img.scores[i]), "iou": _round(img.assoc.iou[i]), "candidate": bool(cand[i]),
                "segmentation": p["segmentation"], **{f: p[f] for f in ("bbox", "area") if f in p}}

    entries = [entry(int(rows[i]), cluster=int(cluster[i]), part_id=int(ids[i]), score=_round(score[i]),
                     density=_round(dens[i])) for i in np.flatnonzero(keep)]
    if unknown_classes == "keep":
        entries += [entry(int(i), cluster=-1, part_id=0, score=0.0, density=0.0, unknown_class=True)
                    for i in np.flatnonzero(unknown)]
    entries.sort(key=lambda e: -e["score"])  # stable: ties keep proposal order
    doc = {"proposals": entries, "objects": img.objects, "classes": ranker.classes_.tolist(),
           "k": int(ranker.cluster_centers_.shape[1]), "id_scheme": ID_SCHEME, "model": model_name,
           "score": score_kind, "dropped": int((~keep).sum()), "unassociated": int((~associated).sum()),
           "unknown_class": int(unknown.sum())}
    new = {**sample, "ranked.json": encode_json(doc),
           "ranked_parts.png": encode_png(_label_map(img, rows[keep], score[keep], ids[keep]))}
    if as_targets:
        sel = keep & cand[rows]
        new["targets.png"] = encode_png(_label_map(img, rows[sel], score[sel], ids[sel]))
        new["targets.json"] = encode_json({"classes": {str(i): n for i, n in ranker.id_names().items()},
                                           "background": 0, "id_scheme": ID_SCHEME, "model": model_name})
    return new


def apply(inputs: Sequence[str], model: str, *, as_targets: bool = False, score: str = "density",
          unknown_classes: str = "error", objects_from: Optional[str] = None, objects_field: Optional[str] = None,
          default_class: Optional[str] = None, fg_threshold: Optional[float] = None, output: Output = Output(),
          handler: Handler = stop) -> dict:
    """Add ``ranked.json`` and ``ranked_parts.png`` (plus ``targets.png``/``targets.json`` with
    ``as_targets``) to every sample. Object options default to those the model was fitted with.

    ``score`` is the final score (:data:`SCORES`); ``unknown_classes`` says what happens to proposals
    whose object's class the model was not fitted on (:data:`UNKNOWN_CLASSES`): ``error`` stops the
    run naming the classes, ``drop`` leaves them out, ``keep`` lists them unranked (``cluster`` -1,
    ``part_id`` 0, ``score`` 0, ``unknown_class`` true). Either way ``unknown_class`` counts them.

    >>> apply(["preds/"], "rank.npz", output=Output("ranked/"))  # doctest: +SKIP
    """
    if score not in SCORES:
        raise PartkitError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if unknown_classes not in UNKNOWN_CLASSES:
        raise PartkitError(f"--unknown-classes must be one of {', '.join(UNKNOWN_CLASSES)}, got {unknown_classes!r}")
    ranker = PartRanker.load(model)
    fitted = ranker.meta_.get("objects", {})
    opts = _objects(objects_from, objects_field, default_class, fitted, fg_threshold)
    name = os.path.basename(model)
    config = {"model": name, "as_targets": as_targets, "score": score, "unknown_classes": unknown_classes,
              **opts.record()}
    return run_stage(inputs, lambda items: items, output=output, name="rank apply", handler=handler, config=config,
                     prepare=lambda s: _apply_one(s, ranker, opts, as_targets, name, score, unknown_classes))
