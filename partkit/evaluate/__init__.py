"""Score shards of predictions against ground truth: the library behind ``partkit eval``.

One pass over the samples feeds every requested metric; each metric is an accumulator that
decodes what it needs from a shared :class:`SampleView` (so a field is decoded once) and
keeps only what the metric pools (contingency tables, masks, pooled features). Scores are
reported x100, as in the papers.

Example:
    >>> report = evaluate(["preds.tar"], ["nmi", "ari", "miou"], region="fg")  # doctest: +SKIP
    >>> report["metrics"]["nmi"]["value"]  # doctest: +SKIP
    61.2
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from .. import metrics as M
from .._log import log, progress
from .._version import __version__
from ..errors import BadSample, PartkitError, missing_field
from ..grid import grid_to_image, image_to_cell_index
from ..io import decode_image, decode_json, decode_label_map, decode_npy, iter_samples
from ..show import VIEWS, Pictures, view_paths

__all__ = ["METRICS", "EvalOptions", "SampleView", "evaluate", "render", "parse_keypoints"]

METRICS = ("nmi", "ari", "miou", "ar", "mask-ap", "retrieval", "miou-3d", "probe")
_GEOMETRY = ("grid", "stride", "image_size", "resized")


@dataclass
class EvalOptions:
    """Every option of ``partkit eval``; see docs/_readme_eval.md for the protocols."""

    pred: Optional[str] = None  # predicted field; default parts.png (2D) or pred_parts.npy (miou-3d)
    gt_field: Optional[str] = None  # default gt_parts.png (2D) or gt_parts.npy (miou-3d)
    region: str = "fg"  # fg: ground-truth foreground pixels only; full: background is a label too
    at: str = "pixels"  # nmi/ari at every pixel, or at visible ground-truth keypoints
    match: str = "majority"  # majority | hungarian | none (miou, miou-3d)
    match_on: Sequence[str] = ()  # shards to fit the cluster->part matching on (default: the scored data)
    proposals: str = "proposals.json"
    gt: str = "parts"  # ar/mask-ap ground truth: parts (gt_parts.png, one mask per id) or objects
    ks: Sequence[int] = (1, 10, 50, 100, 200)
    max_dets: int = 100
    feat: str = "feat.npy"
    patch: int = 3  # retrieval: pool a patch x patch window of feature cells around each keypoint
    exclude_self: bool = False
    kpt_min_visibility: int = 1  # keypoints with v >= this are used (COCO: 1 occluded, 2 visible)
    category_parts: Optional[dict] = None  # miou-3d: {category: [part ids]}; default: ids seen in the data
    probe_train: int = 10  # the first N images train the probes, the rest score them
    probe_target: str = "part"  # part (label of each feature cell) or category (image category)
    probe_c: float = 1.0
    seed: int = 0
    skip_bad: bool = False
    viz_dir: Optional[str] = None
    viz_max: int = 16

    def validate(self, metrics: Sequence[str]) -> list[str]:
        """Check every option before any work; returns the metric names, deduplicated."""
        if not metrics:
            raise PartkitError(f"no metric given; choose from {', '.join(METRICS)}")
        names = list(dict.fromkeys(metrics))
        for name in names:
            if name not in METRICS:
                raise PartkitError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        _choice("--region", self.region, ("fg", "full"))
        _choice("--at", self.at, ("pixels", "keypoints"))
        _choice("--match", self.match, ("majority", "hungarian", "none"))
        _choice("--gt", self.gt, ("parts", "objects"))
        _choice("--probe-target", self.probe_target, ("part", "category"))
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise PartkitError(f"--ks must be positive integers, got {list(self.ks)}")
        for opt, value in (("--max-dets", self.max_dets), ("--patch", self.patch), ("--probe-train", self.probe_train),
                           ("--viz-max", self.viz_max)):
            if value < 1:
                raise PartkitError(f"{opt} must be at least 1, got {value}")
        if self.probe_c <= 0:
            raise PartkitError(f"--probe-c must be positive, got {self.probe_c}")
        if self.match_on and not {"miou", "miou-3d"} & set(names):
            raise PartkitError("--match-on only applies to miou and miou-3d; add one of them or drop --match-on")
        if self.match_on and self.match == "none":
            raise PartkitError("--match none uses predicted ids as they are; there is nothing to fit on --match-on")
        return names


def _choice(opt: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PartkitError(f"{opt} must be one of {', '.join(choices)}, got {value!r}")


def _companion(field_name: str) -> str:
    """The metadata field that travels with a field: parts.png -> parts.json."""
    return field_name.rsplit(".", 1)[0] + ".json"


def _nearest_resize(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def parse_keypoints(doc, key: str = "?") -> tuple[list[np.ndarray], list[str]]:
    """Keypoints of ``gt_kpts.json`` as one ``K x 3`` array (x, y, v) per object, plus names.

    Each object is a list of ``[x, y, v]`` triplets or COCO's flat ``[x1, y1, v1, x2, ...]``.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keypoints"), list):
        raise BadSample(key, "'gt_kpts.json' must be an object with a 'keypoints' list (one entry per object)")
    objects = []
    for obj in doc["keypoints"]:
        try:
            arr = np.asarray(obj, dtype=np.float64).reshape(-1, 3)
        except (ValueError, TypeError):
            raise BadSample(key, "'gt_kpts.json' keypoints must be [x, y, v] triplets per object") from None
        objects.append(arr)
    names = doc.get("names")
    k = max((len(o) for o in objects), default=0)
    if names is None:
        names = [str(i) for i in range(k)]
    if any(len(o) != len(names) for o in objects):
        raise BadSample(key, f"'gt_kpts.json' has {len(names)} keypoint names but an object with a different count")
    return objects, [str(n) for n in names]


class SampleView:
    """Lazily decoded, validated fields of one sample, shared by every metric."""

    def __init__(self, sample: dict, options: EvalOptions, index: int = 0):
        self.sample, self.o, self.index = sample, options, index
        self.key = sample["__key__"]

    def has(self, field_name: str) -> bool:
        return field_name in self.sample

    @property
    def gt_field(self) -> str:
        return self.o.gt_field or "gt_parts.png"

    @property
    def pred_field(self) -> str:
        return self.o.pred or "parts.png"

    @cached_property
    def meta(self) -> dict:
        return decode_json(self.sample, "json") if self.has("json") else {}

    @cached_property
    def category(self) -> Optional[str]:
        cat = self.meta.get("category") if isinstance(self.meta, dict) else None
        return None if cat is None else str(cat)

    @cached_property
    def gt(self) -> np.ndarray:
        gt = decode_label_map(self.sample, self.gt_field)
        meta = self.meta if isinstance(self.meta, dict) else {}
        size = (meta.get("height"), meta.get("width"))
        if None not in size and tuple(gt.shape) != size:
            raise BadSample(self.key, f"'{self.gt_field}' is {gt.shape[1]}x{gt.shape[0]} but the image is "
                                      f"{size[1]}x{size[0]} (json); ground truth must be at image size")
        return gt

    @cached_property
    def ignore_id(self) -> int:
        return 65535 if self.gt.dtype == np.uint16 else 255

    @cached_property
    def valid(self) -> Optional[np.ndarray]:
        """Mask of scored pixels, or None when no pixel is 'ignore'."""
        if self.gt.max(initial=0) < self.ignore_id:
            return None
        return self.gt != self.ignore_id

    @cached_property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image: the ground-truth map's, else the metadata's, else the image's."""
        if self.has(self.gt_field) and self.gt_field.endswith(".png"):
            return tuple(self.gt.shape)
        if isinstance(self.meta, dict) and "height" in self.meta and "width" in self.meta:
            return int(self.meta["height"]), int(self.meta["width"])
        return tuple(self.image.shape[:2])

    @cached_property
    def image(self) -> np.ndarray:
        return decode_image(self.sample)

    @cached_property
    def pred(self) -> np.ndarray:
        """The predicted label map at image size (see the resampling rules in the README)."""
        pred = decode_label_map(self.sample, self.pred_field)
        height, width = self.shape
        if pred.shape == (height, width):
            return pred
        meta_field = _companion(self.pred_field)
        meta = decode_json(self.sample, meta_field) if self.has(meta_field) else {}
        if isinstance(meta, dict) and meta.get("resolution") == "grid":
            if all(k in meta for k in _GEOMETRY):
                if tuple(meta["grid"]) != pred.shape:
                    raise BadSample(self.key, f"'{self.pred_field}' is {pred.shape[1]}x{pred.shape[0]} but "
                                              f"'{meta_field}' says the grid is {meta['grid'][1]}x{meta['grid'][0]}")
                return grid_to_image(pred, meta, height, width)
            return _nearest_resize(pred, height, width)
        raise BadSample(self.key, f"'{self.pred_field}' is {pred.shape[1]}x{pred.shape[0]} but the image is "
                                  f"{width}x{height}; a prediction must be at image size, or at grid size with "
                                  f"\"resolution\": \"grid\" in '{meta_field}'")

    @cached_property
    def keypoints(self) -> tuple[list[np.ndarray], list[str]]:
        return parse_keypoints(decode_json(self.sample, "gt_kpts.json"), self.key)

    def visible_keypoints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, keypoint index) of the keypoints with v >= kpt_min_visibility, as integer pixels."""
        objects, _ = self.keypoints
        pts = [np.column_stack([o, np.arange(len(o))]) for o in objects]
        pts = np.concatenate(pts) if pts else np.zeros((0, 4))
        pts = pts[pts[:, 2] >= self.o.kpt_min_visibility]
        height, width = self.shape
        x, y = pts[:, 0], pts[:, 1]
        outside = (x < 0) | (y < 0) | (x > width) | (y > height)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise BadSample(self.key, f"keypoint {int(pts[i, 3])} at ({x[i]:g}, {y[i]:g}) lies outside the "
                                      f"{width}x{height} image")
        xi = np.minimum(np.floor(x).astype(np.int64), width - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), height - 1)
        return xi, yi, pts[:, 3].astype(np.int64)

    @cached_property
    def features(self) -> tuple[np.ndarray, dict]:
        """``feat.npy`` as float32 C x h x w, and its geometry from ``feat.json``."""
        feat = decode_npy(self.sample, self.o.feat)
        meta_field = _companion(self.o.feat)
        meta = decode_json(self.sample, meta_field) if self.has(meta_field) else None
        if meta is None:
            raise missing_field(self.key, meta_field)
        if feat.ndim != 3 or list(feat.shape[1:]) != list(meta.get("grid", [])):
            raise BadSample(self.key, f"'{self.o.feat}' has shape {feat.shape} but '{meta_field}' says grid "
                                      f"{meta.get('grid')}; expected C x h x w")
        return feat.astype(np.float32), meta

    def npy_labels(self, field_name: str) -> np.ndarray:
        arr = decode_npy(self.sample, field_name)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise BadSample(self.key, f"'{field_name}' must be a 1-D integer array (one id per point), got "
                                      f"{arr.dtype} {arr.shape}")
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise BadSample(self.key, f"'{field_name}' has negative id {int(arr.min())}; ids must be >= 0")
        return arr


# ---------------------------------------------------------------------------------------------
# Accumulators: prepare(view) decodes and validates (may raise BadSample); commit(payload)
# folds it in and cannot fail, so a bad sample never leaves a metric half-updated.


class _PixelTables:
    """GT part x predicted id pixel counts, per object category (None when uncategorised).

    ``optional``: samples without the ground-truth map are passed over (pictures only).
    """

    def __init__(self, optional: bool = False):
        self.by_class: dict[Optional[str], M.Contingency] = {}
        self.optional = optional

    def prepare(self, v: SampleView):
        if self.optional and not v.has(v.gt_field):
            return None
        gt, pred = v.gt, v.pred
        if v.valid is not None:
            gt, pred = gt[v.valid], pred[v.valid]
        return v.category, M.Contingency().update(gt, pred)

    def commit(self, payload) -> None:
        if payload is None:
            return
        cat, table = payload
        self.by_class.setdefault(cat, M.Contingency()).add(table)

    def pooled(self) -> np.ndarray:
        total = M.Contingency()
        for table in self.by_class.values():
            total.add(table)
        return total.table_

    @property
    def has_classes(self) -> bool:
        return any(c is not None for c in self.by_class)


class _KeypointTable:
    def __init__(self):
        self.table = M.Contingency()

    def prepare(self, v: SampleView):
        x, y, kpt = v.visible_keypoints()
        return M.Contingency().update(kpt, v.pred[y, x])

    def commit(self, payload) -> None:
        self.table.add(payload)


def _region_rows(table: np.ndarray, region: str) -> np.ndarray:
    if region == "fg" and table.shape[0]:
        table = table.copy()
        table[0] = 0
    return table


def _pct(x: float) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x) * 100


def _clustering_results(names, table: np.ndarray, o: EvalOptions) -> dict:
    at_kpts = o.at == "keypoints"
    if not at_kpts:
        table = _region_rows(table, o.region)
    total = int(table.sum())
    if total == 0:
        what = "visible keypoints" if at_kpts else ("ground-truth foreground pixels" if o.region == "fg" else "pixels")
        hint = "" if at_kpts or o.region == "full" else "; use --region full to score the background too"
        raise PartkitError(f"no {what} to score in the input{hint}")
    info = {"at": o.at, "pairs": total, "true_labels": int((table.sum(1) > 0).sum()),
            "pred_labels": int((table.sum(0) > 0).sum())}
    if not at_kpts:
        info["region"] = o.region
        if o.region == "fg" and table.shape[1]:
            info["pred_background_in_fg"] = _pct(table[:, 0].sum() / total)
    score = {"nmi": M.nmi_score, "ari": M.ari_score}
    return {name: {"value": _pct(score[name](contingency=table)), **info} for name in names}


def _miou_result(tables: _PixelTables, fit: Optional[_PixelTables], o: EvalOptions) -> dict:
    ignore = (0,) if o.region == "fg" else ()

    def score(table, fit_table, where=""):
        if _region_rows(table, o.region).sum() == 0:
            raise PartkitError(f"no {'ground-truth foreground ' if o.region == 'fg' else ''}pixels to score for "
                               f"miou{where}")
        iou, mapping = M.matched_iou(table, o.match, fit_table=fit_table, ignore_true=ignore, ignore_pred=ignore)
        return iou, mapping

    pooled = tables.pooled()
    fit_pooled = None if fit is None else fit.pooled()
    iou, mapping = score(pooled, fit_pooled)
    present = np.flatnonzero(~np.isnan(iou))
    seen = np.zeros(mapping.size, bool)  # clusters that occur (uint8 tables have 256 columns)
    for table in (pooled, fit_pooled):
        if table is not None:
            seen[:table.shape[1]] |= table.sum(0)[:mapping.size] > 0
    out = {"value": _pct(np.nanmean(iou)), "iou": {str(i): _pct(iou[i]) for i in present},
           "mapping": {str(c): int(m) for c, m in enumerate(mapping) if m >= 0 and seen[c]},
           "region": o.region, "match": o.match, "fitted_on": "match-on shards" if fit else "scored data"}
    if tables.has_classes:
        per_class, class_means, pairs = {}, [], []
        for cat in sorted(tables.by_class, key=lambda c: (c is None, str(c))):
            fit_table = None
            if fit is not None:
                if cat not in fit.by_class:
                    raise PartkitError(f"object class {cat!r} has no samples in the --match-on shards to fit on")
                fit_table = fit.by_class[cat].table_
            c_iou, _ = score(tables.by_class[cat].table_, fit_table, f" in object class {cat!r}")
            ids = np.flatnonzero(~np.isnan(c_iou))
            pairs.extend(c_iou[ids])
            class_means.append(np.nanmean(c_iou))
            per_class["(none)" if cat is None else cat] = {"miou": _pct(np.nanmean(c_iou)),
                                                          "iou": {str(i): _pct(c_iou[i]) for i in ids}}
        out["c_miou"] = _pct(np.mean(class_means))
        out["a_miou"] = _pct(np.mean(pairs))
        out["per_class"] = per_class
    return out


class _Masks:
    """Ground-truth masks and proposals per image, for AR@k (streamed) and COCO mask AP (kept)."""

    def __init__(self, o: EvalOptions, recall: bool, ap: bool):
        self.o, self.want_recall, self.want_ap = o, recall, ap
        self.recall = M.RecallAccumulator(o.ks)
        self.images: list[dict] = []
        self.dets: list[dict] = []
        self.with_category = set()  # whether proposals carried category_id, per sample

    def _gt_masks(self, v: SampleView) -> list[dict]:
        height, width = v.shape
        if self.o.gt == "objects":
            objs = decode_json(v.sample, "gt_objects.json")
            objs = objs.get("objects", []) if isinstance(objs, dict) else None
            if not isinstance(objs, list):
                raise BadSample(v.key, "'gt_objects.json' must be an object with an 'objects' list")
            out = []
            for obj in objs:
                rle = _rle(obj.get("segmentation"), v.key, "gt_objects.json", height, width)
                out.append({"segmentation": rle, "category_id": int(obj.get("category_id", 1)),
                            "iscrowd": int(obj.get("iscrowd", 0))})
            return out
        gt = v.gt
        counts = np.bincount(gt.ravel())
        ids = [i for i in np.flatnonzero(counts) if i not in (0, v.ignore_id)]
        out = [{"segmentation": _encode(gt == i), "category_id": int(i), "iscrowd": 0} for i in ids]
        if v.valid is not None:
            # Void pixels become a crowd region: COCOeval ignores detections that fall on it.
            out.append({"segmentation": _encode(~v.valid), "category_id": None, "iscrowd": 1})
        return out

    def prepare(self, v: SampleView):
        height, width = v.shape
        doc = decode_json(v.sample, self.o.proposals)
        props = doc.get("proposals") if isinstance(doc, dict) else doc
        if not isinstance(props, list):
            raise BadSample(v.key, f"'{self.o.proposals}' must be a list of proposals or {{\"proposals\": [...]}}")
        parsed = []
        for i, p in enumerate(props):
            if not isinstance(p, dict) or not isinstance(p.get("score"), (int, float)):
                raise BadSample(v.key, f"proposal {i} in '{self.o.proposals}' needs a numeric 'score'")
            parsed.append({"segmentation": _rle(p.get("segmentation"), v.key, self.o.proposals, height, width),
                           "score": float(p["score"]), "category_id": p.get("category_id")})
        has_cat = {p["category_id"] is not None for p in parsed}
        if len(has_cat) > 1:
            raise BadSample(v.key, f"some proposals in '{self.o.proposals}' have a category_id and some do not")
        parsed.sort(key=lambda p: -p["score"])  # stable: equal scores keep file order
        gts = self._gt_masks(v)
        iou = None
        if self.want_recall:
            real = [g["segmentation"] for g in gts if not g["iscrowd"]]
            iou = M.mask_iou([p["segmentation"] for p in parsed[:max(self.o.ks)]], real)
        return v.index, height, width, parsed, gts, iou, has_cat

    def commit(self, payload) -> None:
        index, height, width, parsed, gts, iou, has_cat = payload
        if self.want_recall:
            self.recall.update(iou)
        if self.want_ap:
            self.with_category |= has_cat
            self.images.append({"id": index + 1, "height": height, "width": width, "annotations": gts})
            self.dets.extend({"image_id": index + 1, **p} for p in parsed)

    def results(self, names) -> dict:
        out = {}
        if "ar" in names:
            ar = self.recall.result()
            out["ar"] = {"value": _pct(ar[max(self.o.ks)]), **{f"ar@{k}": _pct(v) for k, v in ar.items()},
                         "gt_masks": self.recall.n_gt_, "gt": self.o.gt}
        if "mask-ap" in names:
            agnostic = True not in self.with_category
            if not agnostic and self.o.gt == "parts":
                log("mask-ap: proposals carry category_id; comparing it with the ground-truth part ids")
            images = self.images
            if not agnostic:
                # A crowd (void) region must carry a category: give each image's one to all its categories.
                images = [dict(img, annotations=_expand_crowd(img["annotations"])) for img in images]
            ap = M.coco_mask_ap(images, self.dets, class_agnostic=agnostic, max_dets=self.o.max_dets)
            out["mask-ap"] = {"value": _pct(ap["ap"]), "ap50": _pct(ap["ap50"]), "ap75": _pct(ap["ap75"]),
                              "class_agnostic": agnostic, "max_dets": self.o.max_dets, "gt": self.o.gt,
                              "detections": len(self.dets)}
        return out


def _expand_crowd(anns: list[dict]) -> list[dict]:
    cats = sorted({a["category_id"] for a in anns if not a["iscrowd"]})
    out = [a for a in anns if not a["iscrowd"] or a["category_id"] is not None]
    for a in anns:
        if a["iscrowd"] and a["category_id"] is None:
            out.extend(dict(a, category_id=c) for c in cats)
    return out


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _rle(seg, key: str, field_name: str, height: int, width: int) -> dict:
    """A compressed RLE of the image's size from a COCO segmentation (compressed or not)."""
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise BadSample(key, f"'{field_name}' masks must be COCO RLE {{\"size\": [h, w], \"counts\": ...}}")
    if [int(s) for s in seg["size"]] != [height, width]:
        raise BadSample(key, f"a mask in '{field_name}' is {seg['size'][1]}x{seg['size'][0]} but the image is "
                             f"{width}x{height}")
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


class _Retrieval:
    def __init__(self, o: EvalOptions):
        self.o = o
        self.features: list[np.ndarray] = []
        self.names: list[str] = []

    def prepare(self, v: SampleView):
        feat, meta = v.features
        objects, names = v.keypoints
        x, y, kpt = v.visible_keypoints()
        # Keypoints are in image pixels; the cell covering a pixel comes from feat.json's geometry.
        height, width = v.shape
        rows, cols = image_to_cell_index(meta, height, width)
        gh, gw = feat.shape[1:]
        lo, hi = (self.o.patch - 1) // 2, self.o.patch // 2 + 1
        pooled = []
        for r, c in zip(rows[y], cols[x]):
            window = feat[:, max(r - lo, 0):min(r + hi, gh), max(c - lo, 0):min(c + hi, gw)]
            pooled.append(window.reshape(feat.shape[0], -1).mean(1))
        if self.features and pooled and pooled[0].shape != self.features[0].shape:
            raise BadSample(v.key, f"'{self.o.feat}' has {pooled[0].shape[0]} channels but earlier samples "
                                   f"{self.features[0].shape[0]}; score one backbone at a time")
        return pooled, [names[k] for k in kpt]

    def commit(self, payload) -> None:
        pooled, names = payload
        self.features.extend(pooled)
        self.names.extend(names)

    def result(self) -> dict:
        if len(self.features) < 2:
            raise PartkitError("retrieval needs at least 2 visible keypoints in the input")
        ap = M.retrieval_ap(np.stack(self.features), self.names, exclude_self=self.o.exclude_self)
        names = np.asarray(self.names)
        scored = ~np.isnan(ap)
        per_part = {n: ap[(names == n) & scored].mean() for n in sorted(set(self.names))
                    if ((names == n) & scored).any()}
        return {"value": _pct(ap[scored].mean()), "map": _pct(np.mean(list(per_part.values()))),
                "per_part": {n: _pct(v) for n, v in per_part.items()}, "queries": int(scored.sum()), "skipped_queries": int((~scored).sum()),
                "exclude_self": self.o.exclude_self, "patch": self.o.patch}


class _Shapes:
    """Per-shape point contingency (kept sparse) and per-category pooled tables for matching."""

    def __init__(self, o: EvalOptions):
        self.o = o
        self.shapes: list[tuple[Optional[str], np.ndarray, np.ndarray, np.ndarray]] = []
        self.by_class: dict[Optional[str], M.Contingency] = {}

    def prepare(self, v: SampleView):
        gt = v.npy_labels(self.o.gt_field or "gt_parts.npy")
        pred = v.npy_labels(self.o.pred or "pred_parts.npy")
        if gt.shape != pred.shape:
            raise BadSample(v.key, f"'{self.o.pred or 'pred_parts.npy'}' has {pred.size} points but "
                                   f"'{self.o.gt_field or 'gt_parts.npy'}' {gt.size}")
        table = M.Contingency().update(gt, pred).table_
        t, p = np.nonzero(table)
        return v.category, t, p, table[t, p]

    def commit(self, payload) -> None:
        cat, t, p, n = payload
        self.shapes.append(payload)
        self.by_class.setdefault(cat, M.Contingency()).add(_dense(t, p, n))

    def result(self, fit: Optional["_Shapes"]) -> dict:
        if not self.shapes:
            raise PartkitError("no shapes to score")
        parts_of, mappings = {}, {}
        for cat, table in self.by_class.items():
            given = (self.o.category_parts or {}).get("(none)" if cat is None else cat)
            parts_of[cat] = sorted(int(i) for i in given) if given is not None else \
                np.flatnonzero(table.table_.sum(1)).tolist()
            fit_table = table.table_
            if fit is not None:
                if cat not in fit.by_class:
                    raise PartkitError(f"category {cat!r} has no shapes in the --match-on shards to fit on")
                fit_table = fit.by_class[cat].table_
            mappings[cat] = M.match_clusters(fit_table, self.o.match)
        per_shape: dict[Optional[str], list[float]] = {}
        for cat, t, p, n in self.shapes:
            per_shape.setdefault(cat, []).append(M.shape_miou(_dense(t, p, n), parts_of[cat], mappings[cat]))
        per_class = {("(none)" if c is None else c): float(np.mean(v)) for c, v in sorted(
            per_shape.items(), key=lambda kv: (kv[0] is None, str(kv[0])))}
        all_shapes = [x for v in per_shape.values() for x in v]
        return {"value": _pct(np.mean(all_shapes)), "class_miou": _pct(np.mean(list(per_class.values()))),
                "per_class": {c: _pct(v) for c, v in per_class.items()}, "shapes": len(all_shapes),
                "match": self.o.match, "parts": {("(none)" if c is None else c): p for c, p in parts_of.items()}}


def _dense(t, p, n) -> np.ndarray:
    out = np.zeros((int(t.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1), np.int64)
    out[t, p] = n
    return out


class _Probe:
    """Linear probes on frozen features: the first ``probe_train`` images train, the rest score."""

    def __init__(self, o: EvalOptions):
        self.o = o
        self.train: list[tuple] = []
        self.seg = self.cls = None
        self.seg_table = M.Contingency()
        self.cls_true: list[np.ndarray] = []
        self.cls_pred: list[np.ndarray] = []
        self.channels: Optional[int] = None

    def prepare(self, v: SampleView):
        feat, meta = v.features
        if self.channels is not None and feat.shape[0] != self.channels:
            raise BadSample(v.key, f"'{self.o.feat}' has {feat.shape[0]} channels but earlier samples "
                                   f"{self.channels}; probe one backbone at a time")
        x = feat.reshape(feat.shape[0], -1).T  # cells x C
        if self.o.probe_target == "category":
            if v.category is None:
                raise BadSample(v.key, "has no 'category' in its 'json'; --probe-target category needs one per image")
            target = v.category
        else:
            target = None
        gt = v.gt
        rows, cols = image_to_cell_index(meta, *gt.shape)
        cell = rows[:, None] * feat.shape[2] + cols[None, :]
        keep = v.valid if v.valid is not None else np.ones(gt.shape, bool)
        labels = gt[keep].astype(np.int64)
        cell = cell[keep]
        k = int(labels.max(initial=0)) + 1
        hist = np.bincount(cell * k + labels, minlength=x.shape[0] * k).reshape(x.shape[0], k)
        return feat.shape[0], x, hist, target, (gt, v.valid, meta)

    def commit(self, payload) -> None:
        channels, x, hist, target, label_map = payload
        self.channels = channels
        if len(self.train) < self.o.probe_train:
            self.train.append((x, hist, target))
            if len(self.train) == self.o.probe_train:
                self._fit()
            return
        self._score(x, hist, target, label_map)

    def _fit(self) -> None:
        xs, ys, ws, cls_x, cls_y = [], [], [], [], []
        for x, hist, target in self.train:
            cells, labels = np.nonzero(hist)
            xs.append(x[cells]), ys.append(labels), ws.append(hist[cells, labels])
            if target is None:
                scored = hist.sum(1) > 0
                cls_x.append(x[scored]), cls_y.append(hist[scored].argmax(1))
            else:
                cls_x.append(x.mean(0, keepdims=True)), cls_y.append(np.asarray([target]))
        w = np.concatenate(ws).astype(np.float64)
        # Each cell is trained on the label histogram of the pixels it covers: exactly the pixel
        # loss of nearest-upsampled logits, normalised so a cell weighs 1 on average.
        self.seg = M.fit_linear_probe(np.concatenate(xs), np.concatenate(ys), sample_weight=w / w.mean(),
                                      c=self.o.probe_c, seed=self.o.seed)
        self.cls = M.fit_linear_probe(np.concatenate(cls_x), np.concatenate(cls_y), c=self.o.probe_c,
                                      seed=self.o.seed)

    def _score(self, x, hist, target, label_map) -> None:
        gt, valid, meta = label_map
        cell_pred = self.seg.predict(x).reshape(meta["grid"])
        pred = grid_to_image(cell_pred, meta, *gt.shape)
        if valid is not None:
            gt, pred = gt[valid], pred[valid]
        self.seg_table.update(gt, pred)
        if target is None:
            scored = hist.sum(1) > 0
            self.cls_true.append(hist[scored].argmax(1))
            self.cls_pred.append(self.cls.predict(x[scored]))
        else:
            self.cls_true.append(np.asarray([target]))
            self.cls_pred.append(self.cls.predict(x.mean(0, keepdims=True)))

    def result(self, n_samples: int) -> dict:
        if self.seg is None or not self.cls_true:
            raise PartkitError(f"probe trains on the first {self.o.probe_train} images and scores the rest, but the "
                               f"input has {n_samples}; lower --probe-train or give more images")
        ignore = (0,) if self.o.region == "fg" else ()
        iou, _ = M.matched_iou(self.seg_table.table_, "none", ignore_true=ignore, ignore_pred=ignore)
        true, pred = np.concatenate(self.cls_true), np.concatenate(self.cls_pred)
        recalls = [np.mean(pred[true == c] == c) for c in np.unique(true)]
        present = np.flatnonzero(~np.isnan(iou))
        return {"value": _pct(np.nanmean(iou)), "seg_iou": {str(i): _pct(iou[i]) for i in present},
                "cls_accuracy": _pct(np.mean(true == pred)), "cls_balanced_accuracy": _pct(np.mean(recalls)),
                "target": self.o.probe_target, "region": self.o.region, "train_images": len(self.train),
                "test_images": n_samples - len(self.train), "cls_items": int(true.size)}


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class _Run:
    samples: int = 0
    skipped: list = field(default_factory=list)


def _run(inputs: Sequence[str], accumulators: list, o: EvalOptions, what: str) -> _Run:
    run, read_errors = _Run(), []
    with progress(what) as bar:
        for index, sample in enumerate(iter_samples(inputs, skip_bad=o.skip_bad, errors=read_errors)):
            view = SampleView(sample, o, index)
            try:
                payloads = [acc.prepare(view) for acc in accumulators]
            except BadSample as e:
                if not o.skip_bad:
                    raise
                run.skipped.append(e.record())
                continue
            for acc, payload in zip(accumulators, payloads):
                acc.commit(payload)
            run.samples += 1
            bar.update()
    run.skipped.extend({"key": None, "reason": msg} for msg in read_errors)
    if run.skipped:
        log(f"{what}: skipped {len(run.skipped)} bad sample(s) or shard(s); first: {run.skipped[0]['reason']}")
    if run.samples == 0:
        raise PartkitError(f"no {'usable ' if run.skipped else ''}samples in the input for {what}")
    return run


def _options(options: Optional[EvalOptions], kwargs: dict) -> EvalOptions:
    if options is not None and kwargs:
        raise TypeError("give options= or keyword options, not both")
    try:
        return options or EvalOptions(**kwargs)
    except TypeError as e:
        raise TypeError(f"unknown evaluate option: {e}") from None


def evaluate(inputs: Sequence[str], metrics: Sequence[str], options: Optional[EvalOptions] = None,
             **kwargs) -> dict:
    """Score prediction shards; returns ``{"metrics": {name: {"value": ..., ...}}, "samples", ...}``.

    Options are the fields of :class:`EvalOptions` (as keywords or ``options=``).

    Example:
        >>> evaluate(["cihp-parts.tar"], ["nmi", "ari"], region="full")["metrics"]["ari"]  # doctest: +SKIP
        {'value': 41.3, 'at': 'pixels', 'region': 'full', ...}
    """
    o = _options(options, kwargs)
    names = o.validate(metrics)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(o.match_on, str):
        o.match_on = [o.match_on]
    pixel_scores = "miou" in names or (bool({"nmi", "ari"} & set(names)) and o.at == "pixels")
    accs: dict[str, object] = {}
    if pixel_scores or o.viz_dir is not None:
        accs["pixels"] = _PixelTables(optional=not pixel_scores)
    if {"nmi", "ari"} & set(names) and o.at == "keypoints":
        accs["keypoints"] = _KeypointTable()
    if {"ar", "mask-ap"} & set(names):
        accs["masks"] = _Masks(o, "ar" in names, "mask-ap" in names)
    if "retrieval" in names:
        accs["retrieval"] = _Retrieval(o)
    if "miou-3d" in names:
        accs["shapes"] = _Shapes(o)
    if "probe" in names:
        accs["probe"] = _Probe(o)
    if o.viz_dir is not None:
        accs["views"] = _pictures(o, view_paths(o.viz_dir), accs["pixels"])

    fit_pixels = fit_shapes = None
    if o.match_on:
        fit_accs = []
        if "miou" in names:
            fit_pixels = _PixelTables()
            fit_accs.append(fit_pixels)
        if "miou-3d" in names:
            fit_shapes = _Shapes(o)
            fit_accs.append(fit_shapes)
        _run(o.match_on, fit_accs, o, "eval (--match-on)")

    run = _run(inputs, list(accs.values()), o, "eval")
    results: dict[str, dict] = {}
    clustering = [n for n in names if n in ("nmi", "ari")]
    if clustering:
        table = accs["keypoints"].table.table_ if o.at == "keypoints" else accs["pixels"].pooled()
        results.update(_clustering_results(clustering, table, o))
    if "miou" in names:
        results["miou"] = _miou_result(accs["pixels"], fit_pixels, o)
    if "masks" in accs:
        results.update(accs["masks"].results(names))
    if "retrieval" in names:
        results["retrieval"] = accs["retrieval"].result()
    if "miou-3d" in names:
        results["miou-3d"] = accs["shapes"].result(fit_shapes)
    if "probe" in names:
        results["probe"] = accs["probe"].result(run.samples)
    report = {"metrics": {n: results[n] for n in names}, "samples": run.samples, "skipped": run.skipped,
              "options": _report_options(o), "partkit_version": __version__}
    if "views" in accs:
        report["pictures"] = accs["views"].finish()
    return report


def _report_options(o: EvalOptions) -> dict:
    out = asdict(o)
    out["pred"] = o.pred
    out["match_on"] = list(o.match_on)
    out["ks"] = [int(k) for k in o.ks]
    return out


def render(inputs: Sequence[str], view: str, out: str, options: Optional[EvalOptions] = None, **kwargs) -> dict:
    """Draw one kind of picture (``overlays`` into a folder; ``purity``/``confusion`` into a PNG).

    Example:
        >>> render(["preds.tar"], "confusion", "confusion.png")  # doctest: +SKIP
        {'confusion': 'confusion.png'}
    """
    o = _options(options, kwargs)
    _choice("view", view, VIEWS)
    _choice("--region", o.region, ("fg", "full"))
    if o.viz_max < 1:
        raise PartkitError(f"--max must be at least 1, got {o.viz_max}")
    tables = _PixelTables() if view == "confusion" else None
    views = _pictures(o, {view: out}, tables)
    _run(inputs, [a for a in (tables, views) if a is not None], o, f"show {view}")
    return views.finish()


def _pictures(o: EvalOptions, out: dict, tables: Optional[_PixelTables]) -> Pictures:
    """The pictures of one pass; the confusion map draws the pooled pixel table over ``--region``."""
    def confusion() -> Optional[np.ndarray]:
        return _region_rows(tables.pooled(), o.region) if tables is not None and tables.by_class else None

    return Pictures(out, max_overlays=o.viz_max, confusion_table=confusion)
