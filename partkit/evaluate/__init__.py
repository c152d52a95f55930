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

from .._log import log, progress
from .._version import __version__
from ..errors import BadSample, PartkitError, missing_field
from ..grid import grid_to_image
from ..io import decode_image, decode_json, decode_label_map, decode_npy, iter_samples
from ..show import VIEWS, Pictures, view_paths
# The families register their metrics on import; this order is METRICS' order.
from . import pixels, masks, retrieval, shapes, probe  # noqa: F401  # isort: skip
from ._registry import (Metric, Pass, accumulator_kinds, create_accumulator, get_metric, list_metrics,
                        register_accumulator, register_metric, registered_metrics)
from .pixels import _PixelTables, _region_rows

__all__ = ["METRICS", "EvalOptions", "SampleView", "evaluate", "render", "parse_keypoints", "register_metric",
           "register_accumulator", "list_metrics", "get_metric", "Metric", "Pass"]

METRICS = tuple(list_metrics())  # the built-in metrics; list_metrics() also sees ones registered later
_GEOMETRY = ("grid", "stride", "image_size", "resized")


@dataclass
class EvalOptions:
    """Every option of ``partkit eval``; see the README's eval section for the protocols."""

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
        """Check every option before any work; returns the metric names, deduplicated.

        Each option is checked as the metrics that use it declare, whichever metrics are asked for.
        """
        registry = registered_metrics()
        choices = ", ".join(registry)
        if not metrics:
            raise PartkitError(f"no metric given; choose from {choices}")
        names = list(dict.fromkeys(metrics))
        for name in names:
            if name not in registry:
                raise PartkitError(f"unknown metric {name!r}; choose from {choices}")
        allowed: dict[str, tuple[str, ...]] = {}
        for metric in registry.values():
            for name, values in metric.choices.items():
                allowed.setdefault(name, values)
        for name, values in allowed.items():
            _choice(_flag(name), getattr(self, name), values)
        for name in _first_seen(m.at_least_1 for m in registry.values()) + ["viz_max"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)):  # --ks: a list
                if not value or any(int(k) < 1 for k in value):
                    raise PartkitError(f"{_flag(name)} must be positive integers, got {list(value)}")
            elif value < 1:
                raise PartkitError(f"{_flag(name)} must be at least 1, got {value}")
        for name in _first_seen(m.positive for m in registry.values()):
            if getattr(self, name) <= 0:
                raise PartkitError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        fitted = [n for n, m in registry.items() if m.fit is not None]
        if self.match_on and not set(fitted) & set(names):
            raise PartkitError(f"--match-on only applies to {' and '.join(fitted)}; add one of them or drop "
                               f"--match-on")
        if self.match_on and self.match == "none":
            raise PartkitError("--match none uses predicted ids as they are; there is nothing to fit on --match-on")
        return names


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _first_seen(groups) -> list[str]:
    return list(dict.fromkeys(name for group in groups for name in group))


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
    chosen = [get_metric(n) for n in list_metrics() if n in names]  # registry order
    used = {m.kind(o) for m in chosen}
    accs: dict[str, object] = {}
    for kind in accumulator_kinds():
        if kind in used:
            accs[kind] = create_accumulator(kind, o, names)
        elif kind == "pixels" and o.viz_dir is not None:
            accs[kind] = _PixelTables(optional=True)  # pictures only
    if o.viz_dir is not None:
        accs["views"] = _pictures(o, view_paths(o.viz_dir), accs["pixels"])

    fit: dict[str, object] = {}
    if o.match_on:
        fitted = {m.fit for m in chosen if m.fit is not None}
        fit = {kind: create_accumulator(kind, o, names) for kind in accumulator_kinds() if kind in fitted}
        _run(o.match_on, list(fit.values()), o, "eval (--match-on)")

    run = _run(inputs, list(accs.values()), o, "eval")
    p = Pass(o, names, accs, fit, run.samples)
    results = {m.name: m.result(p) for m in chosen}
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
