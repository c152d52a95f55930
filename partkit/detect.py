"""Object instances on unlabelled images from a registry detector (COCO Mask R-CNN).

Adds ``gt_objects.json`` (or ``field``) in the format ``pack --coco`` writes (docs/FORMAT.md):
``{"objects": [{"id", "category_id", "category", "score", "bbox", "area", "iscrowd",
"segmentation"}], ...}`` with compressed-RLE masks at image size, best score first. Stages that
need objects read it like packed instances: ``cluster --fg-from gt_objects``, ``rank
--objects-field FIELD``. PartDistillation takes its objects from a detector (Detic) the same way.

>>> detect(["packed/"], score_threshold=0.7, classes=["car"], output=Output("det/"))  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Optional, Sequence

from . import fields, rle
from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import BadSample, Handler, PartkitError, stop
from .io import Output, encode_json, run_stage

__all__ = ["detect", "DEFAULT_DETECTOR"]

DEFAULT_DETECTOR = "maskrcnn_resnet50_fpn_v2"


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _objects(found, keep_ids: Optional[set]) -> tuple[list, int]:
    """Detections -> gt_objects entries (ids 1..N, best score first); the number of empty masks left out."""
    objects, empty = [], 0
    for mask, box, label, name, score in zip(found.masks, found.boxes, found.labels, found.names, found.scores):
        if keep_ids is not None and int(label) not in keep_ids:
            continue
        if not mask.any():
            empty += 1
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        objects.append({"id": len(objects) + 1, "category_id": int(label), "category": str(name),
                        "score": _round(score), "bbox": [_round(x0), _round(y0), _round(x1 - x0), _round(y1 - y0)],
                        "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle.encode(mask)})
    return objects, empty


def detect(inputs: Sequence[str], *, model: str = DEFAULT_DETECTOR, weights: Optional[str] = None,
           score_threshold: float = 0.5, classes: Optional[Sequence[str]] = None, size: int = 800,
           max_size: int = 1333, max_detections: int = 100, rpn_proposals: int = 1000,
           field: str = "gt_objects.json", batch_size: int = 2,
           device: str = "auto", seed: int = 0, output: Output = Output(), handler: Handler = stop) -> dict:
    """Add ``field`` (default ``gt_objects.json``): the detector's instances scoring above
    ``score_threshold``, only of ``classes`` (detector category names) when given.

    A sample that already has ``field`` is refused (a stage never rewrites another's field):
    write to another field and pass it on as ``--objects-field``.
    """
    from .models import create_detector

    if not field.endswith(".json") or "/" in field:
        raise PartkitError(f"--field names a JSON field of the sample (like gt_objects.json), got {field!r}")
    if batch_size < 1:
        raise PartkitError(f"--batch-size must be at least 1, got {batch_size}")
    seed_everything(seed)
    dev = resolve_device(device)
    det = create_detector(model, weights, score_threshold=score_threshold, size=size, max_size=max_size,
                          max_detections=max_detections, rpn_proposals=rpn_proposals, device=dev)
    keep_ids = set(det.category_ids(classes)) if classes else None

    def prepare(sample: dict):
        if field in sample:
            raise BadSample(sample["__key__"], f"already has '{field}' (from pack --coco or an earlier detect); "
                                               f"write the detections to another field with --field "
                                               f"det_objects.json and read them with --objects-field det_objects.json")
        return sample, fields.image(sample)

    def process(batch: list) -> list:
        found = det.detect([rgb for _, rgb in batch])
        out = []
        for (sample, rgb), f in zip(batch, found):
            objects, empty = _objects(f, keep_ids)
            doc = {"objects": objects, "source": "partkit detect", "model": det.name, "weights": det.weights,
                   "score_threshold": score_threshold, "classes": list(classes) if classes else None,
                   "empty_masks": empty}
            out.append({**sample, field: encode_json(doc)})
        return out

    config = {"model": det.name, "weights": det.weights, "score_threshold": score_threshold,
              "classes": list(classes) if classes else None, "size": size, "max_size": max_size,
              "max_detections": max_detections, "rpn_proposals": rpn_proposals, "field": field, "seed": seed, "partkit_version": __version__}
    return run_stage(inputs, process, output=output, name="detect", batch_size=batch_size, prepare=prepare,
                     handler=handler, config=config)
