"""The metric registry: one record per metric, one factory per kind of accumulator.

A metric is a plain function ``result(p: Pass) -> dict`` decorated with :func:`register_metric`,
which records, in one place, the accumulator it reads, the options it uses and their checks, the
``--match-on`` pass it needs, and the protocol line of the CLI table. Accumulators (one pass over
the samples feeds them all) are registered by kind with :func:`register_accumulator`, so metrics
that pool the same thing (nmi, ari and miou: pixel tables) share one. ``EvalOptions.validate``
checks every option as the registered metrics declare it, so a new metric brings its own checks.

Example:
    >>> @register_metric("pixel-pairs", accumulator="pixels", summary=lambda r: "pooled")  # doctest: +SKIP
    ... def pixel_pairs(p: Pass) -> dict:
    ...     return {"value": float(p.accumulators["pixels"].pooled().sum())}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import PartkitError

if TYPE_CHECKING:
    from . import EvalOptions

REGIONS = ("fg", "full")
MATCHES = ("majority", "hungarian", "none")


def _pct(x: float) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x) * 100


def fmt(x: Optional[float]) -> str:
    """A score as the CLI table shows it (``-`` when undefined)."""
    return "-" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------
# Accumulators: prepare(view) decodes and validates (may raise BadSample); commit(payload)
# folds it in and cannot fail, so a bad sample never leaves a metric half-updated.

_ACCUMULATORS: dict[str, Callable[[EvalOptions, Sequence[str]], Any]] = {}


def register_accumulator(kind: str, factory: Callable[[EvalOptions, Sequence[str]], Any]) -> None:
    """Register ``factory(options, metric_names) -> accumulator`` under ``kind``.

    One accumulator of each kind in use is fed per pass, in registration order.
    """
    _ACCUMULATORS[kind] = factory


def accumulator_kinds() -> list[str]:
    return list(_ACCUMULATORS)


def create_accumulator(kind: str, options: EvalOptions, names: Sequence[str]):
    return _ACCUMULATORS[kind](options, names)


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass
class Pass:
    """What a metric's result function reads: the accumulators fed by the scored pass."""

    options: EvalOptions
    names: list[str]  # the metrics asked for
    accumulators: dict[str, Any]
    fit: dict[str, Any]  # accumulators of the --match-on pass (empty without --match-on)
    samples: int
    part_names: dict = field(default_factory=dict)  # {ground-truth id: name} ('part_names' in the samples' json)

    def named(self, ids) -> dict:
        """``{"id": name}`` for those of ``ids`` (ints or strings) that have a name."""
        return {str(i): self.part_names[int(i)] for i in ids if int(i) in self.part_names}


@dataclass(frozen=True)
class Metric:
    """One metric: how it is computed, what it reads, which options it uses, how the table shows it."""

    name: str
    family: str
    result: Callable[[Pass], dict]
    accumulator: Union[str, Callable[[EvalOptions], str]]  # the accumulator kind it reads
    summary: Callable[[dict], str]  # the protocol column of the CLI table, from the result
    options: tuple[str, ...] = ()  # EvalOptions fields it reads
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # option -> allowed values
    at_least_1: tuple[str, ...] = ()  # integer options (or lists of them) that must be >= 1
    positive: tuple[str, ...] = ()  # number options that must be > 0
    fit: Optional[str] = None  # accumulator kind fitted on --match-on shards, when it has that option

    def kind(self, options: EvalOptions) -> str:
        return self.accumulator(options) if callable(self.accumulator) else self.accumulator

    def summary_row(self, result: dict) -> tuple[str, str]:
        """(value, protocol) columns of the CLI table."""
        return fmt(result.get("value")), self.summary(result)


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, accumulator, summary, family: Optional[str] = None, options: Sequence[str] = (),
                    choices: Optional[Mapping[str, Sequence[str]]] = None, at_least_1: Sequence[str] = (),
                    positive: Sequence[str] = (), fit: Optional[str] = None):
    """Register the decorated ``result(p: Pass) -> dict`` as metric ``name`` (``family``: its module).

    ``choices``, ``at_least_1`` and ``positive`` declare the checks of the options the metric uses;
    ``fit`` names the accumulator kind a ``--match-on`` pass feeds for it.
    """
    def decorate(fn):
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is already registered (by {_METRICS[name].family})")
        declared = {k: tuple(v) for k, v in (choices or {}).items()}
        used = tuple(dict.fromkeys([*options, *declared, *at_least_1, *positive, *(["match_on"] if fit else [])]))
        _METRICS[name] = Metric(name, family or fn.__module__.rsplit(".", 1)[-1], fn, accumulator, summary, used,
                                declared, tuple(at_least_1), tuple(positive), fit)
        return fn

    return decorate


def registered_metrics() -> dict[str, Metric]:
    """Name -> :class:`Metric`, in registration order."""
    return dict(_METRICS)


def list_metrics() -> list[str]:
    """Registered metric names, in registration order."""
    return list(_METRICS)


def get_metric(name: str) -> Metric:
    if name not in _METRICS:
        raise PartkitError(f"unknown metric {name!r}; choose from {', '.join(_METRICS)}")
    return _METRICS[name]
