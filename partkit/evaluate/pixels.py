"""The pixel family: nmi, ari (pooled over pixels or at keypoints, per object class too) and miou, over
label maps.

``miou`` has two computations (``--miou``): ``official``, PartDistillation's evaluator (per object
class, background a row and column of the confusion matrix), and ``pooled``, one table over the
``--region`` pixels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import metrics as M
from ..errors import PartkitError
from ._registry import MATCHES, REGIONS, Pass, _pct, fmt, register_accumulator, register_metric

MIOU = ("official", "pooled")

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


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


class _KeypointTable(_PixelTables):
    """Keypoint index x predicted id counts at visible keypoints, per object category."""

    def prepare(self, v: SampleView):
        x, y, kpt = v.visible_keypoints()
        return v.category, M.Contingency().update(kpt, v.pred[y, x])


def _region_rows(table: np.ndarray, region: str) -> np.ndarray:
    if region == "fg" and table.shape[0]:
        table = table.copy()
        table[0] = 0
    return table


def _clustering_info(table: np.ndarray, o: EvalOptions, where: str = "") -> tuple[np.ndarray, dict]:
    """The scored rows of a table (``--region``) and what the report says about them."""
    at_kpts = o.at == "keypoints"
    if not at_kpts:
        table = _region_rows(table, o.region)
    total = int(table.sum())
    if total == 0:
        what = "visible keypoints" if at_kpts else ("ground-truth foreground pixels" if o.region == "fg" else "pixels")
        hint = "" if at_kpts or o.region == "full" else "; use --region full to score the background too"
        raise PartkitError(f"no {what} to score in the input{where}{hint}")
    info = {"at": o.at, "pairs": total, "true_labels": int((table.sum(1) > 0).sum()),
            "pred_labels": int((table.sum(0) > 0).sum())}
    if not at_kpts:
        info["region"] = o.region
        if o.region == "fg" and table.shape[1]:
            info["pred_background_in_fg"] = _pct(table[:, 0].sum() / total)
    return table, info


_SCORES = {"nmi": M.nmi_score, "ari": M.ari_score}


def _clustering_results(name: str, tables: _PixelTables, o: EvalOptions) -> dict:
    """Pooled over the dataset, and per object class when samples carry one; ``value`` is the pooled
    score (``--average pooled``, Choudhury et al.) or the mean over classes (``class``, PartDistillation)."""
    score = _SCORES[name]
    table, info = _clustering_info(tables.pooled(), o)
    pooled = _pct(score(contingency=table))
    out = {"value": pooled, **info, "average": o.average, "pooled": pooled}
    if not tables.has_classes:
        if o.average == "class":
            raise PartkitError(f"--average class needs each sample's object class ('category' in its 'json'); "
                               f"none has one. Use --average pooled")
        return out
    per_class = {}
    for cat in sorted(tables.by_class, key=lambda c: (c is None, str(c))):
        label = "(none)" if cat is None else cat
        c_table = tables.by_class[cat].table_
        c_table = c_table if o.at == "keypoints" else _region_rows(c_table, o.region)
        if c_table.sum() == 0:  # a class with nothing to score has no score, and no vote in the mean
            per_class[label] = {"value": None, "pairs": 0}
            continue
        c_table, c_info = _clustering_info(c_table, o, f" in object class {label!r}")
        per_class[label] = {"value": _pct(score(contingency=c_table)), "pairs": c_info["pairs"],
                            "true_labels": c_info["true_labels"], "pred_labels": c_info["pred_labels"]}
    scored = [c["value"] for c in per_class.values() if c["value"] is not None]
    out["class_mean"] = float(np.mean(scored))
    out["classes"] = len(scored)
    out["per_class"] = per_class
    if o.average == "class":
        out["value"] = out["class_mean"]
    return out


def _ids(scores: np.ndarray, key: str) -> dict:
    return {str(i): _pct(scores[key][i]) for i in np.flatnonzero(~np.isnan(scores[key]))}


def _class_name(cat) -> str:
    return "(none)" if cat is None else str(cat)


def _official_miou(tables: _PixelTables, fit: Optional[_PixelTables], o: EvalOptions) -> dict:
    """PartDistillation's mIoU: per object class, the predicted ids matched to parts on that class's
    pixels (``miou_matcher.py``) and scored with background as a row and column (``miou_evaluator.py``).
    """
    by_class = tables.by_class
    gt_ids = set()
    for table in by_class.values():
        gt_ids.update(np.flatnonzero(table.table_.sum(1)).tolist())
    if not gt_ids - {0}:
        raise PartkitError("no ground-truth part pixels to score for miou (every pixel is background or void)")
    if o.match == "none":
        unknown = sorted({int(i) for t in by_class.values() for i in np.flatnonzero(t.table_.sum(0))} - gt_ids - {0})
        if unknown:
            shown = ", ".join(map(str, unknown[:20])) + (", ..." if len(unknown) > 20 else "")
            raise PartkitError(f"--match none takes predicted ids as part ids, but predicted ids {shown} are no "
                               f"ground-truth part id (those are {_id_list(gt_ids - {0})}); use --match majority "
                               f"to fit a mapping, or pass the prediction made with the ground truth's ids")
    per_class, keys = {}, ("miou", "macc", "miopred")
    means: dict[str, list] = {k: [] for k in keys}
    pairs: dict[str, list] = {k: [] for k in ("iou", "acc", "iopred")}
    for cat in sorted(by_class, key=lambda c: (c is None, str(c))):
        table = by_class[cat].table_
        if table.shape[0] < 2 or not table[1:].any():
            raise PartkitError(f"object class {cat!r} has no ground-truth part pixels; its official mIoU is 0/0 "
                               f"and would make C-mIoU undefined; drop its samples or label their parts")
        fit_table = table
        if fit is not None:
            if cat not in fit.by_class:
                raise PartkitError(f"object class {cat!r} has no samples in the --match-on shards to fit on")
            fit_table = fit.by_class[cat].table_
        n_pred = max(table.shape[1], fit_table.shape[1])
        mapping = M.match_to_parts(fit_table, o.match, n_pred=n_pred)
        scores = M.official_part_scores(M.part_confusion(table, mapping))
        for k in keys:
            means[k].append(scores[k])
        for k in pairs:
            pairs[k].extend(scores[k][~np.isnan(scores[k])])
        seen = np.zeros(n_pred, bool)
        for t in (table, fit_table):
            seen[:t.shape[1]] |= t.sum(0) > 0
        per_class[_class_name(cat)] = {
            **{k: _pct(scores[k]) for k in (*keys, "fwiou", "pacc")},
            "iou": _ids(scores, "iou"), "acc": _ids(scores, "acc"), "iopred": _ids(scores, "iopred"),
            "mapping": {str(c): int(m) for c, m in enumerate(mapping) if c > 0 and seen[c]}}
    out = {"value": _pct(np.mean(means["miou"])), "miou": "official", "match": o.match,
           "fitted_on": "match-on shards" if fit else "scored data", "classes": len(per_class),
           "c_miou": _pct(np.mean(means["miou"])), "a_miou": _pct(np.mean(pairs["iou"])),
           "c_macc": _pct(np.mean(means["macc"])), "a_macc": _pct(np.mean(pairs["acc"])),
           "c_miopred": _pct(np.mean(means["miopred"])),
           "a_miopred": _pct(np.mean(pairs["iopred"])) if pairs["iopred"] else None}
    if len(per_class) == 1:  # one class: its details at the top, as the pooled computation has them
        only = next(iter(per_class.values()))
        out.update({k: only[k] for k in ("iou", "acc", "iopred", "mapping")})
    out["per_class"] = per_class
    return out


def _id_list(ids) -> str:
    ids = sorted(int(i) for i in ids)
    return ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")


def _miou_result(tables: _PixelTables, fit: Optional[_PixelTables], o: EvalOptions) -> dict:
    if o.miou == "official":
        return _official_miou(tables, fit, o)
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
           "miou": "pooled", "region": o.region, "match": o.match, "fitted_on": "match-on shards" if fit else "scored data"}
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


AVERAGES = ("pooled", "class")  # nmi/ari --average: value pooled over the dataset, or the mean over object classes

register_accumulator("pixels", lambda o, names: _PixelTables())
register_accumulator("keypoints", lambda o, names: _KeypointTable())  # nmi/ari --at keypoints


def _clustering_table(o: EvalOptions) -> str:
    return "keypoints" if o.at == "keypoints" else "pixels"


def _clustering(p: Pass, name: str) -> dict:
    return _clustering_results(name, p.accumulators[_clustering_table(p.options)], p.options)


def _clustering_summary(r: dict) -> str:
    where = f"keypoints ({r['pairs']} visible)" if r["at"] == "keypoints" else f"{r['region']} pixels ({r['pairs']:,})"
    labels = f"{r['true_labels']} true x {r['pred_labels']} predicted labels"
    if r["average"] == "class":
        return f"mean over {r['classes']} object classes of scores pooled over {where}; {labels}"
    extra = f"; mean over {r['classes']} classes {fmt(r['class_mean'])}" if "class_mean" in r else ""
    return f"pooled over {where}; {labels}{extra}"


_CLUSTERING = dict(accumulator=_clustering_table, summary=_clustering_summary, options=("pred", "gt_field"),
                   choices={"region": REGIONS, "at": ("pixels", "keypoints"), "average": AVERAGES})


@register_metric("nmi", **_CLUSTERING)
def nmi(p: Pass) -> dict:
    """Normalised mutual information of ground-truth parts and predicted ids, pooled over the dataset
    (``per_class`` too; ``--average class``: ``value`` is their mean)."""
    return _clustering(p, "nmi")


@register_metric("ari", **_CLUSTERING)
def ari(p: Pass) -> dict:
    """Adjusted Rand index of ground-truth parts and predicted ids, pooled over the dataset
    (``per_class`` too; ``--average class``: ``value`` is their mean)."""
    return _clustering(p, "ari")


def _miou_summary(r: dict) -> str:
    if r["miou"] == "official":
        parts = sum(len(c["iou"]) for c in r["per_class"].values())
        return (f"official (PartDistillation): C-mIoU over {r['classes']} object class(es), {r['match']} matching "
                f"per class fitted on {r['fitted_on']}, background counted; A-mIoU {fmt(r['a_miou'])} over "
                f"{parts} class-part pairs, C-mACC {fmt(r['c_macc'])}, C-mIoPred {fmt(r['c_miopred'])}")
    extra = f"; C-mIoU {fmt(r['c_miou'])}, A-mIoU {fmt(r['a_miou'])}" if "c_miou" in r else ""
    return f"{r['match']} matching fitted on {r['fitted_on']}, {r['region']} pixels, {len(r['iou'])} parts{extra}"


@register_metric("miou", accumulator="pixels", summary=_miou_summary, options=("pred", "gt_field"),
                 choices={"miou": MIOU, "region": REGIONS, "match": MATCHES}, fit="pixels")
def miou(p: Pass) -> dict:
    """Mean IoU of parts after matching predicted ids to parts: PartDistillation's C-mIoU (``--miou
    official``, the default) or one pooled table over ``--region`` pixels (``--miou pooled``).

    When the samples name their parts (``part_names`` in ``json``), ``part_names`` gives the name of
    each scored part id and ``named_iou`` its IoU by name (per class too)."""
    out = _miou_result(p.accumulators["pixels"], p.fit.get("pixels"), p.options)
    if p.part_names:
        for entry in [out, *out.get("per_class", {}).values()]:
            if "iou" in entry:
                entry["named_iou"] = {_part_label(p, i): v for i, v in entry["iou"].items()}
        ids = set(out.get("iou", {})).union(*(c.get("iou", {}) for c in out.get("per_class", {}).values()))
        out["part_names"] = p.named(sorted(ids, key=int))
    return out


def _part_label(p: Pass, i) -> str:
    """A part's name, or ``part <id>`` when it has none; ``name (id)`` when two ids share the name."""
    name = p.part_names.get(int(i))
    if name is None:
        return f"part {i}"
    return name if list(p.part_names.values()).count(name) == 1 else f"{name} ({i})"
