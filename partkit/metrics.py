"""Part-discovery metrics as plain functions on arrays (numpy, scipy; masks via :mod:`partkit.rle`).

Everything pooled over a dataset goes through a :class:`Contingency` table of (true id,
predicted id) counts accumulated image by image, so NMI, ARI and matched mIoU over 10^8
pixels take seconds and memory that does not grow with the number of images. Scores are
fractions in [0, 1] (sklearn's convention); ``partkit.evaluate`` reports them x100.

Example:
    >>> from partkit.metrics import Contingency, nmi_score, ari_score
    >>> c = Contingency().update([0, 0, 1, 1], [5, 5, 7, 7])
    >>> nmi_score(contingency=c.table_), ari_score(contingency=c.table_)
    (1.0, 1.0)
"""
from __future__ import annotations

import warnings
from math import log
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import PartkitError

__all__ = [
    "Contingency", "nmi_score", "ari_score", "match_clusters", "matched_iou", "confusion_iou",
    "match_to_parts", "part_confusion", "official_part_scores",
    "mask_iou", "COCO_IOU_THRESHOLDS", "greedy_recall", "RecallAccumulator", "coco_dataset", "coco_mask_ap",
    "average_precision", "retrieval_ap", "shape_miou", "fit_linear_probe", "part_centroids", "landmark_regression",
]

_CHUNK = 1 << 22  # pairs per bincount call: caps the temporary combined-id array at 32 MB
_MAX_CELLS = 1 << 28  # dense contingency tables above this many cells (2 GB) are refused


# ---------------------------------------------------------------------------------------------
# Contingency tables


def _as_ids(labels, what: str) -> np.ndarray:
    a = np.asarray(labels)
    if a.dtype == bool:
        return a.view(np.uint8)
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise PartkitError(f"{what} labels must be integers, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise PartkitError(f"{what} labels contain negative id {int(a.min())}; ids must be >= 0")
    return a


def _id_bound(a: np.ndarray) -> int:
    # uint8 maps (the common case) skip a pass over the data: the table just has 256 slots.
    if a.dtype.itemsize == 1:
        return 256
    return int(a.max()) + 1 if a.size else 0


class Contingency:
    """Counts of (true id, predicted id) pairs, accumulated batch by batch.

    ``table_[t, p]`` counts pairs with true id ``t`` and predicted id ``p``. Ids index the
    table directly (they must be non-negative integers); rows and columns of ids never seen
    stay zero and do not affect any score. Memory is the table plus a bounded chunk.

    Example:
        >>> c = Contingency().update([0, 0, 1], [1, 1, 2])
        >>> c.table_[:2, :3].tolist()
        [[0, 2, 0], [0, 0, 1]]
    """

    def __init__(self, table: Optional[np.ndarray] = None):
        self.table_ = np.zeros((0, 0), np.int64) if table is None else np.array(table, dtype=np.int64)

    def update(self, labels_true, labels_pred) -> "Contingency":
        true = _as_ids(labels_true, "true")
        pred = _as_ids(labels_pred, "predicted")
        if true.shape != pred.shape:
            raise PartkitError(f"true labels have shape {true.shape} but predicted labels {pred.shape}")
        true, pred = true.ravel(), pred.ravel()
        if true.size == 0:
            return self
        n_true, n_pred = _id_bound(true), _id_bound(pred)
        if n_true * n_pred > _MAX_CELLS:
            raise PartkitError(
                f"label ids up to {n_true - 1} (true) and {n_pred - 1} (predicted) need a {n_true}x{n_pred} table; "
                "relabel them to consecutive ids")
        counts = np.zeros(n_true * n_pred, np.int64)
        for start in range(0, true.size, _CHUNK):
            combined = true[start:start + _CHUNK].astype(np.intp)
            combined *= n_pred
            combined += pred[start:start + _CHUNK]
            counts += np.bincount(combined, minlength=n_true * n_pred)
        return self.add(counts.reshape(n_true, n_pred))

    def add(self, table) -> "Contingency":
        """Add another table (any shape) into this one."""
        table = np.asarray(table.table_ if isinstance(table, Contingency) else table, dtype=np.int64)
        rows, cols = max(self.table_.shape[0], table.shape[0]), max(self.table_.shape[1], table.shape[1])
        if (rows, cols) != self.table_.shape:
            grown = np.zeros((rows, cols), np.int64)
            grown[:self.table_.shape[0], :self.table_.shape[1]] = self.table_
            self.table_ = grown
        self.table_[:table.shape[0], :table.shape[1]] += table
        return self

    @property
    def total(self) -> int:
        return int(self.table_.sum())


def _table(labels_true, labels_pred, contingency) -> np.ndarray:
    if contingency is None:
        if labels_true is None or labels_pred is None:
            raise TypeError("give labels_true and labels_pred, or contingency=")
        contingency = Contingency().update(labels_true, labels_pred).table_
    table = np.asarray(contingency, dtype=np.int64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if table.size == 0:
        raise PartkitError("no label pairs to score (empty input)")
    return table


def _entropy(counts: np.ndarray) -> float:
    pi = counts[counts > 0].astype(np.float64)
    if pi.size == 1:
        return 0.0
    total = pi.sum()
    return float(-np.sum((pi / total) * (np.log(pi) - log(total))))


def nmi_score(labels_true=None, labels_pred=None, *, contingency=None) -> float:
    """Normalized mutual information, arithmetic normalisation: sklearn's default, to 1e-12.

    Give the two labelings, or a precomputed ``contingency`` table (true x predicted counts).

    Example:
        >>> round(nmi_score([0, 0, 1, 1], [0, 0, 1, 2]), 4)
        0.8
    """
    table = _table(labels_true, labels_pred, contingency)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0  # neither labeling splits the data: a perfect match, as in sklearn
    pi, pj = table.sum(1).astype(np.float64), table.sum(0).astype(np.float64)
    if pi.size == 1 or pj.size == 1:
        return 0.0
    nzx, nzy = np.nonzero(table)
    nz = table[nzx, nzy].astype(np.float64)
    total = float(table.sum())
    p = nz / total
    log_outer = -(np.log(pi[nzx]) + np.log(pj[nzy])) + 2 * log(total)
    mi = p * (np.log(nz) - log(total)) + p * log_outer
    mi = float(np.clip(np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi).sum(), 0.0, None))
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(pi), _entropy(pj)]))


def ari_score(labels_true=None, labels_pred=None, *, contingency=None) -> float:
    """Adjusted Rand index, identical to sklearn's (exact integer pair counts at any size).

    Example:
        >>> ari_score([0, 0, 1, 1], [1, 1, 0, 0])
        1.0
    """
    table = _table(labels_true, labels_pred, contingency)
    n = int(table.sum())
    squares = sum(int(v) * int(v) for v in table[table > 0])
    rows = sum(int(v) * int(v) for v in table.sum(1))
    cols = sum(int(v) * int(v) for v in table.sum(0))
    tp = squares - n
    fp = cols - squares
    fn = rows - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


# ---------------------------------------------------------------------------------------------
# Matching discovered clusters to ground-truth parts, and mIoU


def match_clusters(table, method: str = "majority", *, ignore_pred: Iterable[int] = ()) -> np.ndarray:
    """Map each predicted id (column of ``table``) to a true id (row), or -1 if unmapped.

    ``majority``: many-to-one, each cluster to the true id it overlaps most (ties: lowest id).
    ``hungarian``: one-to-one maximising total overlap (scipy ``linear_sum_assignment``).
    ``none``: ids are already true ids (identity). Columns in ``ignore_pred``, and for the
    fitted methods columns with no overlap with any row, are never mapped.

    Example:
        >>> match_clusters([[0, 5, 1], [0, 4, 0]], "majority").tolist()
        [-1, 0, 0]
    """
    table = np.asarray(table, dtype=np.int64)
    n_true, n_pred = table.shape
    mapping = np.full(n_pred, -1, dtype=np.int64)
    usable = table.sum(0) > 0
    usable[[i for i in ignore_pred if i < n_pred]] = False
    if method == "none":
        mapping = np.arange(n_pred, dtype=np.int64)
        mapping[[i for i in ignore_pred if i < n_pred]] = -1
    elif method == "majority":
        mapping[usable] = table[:, usable].argmax(0)
    elif method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows = np.flatnonzero(table.sum(1) > 0)
        cols = np.flatnonzero(usable)
        if rows.size and cols.size:
            r, c = linear_sum_assignment(table[np.ix_(rows, cols)], maximize=True)
            mapping[cols[c]] = rows[r]
    else:
        raise PartkitError(f"unknown matching {method!r}; choose majority, hungarian or none")
    return mapping


def confusion_iou(confusion, true_totals=None) -> np.ndarray:
    """Per-class IoU from a square confusion matrix (rows true, columns predicted); NaN where
    the class is neither true nor predicted. ``true_totals`` overrides the row sums (to count
    pixels whose prediction maps to no class as misses)."""
    conf = np.asarray(confusion, dtype=np.float64)
    inter = np.diag(conf)
    rows = conf.sum(1) if true_totals is None else np.asarray(true_totals, dtype=np.float64)
    union = rows + conf.sum(0) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def matched_iou(table, method: str = "majority", *, fit_table=None, ignore_true: Iterable[int] = (),
                ignore_pred: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """IoU of each true id after mapping predicted ids onto true ids with :func:`match_clusters`.

    The mapping is fitted on ``fit_table`` (default: ``table`` itself). Rows in ``ignore_true``
    are dropped from both tables (e.g. background for a foreground-only protocol); pixels of a
    cluster that maps to nothing are misses of their true part. Returns ``(iou, mapping)``;
    ``iou[t]`` is NaN for ids that are neither true nor predicted.

    Example:
        >>> iou, mapping = matched_iou([[4, 0, 0], [0, 3, 1]])
        >>> iou.tolist(), mapping.tolist()
        ([1.0, 1.0], [0, 1, 1])
    """
    table = np.array(table, dtype=np.int64)
    fit = table if fit_table is None else np.array(fit_table, dtype=np.int64)
    rows = max(table.shape[0], fit.shape[0])
    table = _pad(table, rows, max(table.shape[1], 1))
    fit = _pad(fit, rows, fit.shape[1])
    drop = [i for i in ignore_true if i < rows]
    table[drop] = 0
    fit[drop] = 0
    mapping = match_clusters(fit, method, ignore_pred=ignore_pred)
    if method == "none":
        mapping = match_clusters(table, method, ignore_pred=ignore_pred)
    mapping = np.concatenate([mapping, np.full(max(0, table.shape[1] - mapping.size), -1)])[:table.shape[1]]
    if mapping.max(initial=-1) >= rows:  # predicted ids that are no true id: parts never seen in truth
        rows = int(mapping.max()) + 1
        table = _pad(table, rows, table.shape[1])
    valid = mapping >= 0
    onehot = np.zeros((valid.sum(), rows), np.int64)
    onehot[np.arange(valid.sum()), mapping[valid]] = 1
    iou = confusion_iou(table[:, valid] @ onehot, true_totals=table.sum(1))
    iou[drop] = np.nan
    return iou, mapping


def match_to_parts(fit_table, method: str = "majority", *, n_pred: Optional[int] = None) -> np.ndarray:
    """Map predicted ids to ground-truth parts as PartDistillation's ``miou_matcher.py`` does.

    Row and column 0 are background: predicted 0 stays background and no cluster is ever mapped to
    it. ``majority``: each predicted id >= 1 goes to the part (row >= 1) it shares most pixels with
    in ``fit_table``, background pixels not counted; ties go to the lowest part id, and an id with
    no part pixels (all-zero column, or an id absent from ``fit_table``) goes to part 1, as the
    official argmax over an all-zero row picks the first part. ``hungarian`` (not in the official
    code): one-to-one over part pixels, unmatched ids become background. ``none``: identity.
    ``n_pred``: the number of predicted ids to map (default: the columns of ``fit_table``).

    Example:
        >>> match_to_parts([[9, 0, 9], [0, 3, 1], [0, 1, 2]]).tolist()  # id 2: 1 px of part 1, 2 of part 2
        [0, 1, 2]
    """
    fit = np.asarray(fit_table, dtype=np.int64)
    n_pred = fit.shape[1] if n_pred is None else n_pred
    if method == "none":
        return np.arange(n_pred, dtype=np.int64)
    fit = _pad(fit, max(fit.shape[0], 2), max(fit.shape[1], n_pred))[:, :n_pred]
    parts = fit[1:]
    mapping = np.zeros(n_pred, dtype=np.int64)
    if method == "majority":
        mapping[1:] = parts[:, 1:].argmax(0) + 1  # all-zero column: argmax 0, i.e. part 1
    elif method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        r, c = linear_sum_assignment(parts[:, 1:], maximize=True)
        keep = parts[r, c + 1] > 0
        mapping[c[keep] + 1] = r[keep] + 1
    else:
        raise PartkitError(f"unknown matching {method!r}; choose majority, hungarian or none")
    mapping[0] = 0
    return mapping


def part_confusion(table, mapping=None, size: Optional[int] = None) -> np.ndarray:
    """Square truth x predicted-part confusion matrix: column ``j`` sums the columns of ``table``
    (truth x predicted id) whose id maps to part ``j`` (``mapping``, identity by default; -1 and
    0 are background, column 0). ``size``: at least this many rows and columns."""
    table = np.asarray(table, dtype=np.int64)
    mapping = np.arange(table.shape[1]) if mapping is None else np.asarray(mapping, dtype=np.int64)
    mapping = np.concatenate([mapping, np.full(max(0, table.shape[1] - mapping.size), -1)])[:table.shape[1]]
    mapping = np.where(mapping < 0, 0, mapping)
    n = max(table.shape[0], int(mapping.max(initial=0)) + 1, size or 0, 1)
    onehot = np.zeros((table.shape[1], n), np.int64)
    onehot[np.arange(table.shape[1]), mapping] = 1
    out = np.zeros((n, n), np.int64)
    out[:table.shape[0]] = table @ onehot
    return out


def official_part_scores(confusion) -> dict:
    """PartDistillation's ``measure_mIOU`` on a truth x predicted confusion matrix with background
    as row and column 0 (the official code keeps background last and its matrix transposed; the
    numbers are the same). For each part ``c >= 1``, with ``tp`` = ``conf[c, c]``, ``gt`` = row sum
    (its pixels, predicted background included) and ``pred`` = column sum (predicted pixels, those
    on background included):

    - ``acc = tp / gt`` and ``iou = tp / (gt + pred - tp)`` where ``gt > 0`` (NaN elsewhere);
      ``iopred = tp / pred`` where ``pred > 0``;
    - ``miou`` = sum of ``iou`` over parts with ``gt > 0``, divided by the number of parts with
      ``gt + pred > 0``: a part predicted but absent from the truth adds a 0;
    - ``macc``, ``miopred``: means of ``acc`` (``gt > 0``) and ``iopred`` (``pred > 0``);
    - ``fwiou`` = sum of ``iou * gt / sum(gt)``; ``pacc`` = sum(tp) / sum(gt).

    Arrays are indexed by part id (index 0, background, is NaN); fractions, not percentages.

    Example:
        >>> conf = [[90, 0], [0, 10]]  # 10 part pixels, all found; 90 background pixels
        >>> official_part_scores(conf)["miou"], official_part_scores([[0, 90], [0, 10]])["miou"]
        (1.0, 0.1)
    """
    conf = np.asarray(confusion, dtype=np.float64)
    tp, gt, pred = np.diag(conf).copy(), conf.sum(1), conf.sum(0)
    tp[0] = gt[0] = pred[0] = 0  # background is not a part
    has_gt, has_pred, either = gt > 0, pred > 0, (gt + pred) > 0
    acc, iou, iopred = (np.full(conf.shape[0], np.nan) for _ in range(3))
    acc[has_gt] = tp[has_gt] / gt[has_gt]
    iou[has_gt] = tp[has_gt] / (gt + pred - tp)[has_gt]
    iopred[has_pred] = tp[has_pred] / pred[has_pred]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"iou": iou, "acc": acc, "iopred": iopred,
                "miou": float(np.sum(iou[has_gt]) / np.sum(either)),
                "macc": float(np.sum(acc[has_gt]) / np.sum(has_gt)),
                "miopred": float(np.sum(iopred[has_pred]) / np.sum(has_pred)),
                "fwiou": float(np.sum(iou[has_gt] * gt[has_gt] / gt.sum())),
                "pacc": float(tp.sum() / gt.sum())}


def _pad(table: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), np.int64)
    out[:table.shape[0], :table.shape[1]] = table[:rows, :cols]
    return out


# ---------------------------------------------------------------------------------------------
# Masks: IoU, average recall of proposals, COCO mask AP

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


def mask_iou(dt: Sequence[dict], gt: Sequence[dict], iscrowd: Optional[Sequence[int]] = None) -> np.ndarray:
    """IoU matrix (len(dt) x len(gt)) of compressed-RLE masks (:func:`partkit.rle.iou`)."""
    from . import rle

    return rle.iou(dt, gt, iscrowd)


def greedy_recall(iou, ks: Sequence[int], thresholds=COCO_IOU_THRESHOLDS) -> np.ndarray:
    """Ground-truth masks matched by the top-k proposals, for each k and IoU threshold.

    ``iou`` is (proposals sorted by descending score) x (ground-truth masks). Matching is
    COCO's: proposals in score order each take the unmatched ground truth of highest IoU at
    or above the threshold. Greedy matching never revisits a proposal, so the matches of the
    top k are a prefix of the matches of all. Returns an int array ``len(ks) x len(thresholds)``.
    """
    iou = np.asarray(iou, dtype=np.float64)
    thr = np.minimum(np.asarray(thresholds, dtype=np.float64), 1 - 1e-10)[:, None]
    n_dt, n_gt = iou.shape
    taken = np.zeros((thr.shape[0], n_gt), bool)
    matched_after = np.zeros((n_dt + 1, thr.shape[0]), np.int64)
    for d in range(n_dt):
        cand = np.where((iou[d][None, :] >= thr) & ~taken, iou[d][None, :], -1.0)
        has = cand.max(1, initial=-1.0) >= 0
        if has.any():
            best = n_gt - 1 - np.argmax(cand[:, ::-1], axis=1)  # last of equal maxima, as COCO
            taken[np.flatnonzero(has), best[has]] = True
        matched_after[d + 1] = taken.sum(1)
    return matched_after[np.minimum(np.asarray(ks), n_dt)]


class RecallAccumulator:
    """AR@k pooled over a dataset: matched ground truths / all ground truths, averaged over
    IoU thresholds 0.5:0.05:0.95.

    Example:
        >>> acc = RecallAccumulator(ks=(1, 2)).update([[0.9, 0.0], [0.0, 0.6]])
        >>> [round(v, 3) for v in acc.result().values()]
        [0.45, 0.6]
    """

    def __init__(self, ks: Sequence[int] = (1, 10, 50, 100, 200), thresholds=COCO_IOU_THRESHOLDS):
        self.ks = tuple(int(k) for k in ks)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.matched_ = np.zeros((len(self.ks), len(self.thresholds)), np.int64)
        self.n_gt_ = 0

    def update(self, iou) -> "RecallAccumulator":
        iou = np.asarray(iou, dtype=np.float64)
        self.matched_ += greedy_recall(iou, self.ks, self.thresholds)
        self.n_gt_ += iou.shape[1]
        return self

    def result(self) -> dict[int, float]:
        if self.n_gt_ == 0:
            raise PartkitError("no ground-truth masks to recall")
        return {k: float((self.matched_[i] / self.n_gt_).mean()) for i, k in enumerate(self.ks)}


def coco_dataset(images: Sequence[dict], detections: Sequence[dict], *,
                 class_agnostic: bool = True) -> tuple[dict, list[dict]]:
    """A COCO ground-truth dataset and COCO results from ``images`` and ``detections`` (as in
    :func:`coco_mask_ap`): what COCOeval scores, and what ``partkit export coco`` writes.

    An image's optional ``file_name`` is kept. With ``class_agnostic`` every category becomes 1,
    named ``part``; otherwise a category is named by its id.
    """
    from . import rle

    anns, cats = [], set()
    for img in images:
        for a in img["annotations"]:
            cat = 1 if class_agnostic else int(a["category_id"])
            cats.add(cat)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "segmentation": a["segmentation"], "area": rle.area(a["segmentation"]),
                         "bbox": rle.bbox(a["segmentation"]), "iscrowd": int(a.get("iscrowd", 0))})
    dets = [{"image_id": d["image_id"], "category_id": 1 if class_agnostic else int(d["category_id"]),
             "segmentation": d["segmentation"], "score": float(d["score"])} for d in detections]
    if class_agnostic:
        cats.add(1)
    dataset = {"images": [{"id": i["id"], "height": i["height"], "width": i["width"],
                           **({"file_name": i["file_name"]} if "file_name" in i else {})} for i in images],
               "annotations": anns,
               "categories": [{"id": c, "name": "part" if class_agnostic else str(c)} for c in sorted(cats)]}
    return dataset, dets


def coco_mask_ap(images: Sequence[dict], detections: Sequence[dict], *, class_agnostic: bool = True,
                 max_dets: int = 100) -> dict[str, float]:
    """COCO mask AP, AP50 and AP75 with ``pycocotools.cocoeval.COCOeval`` (its prints silenced).

    ``images``: ``{"id", "height", "width", "annotations": [{"segmentation": rle, "category_id",
    "iscrowd"}]}``; ``detections``: ``{"image_id", "segmentation", "score", "category_id"}``.
    With ``class_agnostic`` every category becomes 1. No detections at all scores 0.
    """
    from . import rle

    dataset, dets = coco_dataset(images, detections, class_agnostic=class_agnostic)
    if not any(a["iscrowd"] == 0 for a in dataset["annotations"]):
        raise PartkitError("no ground-truth masks to score")
    if not detections:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    stats = rle.coco_evaluate(dataset, dets, max_dets)
    return {"ap": max(stats[0], 0.0), "ap50": max(stats[1], 0.0), "ap75": max(stats[2], 0.0)}


# ---------------------------------------------------------------------------------------------
# Retrieval


def _ap_rows(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Average precision of each row, with sklearn's handling of tied scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1)
    y = np.take_along_axis(positives, order, 1)
    n = s.shape[1]
    tp = np.cumsum(y, axis=1)
    # Items with tied scores share one precision: the one at the end of their tie group.
    is_end = np.ones_like(s, dtype=bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    end = np.where(is_end, np.arange(n), n)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    precision = np.take_along_axis(tp, end, 1) / (end + 1.0)
    n_pos = y.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (y * precision).sum(1) / n_pos, np.nan)


def average_precision(y_true, y_score) -> float:
    """Average precision of one ranking, equal to ``sklearn.metrics.average_precision_score``.

    Example:
        >>> round(average_precision([1, 0, 1], [0.9, 0.8, 0.1]), 4)
        0.8333
    """
    return float(_ap_rows(np.asarray(y_score, np.float64)[None], np.asarray(y_true, bool)[None])[0])


def retrieval_ap(features, labels, *, exclude_self: bool = False) -> np.ndarray:
    """Each row of ``features`` queries all rows by cosine similarity; AP per query with
    positives = rows of the same label. The query itself is ranked (first, a positive) unless
    ``exclude_self``. Queries with no positive get NaN.

    Example:
        >>> retrieval_ap([[1, 0], [1, 0.1], [0, 1]], ["a", "a", "b"]).tolist()
        [1.0, 1.0, 1.0]
    """
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    _, ids = np.unique(np.asarray(labels), return_inverse=True)
    n = len(ids)
    out = np.empty(n)
    step = max(1, (1 << 23) // max(n, 1))
    for start in range(0, n, step):
        rows = np.arange(start, min(n, start + step))
        sims = x[rows] @ x.T
        pos = ids[rows][:, None] == ids[None, :]
        if exclude_self:
            sims[np.arange(rows.size), rows] = -np.inf  # ranked last, as a negative: no effect on AP
            pos[np.arange(rows.size), rows] = False
        out[rows] = _ap_rows(sims, pos)
    return out


# ---------------------------------------------------------------------------------------------
# 3D shapes


def shape_miou(table, parts: Sequence[int], mapping: Optional[np.ndarray] = None) -> float:
    """Mean IoU over a category's ``parts`` for one shape (ShapeNetPart convention: a part
    absent from both prediction and truth has IoU 1).

    ``table`` is the shape's true x predicted point counts; ``mapping[p]`` is the part that
    predicted id ``p`` stands for (-1: none), identity by default.

    Example:
        >>> from partkit.metrics import Contingency
        >>> t = Contingency().update([6, 6, 7, 7], [6, 6, 6, 7]).table_
        >>> round(shape_miou(t, parts=[6, 7, 8]), 4)  # IoUs 2/3, 1/2 and 1 (part 8 absent)
        0.7222
    """
    table = np.asarray(table, dtype=np.int64)
    n_pred = table.shape[1]
    mapping = np.arange(n_pred) if mapping is None else np.asarray(mapping)[:n_pred]
    mapping = np.concatenate([mapping, np.full(n_pred - mapping.size, -1)])
    parts = np.asarray(list(parts), dtype=np.int64)
    true_counts = np.zeros(parts.size)
    inside = parts < table.shape[0]
    true_counts[inside] = table.sum(1)[parts[inside]]
    col = table.sum(0)
    ious = np.empty(parts.size)
    for i, p in enumerate(parts):
        cols = mapping == p
        pred = col[cols].sum()
        inter = table[p, cols].sum() if p < table.shape[0] else 0
        union = true_counts[i] + pred - inter
        ious[i] = 1.0 if union == 0 else inter / union
    return float(ious.mean()) if parts.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Linear probes


def fit_linear_probe(x, y, *, sample_weight=None, c: float = 1.0, seed: int = 0, max_iter: int = 500,
                     tol: float = 1e-4):
    """A linear classifier on frozen features (standardised, multinomial logistic regression).

    Deterministic (lbfgs). Returns a fitted sklearn pipeline with ``predict``; a fit that hits
    ``max_iter`` is reported on stderr.

    Example:
        >>> fit_linear_probe([[0.0], [0.1], [1.0], [1.1]], [0, 0, 1, 1]).predict([[0.9]]).tolist()
        [1]
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ._log import log

    y = np.asarray(y)
    if np.unique(y).size < 2:
        raise PartkitError("the probe's training data has a single class; give more training images (--probe-train)")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, tol=tol, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(np.asarray(x, np.float32), y, logisticregression__sample_weight=sample_weight)
    if np.max(model[-1].n_iter_) >= max_iter:
        log(f"probe: logistic regression stopped at max_iter={max_iter} before converging (tol={tol})")
    return model


# ---------------------------------------------------------------------------------------------
# Landmark regression from part centroids


def part_centroids(labels, ids: Optional[Sequence[int]] = None) -> dict[int, tuple[float, float]]:
    """Centroid ``(x, y)`` of each id's pixels in a label map, in 1-based pixel indices (the pixel in
    column 0 is at x = 1), as the landmark-regression code of Huang & Li and Choudhury et al. has it.

    ``ids``: the ids to measure (default: every id present). An id absent from the map gets
    ``(0.0, 0.0)``: their ``sum / (count + 1e-8)`` of an empty part.

    Example:
        >>> part_centroids([[1, 1, 0], [1, 1, 0]], ids=[1, 2])
        {1: (1.5, 1.5), 2: (0.0, 0.0)}
    """
    a = np.asarray(labels)
    flat = a.ravel().astype(np.intp)
    n = int(flat.max(initial=-1)) + 1
    rows, cols = np.indices(a.shape)
    count = np.bincount(flat, minlength=n)
    sx = np.bincount(flat, weights=cols.ravel() + 1.0, minlength=n)
    sy = np.bincount(flat, weights=rows.ravel() + 1.0, minlength=n)
    ids = np.flatnonzero(count) if ids is None else ids
    return {int(i): ((float(sx[i] / count[i]), float(sy[i] / count[i])) if 0 <= i < n and count[i] else (0.0, 0.0))
            for i in ids}


def _standard_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of ``sklearn.preprocessing.StandardScaler`` (population std; 1 for a constant column)."""
    n = x.shape[0]
    mean = x.mean(0)
    var = x.var(0)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant] = 1.0
    return mean, scale


def landmark_regression(train_x, train_y, test_x) -> np.ndarray:
    """Regress landmark coordinates from part centroids: standardise both sides on the training rows,
    fit least squares without intercept (the minimum-norm solution), predict the test rows and undo
    the landmark standardisation; equal to ``StandardScaler`` + ``LinearRegression(fit_intercept=False)``,
    the regressor of Huang & Li's and Choudhury et al.'s evaluation.

    Example:
        >>> x = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
        >>> y = [[3.0, -1.0], [2.0, 2.0], [7.0, 2.0]]  # (x0 + 2 x1 + 1, 2 x0 - x1): affine, fitted exactly
        >>> np.round(landmark_regression(x, y, [[3.0, 1.0]]), 6).tolist()
        [[6.0, 5.0]]
    """
    x, y = np.asarray(train_x, np.float64), np.asarray(train_y, np.float64)
    tx = np.asarray(test_x, np.float64)
    mx, sx = _standard_scale(x)
    my, sy = _standard_scale(y)
    w = np.linalg.lstsq((x - mx) / sx, (y - my) / sy, rcond=None)[0]
    return ((tx - mx) / sx) @ w * sy + my
