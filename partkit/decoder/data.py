"""Training examples for the part decoder: features + grid-aligned target label maps.

Every proposal (a non-zero id of ``parts.png``, or of any label-map field) becomes one target
mask. Targets live at twice the feature-grid resolution, the resolution of the mask features.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadSample, PartkitError
from ..grid import sample_on_grid
from ..fields import IGNORE_IDS, SALIENCY_THRESHOLD, PartNames, features, objects_from
from ..io import decode_label_map

__all__ = ["Example", "targets_from_sample", "augment", "collate", "training_view", "mask_targets", "MASK_FACTOR",
           "class_list", "assign_classes"]

MASK_FACTOR = 2  # mask features are at 2x the feature grid


@dataclass
class Example:
    key: str
    feat: torch.Tensor  # C x h x w (float16 in memory)
    target: np.ndarray  # (MASK_FACTOR*h) x (MASK_FACTOR*w) int32 ids, 0 = none
    ids: np.ndarray  # proposal ids kept as targets
    classes: np.ndarray  # class index per kept id (0 = "part" when class-agnostic)
    meta: dict
    # a training view made in the loader's workers (:func:`training_view`): (augmented features, mask targets)
    view: Optional[tuple] = None


def grid_labels(sample: dict, field: str, meta: dict) -> np.ndarray:
    """A label-map field resampled onto the feature grid at MASK_FACTOR x resolution."""
    labels = decode_label_map(sample, field).astype(np.int32)
    gh, gw = meta["grid"]
    if labels.shape == (gh, gw):  # already at grid resolution (cluster's default)
        return np.repeat(np.repeat(labels, MASK_FACTOR, 0), MASK_FACTOR, 1)
    H, W = meta["image_size"]
    if labels.shape != (H, W):
        raise BadSample(sample["__key__"], f"label map '{field}' is {labels.shape[1]}x{labels.shape[0]}, neither "
                                           f"the feature grid {gw}x{gh} nor the image {W}x{H}; regenerate it")
    return sample_on_grid(labels, meta, MASK_FACTOR)


def targets_from_sample(sample: dict, meta: dict, *, field: str = "parts.png", min_part_area: float = 0.05,
                        ignore: tuple = tuple(IGNORE_IDS.values()), class_map: Optional[dict] = None,
                        objects: Optional[str] = None, fg_threshold: float = SALIENCY_THRESHOLD) -> tuple:
    """(target id map, kept ids, class per id). A proposal is kept when it covers at least
    ``min_part_area`` of its object and lies mostly (>= 50%) inside an object. The objects come from
    ``objects`` (a :data:`partkit.fields.OBJECT_SOURCES` name: gt_objects, gt_parts or saliency with
    ``fg_threshold``); None: ``gt_objects.json`` when the sample has it, else the label map's own
    foreground. ``field=None`` gives no targets (unlabelled data for self-training)."""
    if field is None:
        gh, gw = meta["grid"]
        return np.zeros((gh * MASK_FACTOR, gw * MASK_FACTOR), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    target = grid_labels(sample, field, meta)
    ids = None  # dense id -> original id, for 32-bit maps with large ids (counted densely)
    if target.min(initial=0) >= 0 and target.max(initial=0) <= 65535:  # uint8 / uint16 maps
        clean = np.arange(int(target.max(initial=0)) + 1, dtype=np.int32)
        clean[[i for i in ignore if i < len(clean)]] = 0
        target = clean[target]
    else:  # negative ids (32-bit maps) are no part either
        target[np.isin(target, ignore) | (target < 0)] = 0
        ids, dense = np.unique(target, return_inverse=True)
        if ids[0] != 0:
            ids, dense = np.concatenate([[0], ids]), dense + 1
        target = dense.reshape(target.shape).astype(np.int32)
    dense = _kept(sample, target, meta, min_part_area, objects, fg_threshold)
    kept = (dense if ids is None else ids[dense]).astype(np.int64)
    lut = np.zeros(int(target.max(initial=0)) + 1, np.int32)
    lut[dense] = kept
    classes = [0 if class_map is None else int(class_map.get(int(i), 0)) for i in kept]
    return lut[target], kept, np.asarray(classes, np.int64)


def _kept(sample: dict, target: np.ndarray, meta: dict, min_part_area: float, objects: Optional[str],
          fg_threshold: float) -> np.ndarray:
    """The ids of ``target`` (non-negative, counted with bincount) kept as targets (see targets_from_sample)."""
    counts = np.bincount(target.ravel())  # pixels per id
    ids = np.flatnonzero(counts[1:]) + 1
    areas = counts[ids]
    source = object_source(sample, objects)
    if source is not None:
        masks = objects_from(sample, source, meta["image_size"], fg_threshold=fg_threshold)[1]
        objects = [sample_on_grid(m.astype(np.uint8), meta, MASK_FACTOR) > 0 for m in masks]
    else:
        objects = [target > 0]
    if not objects or not len(ids):
        return ids[:0]
    # overlaps[o, j]: pixels of id j inside object o; each id goes to the object it overlaps most
    overlaps = np.stack([np.bincount(target[o], minlength=len(counts))[ids] for o in objects])
    best = np.argmax(overlaps, axis=0)
    obj_area = np.array([max(int(o.sum()), 1) for o in objects])
    inside = overlaps[best, np.arange(len(ids))] >= 0.5 * areas
    return ids[inside & (areas >= min_part_area * obj_area[best])]


def object_source(sample: dict, objects: Optional[str]) -> Optional[str]:
    """The object source a training sample uses: ``objects`` (``--objects-from``) when given, else
    ``gt_objects`` when the sample has ``gt_objects.json``, else None (no object masks)."""
    if objects is not None:
        return objects
    return "gt_objects" if "gt_objects.json" in sample else None


def example_from_sample(sample: dict, *, field: Optional[str] = "parts.png", min_part_area: float = 0.05,
                        class_map: Optional[dict] = None, objects: Optional[str] = None,
                        fg_threshold: float = SALIENCY_THRESHOLD) -> Example:
    key = sample["__key__"]
    feat, meta = features(sample, require_geometry=True)
    target, ids, classes = targets_from_sample(sample, meta, field=field, min_part_area=min_part_area,
                                               class_map=class_map, objects=objects, fg_threshold=fg_threshold)
    return Example(key, torch.from_numpy(feat.astype(np.float16)), target, ids, classes, meta)


def augment(ex: Example, size: int, gen: torch.Generator, train: bool = True,
            scale=(0.5, 1.0), flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop + horizontal flip on the grid: (C x size x size feats, 2size x 2size ids)."""
    feat = ex.feat.float()
    tgt = torch.from_numpy(ex.target)
    C, h, w = feat.shape
    if train:
        s = float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        ch, cw = max(1, round(h * s ** 0.5)), max(1, round(w * s ** 0.5))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        do_flip = flip and bool(torch.rand(1, generator=gen) < 0.5)
    else:
        ch, cw, y0, x0, do_flip = h, w, 0, 0, False
    feat = feat[:, y0:y0 + ch, x0:x0 + cw]
    tgt = tgt[y0 * MASK_FACTOR:(y0 + ch) * MASK_FACTOR, x0 * MASK_FACTOR:(x0 + cw) * MASK_FACTOR]
    if do_flip:
        feat, tgt = feat.flip(-1), tgt.flip(-1)
    feat = F.interpolate(feat[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    tgt = F.interpolate(tgt[None, None].float(), size=(size * MASK_FACTOR,) * 2, mode="nearest")[0, 0].long()
    return feat, tgt


def mask_targets(tgt: torch.Tensor, ex: Example) -> dict:
    """One binary mask (and class index) per target id of ``ex`` still visible in the augmented id map ``tgt``."""
    present = [(i, c) for i, c in zip(ex.ids.tolist(), ex.classes.tolist()) if bool((tgt == i).any())]
    ids = torch.tensor([i for i, _ in present], dtype=torch.long)
    masks = (tgt[None] == ids[:, None, None]) if len(present) else torch.zeros(0, *tgt.shape, dtype=torch.bool)
    return {"masks": masks, "labels": torch.tensor([c for _, c in present], dtype=torch.long)}


def training_view(ex: Example, gen: torch.Generator, *, size: int) -> Example:
    """What a training step stacks for ``ex``: its augmented features and mask targets (:func:`augment`,
    drawn from ``gen``) as ``view``; the full-size grids are dropped (the loader's workers make views, and
    send only them)."""
    feat, tgt = augment(ex, size, gen)
    out = copy.copy(ex)
    out.feat, out.target, out.view = None, None, (feat, mask_targets(tgt, ex))
    return out


def collate(items: list[tuple[torch.Tensor, torch.Tensor]], examples: list[Example], device) -> tuple:
    """Stack features; per image, one binary mask per target id still visible after augmentation."""
    feats = torch.stack([f for f, _ in items]).to(device)
    targets = [{k: v.to(device) for k, v in mask_targets(tgt, ex).items()} for (_, tgt), ex in zip(items, examples)]
    return feats, targets


def class_list(examples: list, field: Optional[str], class_aware: Optional[bool] = None) -> Optional[list]:
    """The classes a decoder learns from ``examples``: ``[[label id, name], ...]`` sorted by id, pooled
    over every example's class list (:func:`partkit.fields.label_classes`, kept by ``load_examples`` as
    ``ex.label_classes``); None = class-agnostic. ``class_aware`` None: class-aware when the field
    names classes; False: class-agnostic; True: a class list is required."""
    from .._log import log

    if class_aware is False or field is None:
        return None
    names = PartNames()
    for ex in examples:
        for message in names.add(getattr(ex, "label_classes", None) or {}, ex.key):
            log(f"warning: {message}")
    if not names.names:
        if class_aware:
            raise PartkitError(f"class-aware training needs a class list for '{field}', and no sample has one: "
                               "targets.png comes with targets.json (`rank apply --as-targets`), gt_parts.png with "
                               "json part_names (`pack --label-names FILE` or `--coco-as parts`); or train "
                               "class-agnostic (drop --class-aware)")
        return None
    return [[i, names.names[i]] for i in sorted(names.names)]


def assign_classes(examples: list, classes: Optional[list], field: str, on_bad) -> list:
    """Set each example's ``classes`` (class index per kept id) from ``classes``; an example with an id
    outside the class list is a bad sample (``on_bad``), since its pixels would be learnt as no class."""
    if classes is None:
        return examples
    index = {int(i): c for c, (i, _) in enumerate(classes)}
    kept = []
    for ex in examples:
        missing = [int(i) for i in ex.ids if int(i) not in index]
        if missing:
            on_bad(BadSample(ex.key, f"'{field}' has ids {missing[:5]} that its class list does not name; add them "
                                     "to the class list (targets.json classes / json part_names) or drop the sample"))
            continue
        ex.classes = np.asarray([index[int(i)] for i in ex.ids], np.int64)
        kept.append(ex)
    return kept
