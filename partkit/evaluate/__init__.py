"""Score shards of predictions against ground truth: the library behind ``partkit eval``.

One pass over the samples feeds every requested metric; each metric is an accumulator that
decodes what it needs from a shared :class:`SampleView` (so a field is decoded once) and
keeps only what the metric pools (contingency tables, masks, pooled features). Scores are
reported x100, as in the papers.

Example:
    >>> report = evaluate(["preds.tar"], ["nmi", "ari", "miou"], protocol="partdistillation")  # doctest: +SKIP
    >>> report["metrics"]["miou"]["c_miou"], report["protocol"]["set"]["miou"]  # doctest: +SKIP
    (4.45, 'official')
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from .. import fields
from .._log import log, progress
from .._version import __version__
from ..errors import PartkitError, SkipBad, stop
from ..fields import parse_keypoints
from ..io import iter_loaded
from ..show import VIEWS, Pictures, view_paths
# The families register their metrics on import; this order is METRICS' order.
from . import pixels, masks, retrieval, shapes, probe, keypoints  # noqa: F401  # isort: skip
from ._protocols import PROTOCOLS, Protocol, apply_protocol, get_protocol, given_options
from ._registry import (Metric, Pass, accumulator_kinds, create_accumulator, get_metric, list_metrics,
                        register_accumulator, register_metric, registered_metrics)
from .pixels import _PixelTables, _region_rows

__all__ = ["METRICS", "PROTOCOLS", "Protocol", "get_protocol", "EvalOptions", "SampleView", "evaluate", "render", "accumulate", "parse_keypoints", "register_metric",
           "register_accumulator", "list_metrics", "get_metric", "Metric", "Pass"]

METRICS = tuple(list_metrics())  # the built-in metrics; list_metrics() also sees ones registered later


@dataclass
class EvalOptions:
    """Every option of ``partkit eval``; see the README's eval section for the protocols.

    ``protocol`` names a preset (:data:`PROTOCOLS`) applied by :meth:`validate` to the options not
    in ``given`` (the options set explicitly; None: those that differ from their defaults).
    """

    protocol: Optional[str] = None  # partdistillation | choudhury | shapenetpart | zhu (evaluate/_protocols.py)
    given: Optional[Sequence[str]] = None
    pred: Optional[str] = None  # predicted field; default parts.png (2D) or pred_parts.npy (miou-3d)
    gt_field: Optional[str] = None  # default gt_parts.png (2D) or gt_parts.npy (miou-3d)
    region: str = "fg"  # fg: ground-truth foreground pixels only; full: background is a label too
    at: str = "pixels"  # nmi/ari at every pixel, or at visible ground-truth keypoints
    match: str = "majority"  # majority | hungarian | none (miou, miou-3d)
    miou: str = "official"  # official: PartDistillation's evaluator; pooled: one table over --region pixels
    match_on: Sequence[str] = ()  # shards to fit the cluster->part matching on (default: the scored data)
    proposals: str = "proposals.json"
    gt: str = "parts"  # ar/mask-ap ground truth: parts (gt_parts.png, one mask per id) or objects
    ks: Sequence[int] = (1, 10, 50, 100, 200)
    max_dets: int = 100
    feat: str = "feat.npy"
    patch: int = 3  # retrieval pooled-cells: pool a patch x patch window of feature cells around each keypoint
    exclude_self: bool = True  # retrieval: each query ranks the other patches (Zhu et al.)
    kpt_min_visibility: int = 1  # keypoints with v >= this are used (COCO: 1 occluded, 2 visible)
    category_parts: Optional[dict] = None  # miou-3d: {category: [part ids]}; default: ids seen in the data
    probe_train: int = 10  # the first N images train the probes, the rest score them
    probe_target: str = "part"  # part (label of each feature cell) or category (image category)
    probe_c: float = 1.0
    probe_lr: Optional[float] = None  # part-cls / linear-seg: default the paper's (SGD 0.4 / AdamW 4e-4)
    probe_batch: Optional[int] = None  # part-cls / linear-seg: default the paper's (1024 / 16)
    probe_epochs: int = 90  # part-cls: SGD epochs (Zhu et al.: 90)
    probe_iters: int = 2000  # linear-seg: AdamW iterations (Zhu et al.: 160k; --protocol zhu sets it)
    seed: int = 0
    skip_bad: bool = False
    viz_dir: Optional[str] = None
    viz_max: int = 16
    average: str = "pooled"  # nmi/ari value: pooled over the dataset, or the mean over object classes (class)
    kpt_train: int = 0  # kpt-regression without --match-on: the first N images fit the regression, the rest score
    kpt_norm: str = "bbox"  # kpt-regression coordinates / error: per object box (gt_objects.json) or image size
    retrieval_features: str = "pooled-cells"  # pooled-cells (feat.npy windows) | patches (kpt_feat.npy crops)
    kpt_feat: str = "kpt_feat.npy"  # retrieval patches: the per-keypoint feature field

    def validate(self, metrics: Sequence[str]) -> list[str]:
        """Check every option before any work; returns the metric names, deduplicated.

        Each option is checked as the metrics that use it declare, whichever metrics are asked for.
        The protocol preset is applied first (once), so its values are checked too.
        """
        self.resolve_protocol()
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
        if self.probe_lr is not None and not (isinstance(self.probe_lr, (int, float)) and 0 < self.probe_lr < float("inf")):
            raise PartkitError(f"--probe-lr must be a positive number, got {self.probe_lr}")
        if self.probe_batch is not None and self.probe_batch < 1:
            raise PartkitError(f"--probe-batch must be at least 1, got {self.probe_batch}")
        fitted = [n for n, m in registry.items() if m.fit is not None]
        if self.match_on and not set(fitted) & set(names):
            raise PartkitError(f"--match-on only applies to {' and '.join(fitted)}; add one of them or drop "
                               f"--match-on")
        if self.match_on and self.match == "none":
            raise PartkitError("--match none uses predicted ids as they are; there is nothing to fit on --match-on")
        return names

    def resolve_protocol(self) -> dict:
        """Apply the ``protocol`` preset to the options not given explicitly (once); the report's record."""
        record = getattr(self, "_protocol_record", None)
        if record is None:
            record = apply_protocol(self, given_options(self, self.given))
            self._protocol_record = record
        return record


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _first_seen(groups) -> list[str]:
    return list(dict.fromkeys(name for group in groups for name in group))


def _choice(opt: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PartkitError(f"{opt} must be one of {', '.join(choices)}, got {value!r}")


class SampleView(fields.SampleView):
    """:class:`partkit.fields.SampleView` with the fields an :class:`EvalOptions` names."""

    def __init__(self, sample: dict, options: EvalOptions, index: int = 0):
        super().__init__(sample, index, gt_field=options.gt_field or "gt_parts.png",
                         pred_field=options.pred or "parts.png", feat_field=options.feat,
                         kpt_min_visibility=options.kpt_min_visibility)
        self.o = options


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class _Run:
    samples: int = 0
    skipped: list = field(default_factory=list)


def _run(inputs: Sequence[str], accumulators: list, o: EvalOptions, what: str) -> _Run:
    run, skip = _Run(), SkipBad()
    index = itertools.count()  # position in the input, bad samples included

    def prepare(sample: dict) -> list:
        view = SampleView(sample, o, next(index))
        return [acc.prepare(view) for acc in accumulators]

    with progress(what) as bar:
        for payloads in iter_loaded(inputs, prepare, handler=skip if o.skip_bad else stop):
            for acc, payload in zip(accumulators, payloads):
                acc.commit(payload)
            run.samples += 1
            bar.update()
    run.skipped = skip.records
    if run.skipped:
        log(f"{what}: skipped {len(run.skipped)} bad sample(s) or shard(s); first: {run.skipped[0]['reason']}")
    if run.samples == 0:
        raise PartkitError(f"no {'usable ' if run.skipped else ''}samples in the input for {what}")
    return run


def _options(options: Optional[EvalOptions], kwargs: dict) -> EvalOptions:
    if options is not None and kwargs:
        raise TypeError("give options= or keyword options, not both")
    if options is None and "given" not in kwargs:
        kwargs["given"] = [k for k in kwargs if k != "protocol"]
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
    metric_names = o.validate(metrics)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(o.match_on, str):
        o.match_on = [o.match_on]
    chosen = [get_metric(n) for n in list_metrics() if n in metric_names]  # registry order
    used = {m.kind(o) for m in chosen}
    names = _Names("eval")
    accs: dict[str, object] = {"names": names}  # first: a sample's names are known when its pictures are drawn
    for kind in accumulator_kinds():
        if kind in used:
            accs[kind] = create_accumulator(kind, o, metric_names)
        elif kind == "pixels" and o.viz_dir is not None:
            accs[kind] = _PixelTables(optional=True)  # pictures only
    if o.viz_dir is not None:
        accs["views"] = _pictures(o, view_paths(o.viz_dir), accs["pixels"], names.names)

    fit: dict[str, object] = {}
    if o.match_on:
        fitted = {m.fit for m in chosen if m.fit is not None}
        fit = {kind: create_accumulator(kind, o, metric_names) for kind in accumulator_kinds() if kind in fitted}
        _run(o.match_on, list(fit.values()), o, "eval (--match-on)")

    run = _run(inputs, list(accs.values()), o, "eval")
    part_names = names.names.names
    p = Pass(o, metric_names, accs, fit, run.samples, part_names)
    results = {m.name: m.result(p) for m in chosen}
    report = {"metrics": {n: results[n] for n in metric_names}, "samples": run.samples, "skipped": run.skipped,
              "options": _report_options(o), "protocol": o.resolve_protocol(), "partkit_version": __version__}
    if part_names:
        report["part_names"] = {str(i): part_names[i] for i in sorted(part_names)}
    if "views" in accs:
        report["pictures"] = accs["views"].finish()
    return report


def accumulate(inputs: Sequence[str], kind: str, metrics: Sequence[str], options: EvalOptions, what: str):
    """One reading pass feeding one accumulator ``kind`` as it is fed for ``metrics`` (the options checked
    first); returns the accumulator and the number of samples read. ``partkit export coco`` reads mask-ap's."""
    metric_names = options.validate(metrics)
    if isinstance(inputs, str):
        inputs = [inputs]
    acc = create_accumulator(kind, options, metric_names)
    run = _run(inputs, [acc], options, what)
    return acc, run.samples


def _report_options(o: EvalOptions) -> dict:
    out = asdict(o)
    out.pop("given")
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
    names = _Names(f"show {view}")
    views = _pictures(o, {view: out}, tables, names.names)
    _run(inputs, [a for a in (names, tables, views) if a is not None], o, f"show {view}")
    return views.finish()


class _Names:
    """Accumulator of the samples' part names (:class:`partkit.fields.PartNames`: the first name of
    an id wins; a conflicting one is a warning on stderr)."""

    def __init__(self, what: str):
        self.what, self.names = what, fields.PartNames()

    def prepare(self, v: SampleView):
        return v.key, v.part_names

    def commit(self, payload) -> None:
        for message in self.names.add(payload[1], payload[0]):
            log(f"{self.what}: warning: {message}")


def _pictures(o: EvalOptions, out: dict, tables: Optional[_PixelTables], names: fields.PartNames) -> Pictures:
    """The pictures of one pass; the confusion map draws the pooled pixel table over ``--region``."""
    def confusion() -> Optional[np.ndarray]:
        return _region_rows(tables.pooled(), o.region) if tables is not None and tables.by_class else None

    return Pictures(out, max_overlays=o.viz_max, confusion_table=confusion, names=names)
