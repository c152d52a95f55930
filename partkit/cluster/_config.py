"""Every option of ``partkit cluster`` once: :class:`ClusterConfig`, its checks and the per-scope defaults.

:func:`start` turns a validated config into the :class:`Job` the scopes read (the device, the
loaded centroid files, the feature-source check).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np

from .. import fields
from .._runtime import resolve_device
from ..errors import PartkitError
from ..kmeans import INITS, METRICS

SCOPES = ("image", "object", "dataset", "cosegment")
FG_SOURCES = fields.OBJECT_SOURCES
DEFAULT_K = {"image": 25, "object": 4, "dataset": 25, "cosegment": 4}
DEFAULT_FG = {"image": None, "object": "gt_objects", "dataset": None, "cosegment": "saliency"}
DEFAULT_ITERS = {"dataset": 25}  # Lloyd iterations; 100 elsewhere


def _check_choice(value, choices, option: str):
    if value not in choices:
        raise PartkitError(f"unknown {option} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


@dataclass
class ClusterConfig:
    """Every option of ``partkit cluster`` (the CLI flags, with dashes; ``max_iter`` is ``--iters``).

    ``None`` means the scope's default (:data:`DEFAULT_K`, ``fg_from`` per scope, ``max_iter`` 100 or
    25 for ``dataset``); :meth:`validate` checks every option and fills those defaults in.
    """

    scope: str = "image"
    k: Union[int, str, None] = None  # a number or "auto" (elbow rule)
    metric: str = "cosine"
    init: str = "auto"
    max_iter: Optional[int] = None
    tol: float = 1e-4
    seed: int = 0
    device: str = "auto"
    fg_from: Optional[str] = None
    fg_threshold: float = fields.SALIENCY_THRESHOLD
    coverage: float = 0.5
    upsample: str = "grid"
    min_area: float = 0
    min_area_action: str = "merge"
    warm_start: Optional[str] = None  # a .npy of k x C centroids, or "parts"
    centroids: Optional[str] = None  # dataset: assign to these, no fit
    save_centroids: Optional[str] = None
    fit_on: Optional[Sequence[str]] = None
    group_by: Optional[str] = "category"  # cosegment; "none" = one group
    votes: float = 0.75
    elbow: float = 0.975
    k_max: int = 14
    max_points_per_centroid: int = 256
    batch_size: int = 64

    def validate(self) -> "ClusterConfig":
        """A copy with the scope's defaults filled in; a bad option raises :class:`PartkitError` naming the fix."""
        scope, k = self.scope, self.k
        k = DEFAULT_K.get(scope, 4) if k is None else k
        if isinstance(k, str) and k != "auto":
            if not k.strip().isdigit():
                raise PartkitError(f"-k must be a positive integer or 'auto', got {k!r}")
            k = int(k)
        fg_from = DEFAULT_FG.get(scope) if self.fg_from is None else self.fg_from
        group_by = None if self.group_by is not None and self.group_by.lower() == "none" else self.group_by
        _check_choice(scope, SCOPES, "--scope")
        _check_choice(self.metric, METRICS, "--metric")
        _check_choice(self.init, INITS, "--init")
        _check_choice(self.upsample, ("grid", "image"), "--upsample")
        _check_choice(self.min_area_action, ("merge", "drop"), "--min-area-action")
        if fg_from is not None:
            _check_choice(fg_from, FG_SOURCES, "--fg-from")
            if scope == "image":
                raise PartkitError("--fg-from does not apply to --scope image (it clusters every cell); "
                                   "use --scope object --fg-from ... to cluster only the foreground")
        if k == "auto":
            if scope == "dataset":
                raise PartkitError("--k auto picks k per image, object or group; give --scope dataset a number, "
                                   "e.g. -k 25")
        elif not isinstance(k, (int, np.integer)) or k < 1:
            raise PartkitError(f"-k must be a positive integer or 'auto', got {k!r}")
        max_iter, mppc = self.max_iter, self.max_points_per_centroid
        checks = [
            (max_iter is None or max_iter >= 1, f"--iters must be at least 1, got {max_iter}"),
            (self.tol >= 0, f"--tol must be >= 0, got {self.tol}"),
            (0 < self.coverage <= 1, f"--coverage must be in (0, 1], got {self.coverage}"),
            (self.min_area >= 0, f"--min-area must be >= 0 (cells, or a fraction below 1), got {self.min_area}"),
            (0 < self.elbow <= 1, f"--elbow must be in (0, 1], got {self.elbow}"),
            (self.k_max >= 2, f"--k-max must be at least 2, got {self.k_max}"),
            (0 < self.votes <= 1, f"--votes must be in (0, 1], got {self.votes}"),
            (mppc >= 1, f"--max-points-per-centroid must be at least 1, got {mppc}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.fg_threshold), f"--fg-threshold must be a number, got {self.fg_threshold}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PartkitError(message)
        warm_start, centroids, save_centroids = self.warm_start, self.centroids, self.save_centroids
        if scope != "dataset":
            for value, option in ((centroids, "--centroids"), (save_centroids, "--save-centroids"),
                                  (self.fit_on, "--fit-on")):
                if value:
                    raise PartkitError(f"{option} applies to --scope dataset only")
        if centroids and self.fit_on:
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
        return replace(self, k=k, fg_from=fg_from, group_by=group_by, seed=int(self.seed),
                       max_iter=max_iter or DEFAULT_ITERS.get(scope, 100))

    @property
    def warm_name(self) -> Optional[str]:
        return self.warm_start if self.warm_start in (None, "parts") else os.path.basename(self.warm_start)

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

    def fingerprint(self) -> dict:
        """What ``run_stage`` records (and a resumed run must match)."""
        return {"options": self.record(), "upsample": self.upsample, "centroids": self.centroids,
                "fit_on": list(self.fit_on or [])}


@dataclass
class Job:
    """A validated config and what it loads: every scope reads its options from here."""

    cfg: ClusterConfig
    device: "torch.device"
    warm: Union[None, str, np.ndarray]  # None, "parts", or a k x C array (--warm-start)
    centroids: Optional[np.ndarray] = None  # --centroids
    source: Optional[fields.FeatureSource] = None  # scopes dataset, cosegment: one model's features only


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


def start(config: ClusterConfig) -> Job:
    """Validate ``config``, load its centroid files (k follows them) and resolve the device."""
    cfg = config.validate()
    k, scope = cfg.k, cfg.scope
    warm: Union[None, str, np.ndarray] = None
    if cfg.warm_start == "parts":
        warm = "parts"
    elif cfg.warm_start:
        warm = _load_centroids(cfg.warm_start, "--warm-start")
        if isinstance(k, int) and k != DEFAULT_K.get(scope) and k != len(warm):
            raise PartkitError(f"--warm-start has {len(warm)} centroids but -k is {k}; drop -k or match it")
        k = len(warm)
    fixed = _load_centroids(cfg.centroids, "--centroids") if cfg.centroids else None
    if fixed is not None:
        if isinstance(k, int) and k != DEFAULT_K["dataset"] and k != len(fixed):
            raise PartkitError(f"--centroids has {len(fixed)} centroids but -k is {k}; drop -k or match it")
        k = len(fixed)
    return Job(replace(cfg, k=k), resolve_device(cfg.device), warm, fixed,
               fields.FeatureSource(f"cluster --scope {scope}") if scope in ("dataset", "cosegment") else None)

