"""The sample format (docs/FORMAT.md) in code: one reader per field.

Each reader takes a sample dict (tar member name -> bytes, plus ``__key__``), decodes one field,
checks it against the format and raises :class:`~partkit.errors.BadSample` naming the sample and
the fix when it does not hold. :class:`SampleView` decodes a sample's fields lazily, once, for
stages that read several (``eval``, ``show``).

Example:
    >>> feat, meta = features(sample, require_geometry=True)  # doctest: +SKIP
    >>> labels = gt_parts(sample, size=meta["image_size"]); mask = foreground(labels)  # doctest: +SKIP
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Optional, Sequence

import numpy as np

from . import rle
from .errors import PRODUCERS, BadSample, PartkitError, missing_field
from .grid import grid_to_image
from .io import decode_image, decode_json, decode_label_map, decode_npy

__all__ = [
    "GEOMETRY_KEYS", "IGNORE_IDS", "companion", "info", "category", "image", "ignore_id", "gt_parts", "foreground",
    "geometry", "features", "FeatureSource", "label_map", "masks", "decode_masks", "objects", "object_masks",
    "keypoints", "parse_keypoints", "proposals", "part_names", "parse_part_names", "PartNames", "SampleView",
    "OBJECT_SOURCES", "SALIENCY_THRESHOLD", "saliency", "salient", "objects_from", "check_object_source",
    "label_classes",
]

GEOMETRY_KEYS = ("grid", "stride", "image_size", "resized")  # what partkit.grid needs (plus optional "offset")
IGNORE_IDS = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}  # gt_parts.png: "ignore" per storage type


def companion(field: str) -> str:
    """The metadata field that travels with a field: ``parts.png`` -> ``parts.json``."""
    return field.rsplit(".", 1)[0] + ".json"


# ---------------------------------------------------------------------------------------------
# json, image


def info(sample: dict) -> dict:
    """The ``json`` metadata (``{}`` when the sample has none)."""
    if "json" not in sample:
        return {}
    doc = decode_json(sample, "json")
    if not isinstance(doc, dict):
        raise BadSample(sample["__key__"], "field 'json' must be an object of metadata; re-run `partkit pack`")
    return doc


def category(sample: dict) -> Optional[str]:
    """The sample's object class (``json`` ``category``), or None."""
    cat = info(sample).get("category")
    return None if cat is None else str(cat)


def image(sample: dict, min_size: int = 1) -> np.ndarray:
    """The image as H x W x 3 uint8 RGB."""
    return decode_image(sample, min_size)


# ---------------------------------------------------------------------------------------------
# part_names (in json): what the ids of gt_parts.png are called


def parse_part_names(doc, where: str) -> dict[int, str]:
    """``{"id": name}`` (ids as strings or integers >= 0, names strings) -> ``{int id: name}``;
    ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object {{\"id\": \"name\", ...}}, got {type(doc).__name__}")
    out = {}
    for k, v in doc.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            i = -1
        if i < 0 or str(i) != str(k).strip():
            raise ValueError(f"{where}: key {k!r} is not a part id (an integer >= 0)")
        if not isinstance(v, str):
            raise ValueError(f"{where}: the name of part {k} is {repr(v)[:40]}, not a string")
        out[i] = v
    return out


def part_names(sample: dict) -> dict[int, str]:
    """The names of the ground-truth part ids (``json`` ``part_names``, written by ``pack --coco-as
    parts`` or ``pack --label-names``): ``{id: name}``, ``{}`` when the sample has none."""
    doc = info(sample).get("part_names")
    if doc is None:
        return {}
    try:
        return parse_part_names(doc, "'json' part_names")
    except ValueError as e:
        raise BadSample(sample["__key__"], f"{e}; re-run `partkit pack` with --label-names") from None


def label_classes(sample: dict, field: str) -> Optional[dict[int, str]]:
    """The class list of a label-map field, ``{id: name}``, or None when its ids name no classes:
    the companion's ``classes`` (``targets.json`` of ``rank apply --as-targets``), else, for
    ``gt_parts.png``, the ``json`` ``part_names`` (:func:`part_names`). Cluster maps have none."""
    meta_field = companion(field)
    if meta_field in sample:
        doc = decode_json(sample, meta_field)
        if isinstance(doc, dict) and "classes" in doc:
            try:
                return parse_part_names(doc["classes"], f"'{meta_field}' classes")
            except ValueError as e:
                raise BadSample(sample["__key__"], f"{e}; re-run `{PRODUCERS.get(meta_field, 'partkit')}`") from None
    if field == "gt_parts.png":
        return part_names(sample) or None
    return None


class PartNames:
    """Part names pooled over samples: the first sample to name an id wins; a later sample naming it
    differently is reported once per id by :meth:`add` (callers warn) and does not change it.

    >>> names = PartNames(); names.add({1: "hair"}, "a"); names.add({1: "head"}, "b")  # doctest: +SKIP
    ["part 1 is 'hair' in sample 'a' but 'head' in sample 'b'; keeping 'hair'"]
    """

    def __init__(self):
        self.names: dict[int, str] = {}
        self.first: dict[int, str] = {}
        self.conflicts: set[int] = set()

    def add(self, names: dict[int, str], key: str) -> list[str]:
        """Merge one sample's names; returns a message per id newly found to conflict."""
        messages = []
        for i, name in names.items():
            if i not in self.names:
                self.names[i], self.first[i] = name, key
            elif self.names[i] != name and i not in self.conflicts:
                self.conflicts.add(i)
                messages.append(f"part {i} is {self.names[i]!r} in sample {self.first[i]!r} but {name!r} in sample "
                                f"{key!r}; keeping {self.names[i]!r}")
        return messages

    def label(self, i: int) -> str:
        """``name`` when the id has one, else the id."""
        return self.names.get(int(i), str(int(i)))


# ---------------------------------------------------------------------------------------------
# gt_parts.png and other label maps


def ignore_id(labels: np.ndarray) -> int:
    """The 'ignore' id of a ground-truth map: 255 (uint8) or 65535 (uint16)."""
    return IGNORE_IDS.get(labels.dtype, 255)


def gt_parts(sample: dict, field: str = "gt_parts.png", size: Optional[Sequence[int]] = None) -> np.ndarray:
    """A ground-truth part map (0 background, :func:`ignore_id` ignore), checked against the image
    ``size`` ``(H, W)`` when given."""
    labels = decode_label_map(sample, field)
    if size is not None and tuple(labels.shape) != tuple(int(s) for s in size):
        H, W = size
        raise BadSample(sample["__key__"], f"'{field}' is {labels.shape[1]}x{labels.shape[0]} but the image is "
                                           f"{W}x{H}; ground truth must be at image size")
    return labels


def foreground(labels: np.ndarray) -> np.ndarray:
    """Labelled pixels: neither background (0) nor ignore."""
    return (labels != 0) & (labels != ignore_id(labels))


def label_map(sample: dict, field: str, height: int, width: int) -> np.ndarray:
    """A predicted label map (``parts.png``, ``pred_parts.png``, ...) at image size: as stored when
    it is, else upsampled from the feature grid its companion ``.json`` describes."""
    key = sample["__key__"]
    pred = decode_label_map(sample, field)
    if pred.shape == (height, width):
        return pred
    meta_field = companion(field)
    meta = decode_json(sample, meta_field) if meta_field in sample else {}
    if isinstance(meta, dict) and meta.get("resolution") == "grid":
        if all(k in meta for k in GEOMETRY_KEYS):
            geometry(meta, key, meta_field)
            if tuple(meta["grid"]) != pred.shape:
                raise BadSample(key, f"'{field}' is {pred.shape[1]}x{pred.shape[0]} but '{meta_field}' says the "
                                     f"grid is {meta['grid'][1]}x{meta['grid'][0]}")
            return grid_to_image(pred, meta, height, width)
        return _nearest_resize(pred, height, width)
    raise BadSample(key, f"'{field}' is {pred.shape[1]}x{pred.shape[0]} but the image is {width}x{height}; a "
                         f"prediction must be at image size, or at grid size with \"resolution\": \"grid\" in "
                         f"'{meta_field}'")


def _nearest_resize(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------
# feat.npy + feat.json: the grid geometry


def _pair(value) -> Optional[list]:
    """``[a, b]`` of positive integers, or None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and v >= 1
               for v in value):
        return None
    return [int(v) for v in value]


def _number(value) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def geometry(meta: dict, key: str, field: str = "feat.json", require: bool = True) -> dict:
    """Check the grid geometry in ``meta`` (docs/FORMAT.md, ``feat.json``) and return ``meta``.

    ``grid``, ``image_size`` and ``resized`` are ``[h, w]`` of positive integers, ``stride`` a
    positive number, ``offset`` (optional) a number in ``[0, resized)``; the grid covers the
    resized image: ``(grid - 1) * stride < resized <= (grid + 1) * stride + offset`` per axis.
    With ``require``, all of :data:`GEOMETRY_KEYS` must be there; otherwise those present are checked.
    """
    fix = f"re-run `{PRODUCERS.get(field, 'partkit extract')}` to record the grid geometry"
    if not isinstance(meta, dict):
        raise BadSample(key, f"'{field}' must be a JSON object; {fix}")
    missing = [k for k in GEOMETRY_KEYS if k not in meta]
    if missing and require:
        raise BadSample(key, f"{field} lacks {', '.join(missing)}; {fix}")
    for name in ("grid", "image_size", "resized"):
        if name in meta and _pair(meta[name]) is None:
            raise BadSample(key, f"'{field}' {name} is {meta[name]!r}; expected [h, w] of positive integers; {fix}")
    stride = _number(meta.get("stride", 1))
    if stride is None or stride <= 0:
        raise BadSample(key, f"'{field}' stride is {meta.get('stride')!r}; expected a positive number; {fix}")
    offset = _number(meta.get("offset", 0.0))
    if offset is None or offset < 0:
        raise BadSample(key, f"'{field}' offset is {meta.get('offset')!r}; expected a number >= 0; {fix}")
    if "resized" in meta:
        resized = _pair(meta["resized"])
        if offset >= min(resized):
            raise BadSample(key, f"'{field}' offset {offset:g} lies past the resized image {resized}; {fix}")
        if "grid" in meta and "stride" in meta:
            grid = _pair(meta["grid"])
            for g, r, axis in zip(grid, resized, ("height", "width")):
                if not (g - 1) * stride < r <= (g + 1) * stride + offset:
                    raise BadSample(key, f"'{field}' grid {grid} at stride {stride:g} does not cover the resized "
                                         f"image {resized} ({axis}); {fix}")
    return meta


def features(sample: dict, field: str = "feat.npy", require_geometry: bool = False) -> tuple[np.ndarray, dict]:
    """``feat.npy`` (C x h x w, as stored) and its checked ``feat.json``: grid matching the array,
    the geometry valid (and complete, with ``require_geometry``)."""
    key = sample["__key__"]
    feat = decode_npy(sample, field, 3, "C x h x w")
    if min(feat.shape) < 1:
        raise BadSample(key, f"'{field}' has shape {feat.shape}; expected C x h x w")
    meta_field = companion(field)
    if meta_field not in sample:
        raise missing_field(key, meta_field)
    meta = geometry(decode_json(sample, meta_field), key, meta_field, require=require_geometry)
    if "grid" in meta and list(meta["grid"]) != list(feat.shape[1:]):
        raise BadSample(key, f"'{field}' has shape {feat.shape} but '{meta_field}' says grid {meta['grid']}; "
                             "expected C x h x w")
    return feat, meta


class FeatureSource:
    """Refuses features of another backbone, layers or size than the first sample's.

    >>> same = FeatureSource("cluster --scope dataset"); same.check(sample, meta, feat.shape[0])  # doctest: +SKIP
    """

    KEYS = ("model", "kind", "layers")

    def __init__(self, what: str):
        self.what = what
        self.first: Optional[tuple] = None

    @staticmethod
    def _where(sample: dict) -> str:
        url = sample.get("__url__")
        return f"{sample['__key__']!r}" + (f" ({url})" if url else "")

    def check(self, sample: dict, meta: dict, channels: int) -> None:
        sig = tuple(repr(meta.get(k)) for k in self.KEYS) + (int(channels),)
        if self.first is None:
            self.first = (sig, self._where(sample))
            return
        if sig != self.first[0]:
            def text(s):
                return ", ".join(f"{k} {v}" for k, v in zip(self.KEYS + ("channels",), s))
            raise BadSample(sample["__key__"], f"its features ({text(sig)}) differ from those of sample "
                                               f"{self.first[1]} ({text(self.first[0])}), sample "
                                               f"{self._where(sample)}; {self.what} takes one model's features "
                                               "at a time: re-extract the inputs with the same model and layers")


# ---------------------------------------------------------------------------------------------
# Masks: gt_objects.json, proposals.json


def masks(segs: Sequence, key: str, field: str, height: int, width: int) -> list[dict]:
    """COCO segmentations of one field as compressed RLEs at the image size (checked)."""
    out = []
    for seg in segs:
        try:
            out.append(rle.to_compressed(seg, height, width))
        except ValueError as e:
            raise BadSample(key, f"a mask in '{field}' {e}") from None
    return out


def decode_masks(rles: Sequence[dict], key: str, field: str, size: Sequence[int]) -> np.ndarray:
    """Checked compressed RLEs -> N x H x W bool."""
    try:
        return rle.decode(rles, tuple(size))
    except ValueError as e:
        raise BadSample(key, f"'{field}' {e}") from None


def objects(sample: dict, field: str = "gt_objects.json") -> list[dict]:
    """The instances of ``gt_objects.json`` (or a field like it): a list of objects, each with a
    ``segmentation``; ``{"objects": [...]}`` or a bare list."""
    key = sample["__key__"]
    doc = decode_json(sample, field)
    objs = doc.get("objects") if isinstance(doc, dict) else doc
    if not isinstance(objs, list) or not all(isinstance(o, dict) for o in objs):
        raise BadSample(key, f"'{field}' must be {{\"objects\": [{{\"segmentation\", ...}}, ...]}} (docs/FORMAT.md); "
                             "re-run `partkit pack --coco`")
    for i, o in enumerate(objs):
        if "segmentation" not in o:
            raise BadSample(key, f"object {i} in '{field}' has no RLE 'segmentation' {{size, counts}}; "
                                 "re-run `partkit pack --coco`")
    return objs


def object_masks(sample: dict, size: Sequence[int], field: str = "gt_objects.json") -> tuple[list[dict], np.ndarray]:
    """(objects, N x H x W bool masks) of :func:`objects`, masks checked against the image size."""
    objs = objects(sample, field)
    H, W = (int(s) for s in size)
    rles = masks([o["segmentation"] for o in objs], sample["__key__"], field, H, W)
    return objs, decode_masks(rles, sample["__key__"], field, (H, W))


# ---------------------------------------------------------------------------------------------
# saliency.npy, and object masks from a named source

OBJECT_SOURCES = ("gt_objects", "gt_parts", "saliency")  # --objects-from (rank), --fg-from (cluster)
SALIENCY_THRESHOLD = 0.065  # CLS-attention saliency above this is foreground (--fg-threshold)


def saliency(sample: dict, grid: Optional[Sequence[int]] = None) -> np.ndarray:
    """``saliency.npy`` (``extract --saliency``: the ViT's CLS attention, h x w on the feature grid) as
    float32, checked against the feature ``grid`` ``(h, w)`` when given."""
    sal = decode_npy(sample, "saliency.npy", 2, "h x w on the feature grid").astype(np.float32)
    if grid is not None and sal.shape != tuple(int(g) for g in grid):
        raise BadSample(sample["__key__"], f"saliency.npy has shape {sal.shape}, not the feature grid "
                                           f"{int(grid[0])}x{int(grid[1])}; re-run `partkit extract --saliency`")
    return sal


def salient(sal: np.ndarray, threshold: float = SALIENCY_THRESHOLD) -> np.ndarray:
    """Foreground cells of a saliency map: saliency above ``threshold``."""
    return sal > threshold


def check_object_source(source: Optional[str]) -> None:
    """``--objects-from``: None (the command's default) or one of :data:`OBJECT_SOURCES`; a one-line error else."""
    if source is not None and source not in OBJECT_SOURCES:
        raise PartkitError(f"--objects-from must be one of {', '.join(OBJECT_SOURCES)}, got {source!r}")


def objects_from(sample: dict, source: str, size: Sequence[int], *, field: str = "gt_objects.json",
                 fg_threshold: float = SALIENCY_THRESHOLD) -> tuple[list[dict], np.ndarray]:
    """The objects of a sample from a named ``source`` (:data:`OBJECT_SOURCES`): (records, N x H x W
    bool masks at the image ``size``).

    ``gt_objects``: the instances of ``field`` (records as stored: ``id``, ``category``, ``iscrowd``,
    ``score``, ...; callers decide about crowd regions). ``gt_parts``: all labelled pixels of
    ``gt_parts.png`` as one object. ``saliency``: the cells of ``saliency.npy`` above ``fg_threshold``
    as one object, upsampled to image pixels with ``feat.json``'s grid geometry. The one-object
    sources give ``[{"source": ...}]``, or no object when the mask is empty.

    >>> records, masks = objects_from(sample, "saliency", (H, W))  # doctest: +SKIP
    """
    H, W = (int(s) for s in size)
    key = sample["__key__"]
    if source == "gt_objects":
        if field not in sample:
            raise missing_field(key, field)
        return object_masks(sample, (H, W), field)
    if source == "gt_parts":
        mask = foreground(gt_parts(sample, size=(H, W)))
    elif source == "saliency":
        sal = saliency(sample)
        if "feat.json" not in sample:  # the grid geometry travels in feat.json
            raise missing_field(key, "feat.json")
        meta = geometry(decode_json(sample, "feat.json"), key, "feat.json")
        if sal.shape != tuple(meta["grid"]):
            raise BadSample(key, f"saliency.npy has shape {sal.shape}, not the feature grid {meta['grid'][0]}x"
                                 f"{meta['grid'][1]} of feat.json; re-run `partkit extract --saliency`")
        mask = grid_to_image(salient(sal, fg_threshold), meta, H, W)
    else:
        raise ValueError(f"unknown object source {source!r}; expected one of {', '.join(OBJECT_SOURCES)}")
    if not mask.any():
        return [], np.zeros((0, H, W), bool)
    return [{"source": source}], mask[None]


def proposals(sample: dict, field: str, height: int, width: int) -> list[dict]:
    """``proposals.json`` entries (or a bare list), each with a numeric ``score`` and its
    ``segmentation`` as a checked compressed RLE at the image size."""
    key = sample["__key__"]
    doc = decode_json(sample, field)
    props = doc.get("proposals") if isinstance(doc, dict) else doc
    if not isinstance(props, list):
        raise BadSample(key, f"'{field}' must be a list of proposals or {{\"proposals\": [...]}}; "
                             "re-run `partkit predict`")
    out = []
    for i, p in enumerate(props):
        if not isinstance(p, dict) or _number(p.get("score")) is None:
            raise BadSample(key, f"proposal {i} in '{field}' needs a numeric 'score'; re-run `partkit predict`")
        seg = masks([p.get("segmentation")], key, field, height, width)[0]
        out.append({**p, "segmentation": seg, "score": float(p["score"])})
    return out


# ---------------------------------------------------------------------------------------------
# gt_kpts.json


def keypoints(sample: dict) -> tuple[list[np.ndarray], list[str]]:
    """Keypoints of ``gt_kpts.json`` as one ``K x 3`` array (x, y, v) per object, plus names."""
    return parse_keypoints(decode_json(sample, "gt_kpts.json"), sample["__key__"])


def parse_keypoints(doc, key: str = "?") -> tuple[list[np.ndarray], list[str]]:
    """:func:`keypoints` of a decoded ``gt_kpts.json``.

    Each object is a list of ``[x, y, v]`` triplets or COCO's flat ``[x1, y1, v1, x2, ...]``;
    values must be finite.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keypoints"), list):
        raise BadSample(key, "'gt_kpts.json' must be an object with a 'keypoints' list (one entry per object)")
    objs = []
    for obj in doc["keypoints"]:
        try:
            arr = np.asarray(obj, dtype=np.float64).reshape(-1, 3)
        except (ValueError, TypeError):
            raise BadSample(key, "'gt_kpts.json' keypoints must be [x, y, v] triplets per object") from None
        if not np.isfinite(arr).all():
            raise BadSample(key, "'gt_kpts.json' holds NaN or infinite keypoint values; re-run `partkit pack --coco` "
                                 "with finite coordinates")
        objs.append(arr)
    names = doc.get("names")
    k = max((len(o) for o in objs), default=0)
    if names is None:
        names = [str(i) for i in range(k)]
    if not isinstance(names, list):
        raise BadSample(key, "'gt_kpts.json' names must be a list")
    if any(len(o) != len(names) for o in objs):
        raise BadSample(key, f"'gt_kpts.json' has {len(names)} keypoint names but an object with a different count")
    return objs, [str(n) for n in names]


# ---------------------------------------------------------------------------------------------
# The view several stages share


class SampleView:
    """Lazily decoded, validated fields of one sample, each decoded at most once.

    ``gt_field``/``pred_field``/``feat_field`` name the fields to read as ground truth,
    prediction and features.
    """

    def __init__(self, sample: dict, index: int = 0, *, gt_field: str = "gt_parts.png",
                 pred_field: str = "parts.png", feat_field: str = "feat.npy", kpt_min_visibility: int = 1):
        self.sample, self.index = sample, index
        self.key = sample["__key__"]
        self.gt_field, self.pred_field, self.feat_field = gt_field, pred_field, feat_field
        self.kpt_min_visibility = kpt_min_visibility

    def has(self, field_name: str) -> bool:
        return field_name in self.sample

    @cached_property
    def meta(self) -> dict:
        return info(self.sample)

    @cached_property
    def category(self) -> Optional[str]:
        return category(self.sample)

    @cached_property
    def part_names(self) -> dict[int, str]:
        return part_names(self.sample)

    @cached_property
    def gt(self) -> np.ndarray:
        size = (self.meta.get("height"), self.meta.get("width"))
        return gt_parts(self.sample, self.gt_field, None if None in size else size)

    @cached_property
    def ignore_id(self) -> int:
        return ignore_id(self.gt)

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
        if "height" in self.meta and "width" in self.meta:
            return int(self.meta["height"]), int(self.meta["width"])
        return tuple(self.image.shape[:2])

    @cached_property
    def image(self) -> np.ndarray:
        return image(self.sample)

    @cached_property
    def pred(self) -> np.ndarray:
        """The predicted label map at image size."""
        return label_map(self.sample, self.pred_field, *self.shape)

    @cached_property
    def keypoints(self) -> tuple[list[np.ndarray], list[str]]:
        return keypoints(self.sample)

    def visible_keypoints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, keypoint index) of the keypoints with v >= kpt_min_visibility, as integer pixels."""
        objs, _ = self.keypoints
        pts = [np.column_stack([o, np.arange(len(o))]) for o in objs]
        pts = np.concatenate(pts) if pts else np.zeros((0, 4))
        pts = pts[pts[:, 2] >= self.kpt_min_visibility]
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
        """Features as float32 C x h x w, and their geometry."""
        feat, meta = features(self.sample, self.feat_field, require_geometry=True)
        return feat.astype(np.float32), meta

    def npy_labels(self, field_name: str) -> np.ndarray:
        """A per-point id array (``gt_parts.npy``, ``pred_parts.npy``): 1-D, integer, >= 0."""
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
# kpt_feat.npy + kpt_feat.json (extract --patches-at keypoints)


def keypoint_features(sample: dict, field: str = "kpt_feat.npy") -> tuple[np.ndarray, dict]:
    """``kpt_feat.npy`` (K x C float32, one row per keypoint patch) and its checked ``kpt_feat.json``,
    whose ``keypoints`` list names each row (``object``, ``index``, ``name``, ``x``, ``y``, ``v``, ``box``)."""
    key = sample["__key__"]
    feat = decode_npy(sample, field, 2, "K x C")
    meta_field = companion(field)
    if meta_field not in sample:
        raise missing_field(key, meta_field)
    meta = decode_json(sample, meta_field)
    rows = meta.get("keypoints") if isinstance(meta, dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or "name" not in r for r in rows):
        raise BadSample(key, f"'{meta_field}' must hold a 'keypoints' list of {{name, v, ...}} entries; "
                             "re-run `partkit extract --patches-at keypoints`")
    if len(rows) != feat.shape[0]:
        raise BadSample(key, f"'{field}' has {feat.shape[0]} rows but '{meta_field}' lists {len(rows)} keypoints")
    feat = feat.astype(np.float32)
    if not np.isfinite(feat).all():
        raise BadSample(key, f"'{field}' holds NaN or infinite values")
    return feat, meta
