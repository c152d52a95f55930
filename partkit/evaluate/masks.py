"""The mask family: ar (average recall of proposals) and mask-ap (COCO mask AP)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from .. import fields, metrics as M, rle
from .._log import log
from ..errors import BadSample
from ._registry import Pass, _pct, fmt, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView


class _Masks:
    """Ground-truth masks and proposals per image, for AR@k (streamed) and COCO mask AP (kept)."""

    def __init__(self, o: EvalOptions, recall: bool, ap: bool):
        self.o, self.want_recall, self.want_ap = o, recall, ap
        self.recall = M.RecallAccumulator(o.ks)
        self.images: list[dict] = []
        self.dets: list[dict] = []
        self.with_category = set()  # whether proposals carried category_id, per sample
        self.available: list[int] = []  # proposals per image, to say how many each AR@k could use

    def _gt_masks(self, v: SampleView) -> list[dict]:
        height, width = v.shape
        if self.o.gt == "objects":
            objs = fields.objects(v.sample)
            rles = fields.masks([o["segmentation"] for o in objs], v.key, "gt_objects.json", height, width)
            return [{"segmentation": r, "category_id": int(o.get("category_id", 1)),
                     "iscrowd": int(o.get("iscrowd", 0))} for o, r in zip(objs, rles)]
        gt = v.gt
        counts = np.bincount(gt.ravel())
        ids = [i for i in np.flatnonzero(counts) if i not in (0, v.ignore_id)]
        out = [{"segmentation": rle.encode(gt == i), "category_id": int(i), "iscrowd": 0} for i in ids]
        if v.valid is not None:
            # Void pixels become a crowd region: COCOeval ignores detections that fall on it.
            out.append({"segmentation": rle.encode(~v.valid), "category_id": None, "iscrowd": 1})
        return out

    def prepare(self, v: SampleView):
        height, width = v.shape
        parsed = [{"segmentation": p["segmentation"], "score": p["score"], "category_id": p.get("category_id")}
                  for p in fields.proposals(v.sample, self.o.proposals, height, width)]
        has_cat = {p["category_id"] is not None for p in parsed}
        if len(has_cat) > 1:
            raise BadSample(v.key, f"some proposals in '{self.o.proposals}' have a category_id and some do not")
        parsed.sort(key=lambda p: -p["score"])  # stable: equal scores keep file order
        gts = self._gt_masks(v)
        iou = None
        if self.want_recall:
            real = [g["segmentation"] for g in gts if not g["iscrowd"]]
            iou = M.mask_iou([p["segmentation"] for p in parsed[:max(self.o.ks)]], real)
        return v.index, v.key, height, width, parsed, gts, iou, has_cat

    def commit(self, payload) -> None:
        index, key, height, width, parsed, gts, iou, has_cat = payload
        if self.want_recall:
            self.recall.update(iou)
            self.available.append(len(parsed))
        if self.want_ap:
            self.with_category |= has_cat
            self.images.append({"id": index + 1, "height": height, "width": width, "file_name": key,
                                "annotations": gts})
            self.dets.extend({"image_id": index + 1, **p} for p in parsed)

    def results(self, names) -> dict:
        out = {}
        if "ar" in names:
            ar = self.recall.result()
            out["ar"] = {"value": _pct(ar[max(self.o.ks)]), **{f"ar@{k}": _pct(v) for k, v in ar.items()},
                         "gt_masks": self.recall.n_gt_, "gt": self.o.gt,
                         "proposals_available": _available(self.available, self.o.ks)}
        if "mask-ap" in names:
            images, agnostic = self.ap_images()
            if not agnostic and self.o.gt == "parts":
                log("mask-ap: proposals carry category_id; comparing it with the ground-truth part ids")
            ap = M.coco_mask_ap(images, self.dets, class_agnostic=agnostic, max_dets=self.o.max_dets)
            out["mask-ap"] = {"value": _pct(ap["ap"]), "ap50": _pct(ap["ap50"]), "ap75": _pct(ap["ap75"]),
                              "class_agnostic": agnostic, "max_dets": self.o.max_dets, "gt": self.o.gt,
                              "detections": len(self.dets)}
        return out

    def ap_images(self) -> tuple[list[dict], bool]:
        """The images mask-ap scores (ground truth per image) and whether the scoring is class-agnostic
        (no proposal carried category_id); ``partkit export coco`` writes the same."""
        agnostic = True not in self.with_category
        images = self.images
        if not agnostic:
            # A crowd (void) region must carry a category: give each image's one to all its categories.
            images = [dict(img, annotations=_expand_crowd(img["annotations"])) for img in images]
        return images, agnostic

    def coco(self) -> tuple[dict, list[dict], bool]:
        """The COCO ground-truth dataset and results that mask-ap scores, and whether class-agnostic."""
        images, agnostic = self.ap_images()
        dataset, dets = M.coco_dataset(images, self.dets, class_agnostic=agnostic)
        return dataset, dets, agnostic


def _available(counts: list[int], ks) -> dict:
    """Per k, the proposals AR@k could use per image (mean, min) and the images that had fewer than k."""
    n = np.asarray(counts, np.int64)
    out = {}
    for k in sorted({int(k) for k in ks}):
        used = np.minimum(n, k)
        out[f"ar@{k}"] = {"mean": float(used.mean()) if n.size else 0.0, "min": int(used.min()) if n.size else 0,
                          "images_short": int((n < k).sum())}
    return out


def _expand_crowd(anns: list[dict]) -> list[dict]:
    cats = sorted({a["category_id"] for a in anns if not a["iscrowd"]})
    out = [a for a in anns if not a["iscrowd"] or a["category_id"] is not None]
    for a in anns:
        if a["iscrowd"] and a["category_id"] is None:
            out.extend(dict(a, category_id=c) for c in cats)
    return out


register_accumulator("masks", lambda o, names: _Masks(o, "ar" in names, "mask-ap" in names))


_GT = {"gt": ("parts", "objects")}


def _ar_summary(r: dict) -> str:
    avail = r.get("proposals_available", {})
    parts = []
    for k in (k for k in r if k.startswith("ar@")):
        a = avail.get(k)
        short = ""
        if a and a["images_short"]:  # AR@k with fewer than k proposals is AR at what there was
            short = f" (!{a['images_short']} img < {k[3:]} proposals; mean {a['mean']:g})"
        parts.append(f"{k.upper()} {fmt(r[k])}{short}")
    return ", ".join(parts) + f" over {r['gt_masks']} GT masks"


@register_metric("ar", accumulator="masks", summary=_ar_summary, options=("proposals", "gt_field"), choices=_GT,
                 at_least_1=("ks",))
def ar(p: Pass) -> dict:
    """Average recall at k proposals per image, pooled over the dataset."""
    return p.accumulators["masks"].results(["ar"])["ar"]


def _mask_ap_summary(r: dict) -> str:
    agn = "class-agnostic" if r["class_agnostic"] else "per class"
    return f"AP50 {fmt(r['ap50'])}, AP75 {fmt(r['ap75'])}; {agn}, {r['detections']} detections"


@register_metric("mask-ap", accumulator="masks", summary=_mask_ap_summary, options=("proposals", "gt_field"),
                 choices=_GT, at_least_1=("max_dets",))
def mask_ap(p: Pass) -> dict:
    """COCO mask AP of the proposals (class-agnostic unless they carry category_id)."""
    return p.accumulators["masks"].results(["mask-ap"])["mask-ap"]
