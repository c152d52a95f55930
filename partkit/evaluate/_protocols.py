"""Evaluation protocols: named presets of :class:`~partkit.evaluate.EvalOptions`, kept in this one place.

A protocol sets options to the values a paper's own evaluation code uses; an option given
explicitly wins over the preset, and the report records both (``report["protocol"]``). Each
protocol also names, per metric, the official file whose computation partkit reproduces.

Example:
    >>> PROTOCOLS["partdistillation"].options["miou"]
    'official'
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..errors import PartkitError

if TYPE_CHECKING:
    from . import EvalOptions


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    options: Mapping[str, Any]  # EvalOptions field -> value
    official: Mapping[str, str]  # metric -> the official code (or paper section) reproduced
    # Preset options EvalOptions does not have yet (applied once it has them; listed in the report).
    pending: Mapping[str, Any] = field(default_factory=dict)


_PD = "facebookresearch/PartDistillation part_distillation/evaluation/"

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol(
        "partdistillation", "PartDistillation (Cho et al., CVPR 2023): mIoU per object class, NMI/ARI, AR@k",
        options={"miou": "official", "match": "majority", "region": "fg", "average": "class",
                 "ks": (1, 10, 50, 100, 200)},
        official={
            "miou": _PD + "miou_matcher.py (majority_voting) + miou_evaluator.py (measure_mIOU, C-/A-mIoU)",
            "ar": _PD + "proposal_evaluator.py (limits 1, 10, 50, 100, 200; it matches best-IoU-first, partkit "
                        "in COCO's score order: see the README)",
            "nmi": "no file in the official evaluation/ folder; Tab. 2 follows Choudhury et al. 2021 "
                   "(foreground pixels) and averages over object classes",
            "ari": "no file in the official evaluation/ folder; Tab. 2 follows Choudhury et al. 2021 "
                   "(foreground pixels) and averages over object classes",
        }),
    Protocol(
        "choudhury", "Choudhury et al. 2021 (unsup-parts): foreground NMI/ARI, keypoint NMI/ARI, keypoint "
                     "regression",
        options={"region": "fg", "at": "pixels", "kpt_min_visibility": 1, "average": "pooled"},
        official={
            "nmi": "subhc/unsup-parts evaluation/DeepFashion eval.ipynb (fg pixels, pooled); with --at keypoints "
                   "evaluation/CUB eval.ipynb (get_nmi_inputs)",
            "ari": "subhc/unsup-parts evaluation/DeepFashion eval.ipynb (fg pixels, pooled); with --at keypoints "
                   "evaluation/CUB eval.ipynb (get_nmi_inputs)",
            "kpt-regression": "Huang & Li interpretability-by-parts src/cub200/eval_interp.py, whose helpers "
                              "subhc/unsup-parts evaluation/CUB eval.ipynb carries",
        }),
    Protocol(
        "shapenetpart", "ShapeNetPart part segmentation: instance mIoU (mean over shapes) and class mIoU",
        options={"match": "none"},
        official={"miou-3d": "ardianumam/PartDistill util.py compute_overall_iou_batchwise (per shape, mean part "
                             "IoU over the category's parts, a part absent from truth and prediction counting 1, "
                             "as PointCLIPv2)"}),
    Protocol(
        "zhu", "Zhu et al. part retrieval: keypoint-centred crops through the backbone, ranked by cosine similarity",
        options={"retrieval_features": "patches", "exclude_self": True, "probe_iters": 160_000},
        official={"retrieval": "Zhu et al., Sec. 4.2 'Part retrieval' and App. A.3 (the paper; no official "
                               "evaluation code checked); patches from `extract --patches-at keypoints`",
                  "part-cls": "Zhu et al., Sec. 4.2 'Part classification' (linear probing: SGD lr 0.4, momentum "
                              "0.9, no weight decay, 90 epochs, batch 1024; the paper, no official code checked)",
                  "linear-seg": "Zhu et al., Sec. 4.2 'Part segmentation' and App. A.5 (1x1 conv after x4 bilinear "
                                "upsampling, AdamW lr 4e-4, 160k iterations, batch 16; the paper)"}),
]}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise PartkitError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def given_options(o: EvalOptions, given: Optional[Sequence[str]]) -> list[str]:
    """The options set explicitly: ``given``, or (None) the fields that differ from their defaults."""
    if given is not None:
        return [g for g in dict.fromkeys(given) if g not in ("protocol", "given")]
    defaults = type(o)()
    return [f.name for f in fields(o) if f.name not in ("protocol", "given")
            and _norm(getattr(o, f.name)) != _norm(getattr(defaults, f.name))]


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def apply_protocol(o: EvalOptions, given: Sequence[str]) -> dict:
    """Set ``o``'s preset options that were not given; returns the record for the report."""
    record: dict = {"name": o.protocol, "explicit": {g: _norm(getattr(o, g)) for g in given}}
    if o.protocol is None:
        return record
    p = get_protocol(o.protocol)
    names = {f.name for f in fields(o)}
    preset = {**p.options, **{k: v for k, v in p.pending.items() if k in names}}
    set_, overridden = {}, {}
    for name, value in preset.items():
        if name in given:
            if _norm(getattr(o, name)) != _norm(value):
                overridden[name] = {"preset": _norm(value), "given": _norm(getattr(o, name))}
        else:
            setattr(o, name, value)
            set_[name] = _norm(value)
    record.update({"description": p.description, "set": set_, "overridden": overridden,
                   "official": dict(p.official),
                   "pending": {k: v for k, v in p.pending.items() if k not in names}})
    return record
