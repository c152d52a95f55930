"""COCO run-length encoded masks: the one wrapper around pycocotools.

A mask in a sample (``gt_objects.json``, ``proposals.json``, docs/FORMAT.md) is a compressed
RLE ``{"size": [h, w], "counts": str}``. This module encodes, converts, decodes and compares
them, and runs COCO's mask evaluation. It knows nothing of samples: malformed input raises
``ValueError`` with a reason, which :mod:`partkit.fields` turns into a bad-sample error.

Example:
    >>> m = np.zeros((4, 5), bool); m[1:3, 2:4] = True
    >>> r = encode(m); area(r), bbox(r)
    (4.0, [2.0, 1.0, 2.0, 2.0])
    >>> bool((decode([r])[0] == m).all())
    True
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Optional, Sequence

import numpy as np
from pycocotools import mask as _mask

__all__ = ["encode", "to_compressed", "pixels", "decode", "area", "bbox", "iou", "coco_evaluate"]


def _coco(rle: dict) -> dict:
    """The form pycocotools takes: counts as bytes."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def encode(mask: np.ndarray) -> dict:
    """An H x W boolean mask as a compressed RLE ``{"size": [h, w], "counts": str}``."""
    rle = _mask.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_compressed(seg, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE at
    ``height`` x ``width``; ``ValueError`` saying what is wrong otherwise."""
    if isinstance(seg, list):  # polygons
        try:
            rle = _mask.merge(_mask.frPyObjects(seg, height, width))
        except Exception:
            raise ValueError("is not a readable polygon list") from None
    else:
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise ValueError("must be COCO RLE {\"size\": [h, w], \"counts\": ...}")
        size = seg["size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s == int(s) for s in size)):
            raise ValueError(f"has size {size!r}; expected [h, w]")
        if [int(s) for s in size] != [height, width]:
            raise ValueError(f"is {int(size[1])}x{int(size[0])} but the image is {width}x{height}")
        counts = seg["counts"]
        if isinstance(counts, list):
            if pixels(counts) != height * width:
                raise ValueError(f"has uncompressed counts that do not add up to {height}x{width} pixels")
            rle = _mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            if pixels(counts) != height * width:
                raise ValueError(f"has compressed counts that do not decode to {height}x{width} pixels")
            rle = {"size": [height, width], "counts": counts}
        else:
            raise ValueError("has counts that are neither a string nor a list of run lengths")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def pixels(counts) -> Optional[int]:
    """Pixels that RLE ``counts`` (a list of runs, or COCO's compressed string) cover; None when unreadable."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return None
        return sum(counts)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if not isinstance(counts, str):
        return None
    runs: list = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)


def decode(rles: Sequence[dict], size: Optional[tuple] = None) -> np.ndarray:
    """Compressed RLEs of one size -> N x H x W bool (``size`` gives the shape when there are none)."""
    if not len(rles):
        return np.zeros((0, *(size or (0, 0))), bool)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools under numpy 2
            dec = _mask.decode([_coco(r) for r in rles])
    except Exception:
        raise ValueError("holds an unreadable RLE mask") from None
    return np.ascontiguousarray(dec.transpose(2, 0, 1)).view(bool)


def area(rle: dict) -> float:
    return float(_mask.area(_coco(rle)))


def bbox(rle: dict) -> list[float]:
    """``[x, y, w, h]`` of the mask."""
    return [float(v) for v in _mask.toBbox(_coco(rle))]


def iou(dt: Sequence[dict], gt: Sequence[dict], iscrowd: Optional[Sequence[int]] = None) -> np.ndarray:
    """IoU matrix (len(dt) x len(gt)); against a crowd ground truth, the share of dt inside it."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    crowd = [0] * len(gt) if iscrowd is None else [int(c) for c in iscrowd]
    out = _mask.iou([_coco(d) for d in dt], [_coco(g) for g in gt], crowd)
    return np.asarray(out, dtype=np.float64).reshape(len(dt), len(gt))


def coco_evaluate(dataset: dict, detections: list, max_dets: int) -> list[float]:
    """``COCOeval(iouType="segm").stats`` for a COCO ground-truth ``dataset`` and detections
    (its prints silenced; ``maxDets`` = 1, 10, ``max_dets``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), iouType="segm")
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]
