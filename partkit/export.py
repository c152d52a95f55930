"""Predictions and ground truth out of shards, as files other tools read: ``partkit export coco``.

``export_coco`` writes the proposals of a field (``proposals.json`` or ``ranked.json``) as one COCO
results file (``[{"image_id", "category_id", "segmentation": RLE with str counts, "score"}]``) and,
optionally, the matching COCO ground-truth file. Both are exactly what ``partkit eval mask-ap``
scores: the ground truth is built by its accumulator (:mod:`partkit.evaluate.masks`, one mask per
``gt_parts.png`` id or one per ``gt_objects.json`` object, void pixels and crowd objects as
``iscrowd`` regions) and turned into COCO by :func:`partkit.metrics.coco_dataset`, so COCOeval on
the files gives mask-ap's AP. Image ids count the samples from 1; ``file_name`` is the sample key.
Proposals without ``category_id`` are class-agnostic: every mask gets category 1, ``part``.

Example:
    >>> export_coco(["preds.tar"], "results.json", gt_out="gt.json")  # doctest: +SKIP
    {'samples': 4, 'detections': 40, 'annotations': 16, 'class_agnostic': True, ...}
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from .errors import PartkitError
from .evaluate import EvalOptions, accumulate
from .io.sink import check_output_file, write_atomic

__all__ = ["export_coco"]


def export_coco(inputs: Sequence[str], output: str, *, pred: str = "proposals.json", gt_out: Optional[str] = None,
                gt: str = "parts", gt_field: Optional[str] = None, skip_bad: bool = False) -> dict:
    """Write ``output`` (COCO results) and, with ``gt_out``, the COCO ground truth; returns a summary.

    ``pred``: the proposals field; ``gt``: ``parts`` (``gt_field``, default ``gt_parts.png``) or
    ``objects`` (``gt_objects.json``). Outputs are checked before any work and written atomically.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    check_output_file(output, "--output")
    if gt_out is not None:
        check_output_file(gt_out, "--gt-out")
        if _same(gt_out, output):
            raise PartkitError(f"--gt-out {gt_out!r} is the --output file; give two different paths")
    o = EvalOptions(proposals=pred, gt=gt, gt_field=gt_field, skip_bad=skip_bad)
    acc, samples = accumulate(inputs, "masks", ["mask-ap"], o, "export coco")
    dataset, results, agnostic = acc.coco()
    write_atomic(output, json.dumps(results).encode())
    if gt_out is not None:
        write_atomic(gt_out, json.dumps(dataset).encode())
    return {"samples": samples, "detections": len(results), "annotations": len(dataset["annotations"]),
            "class_agnostic": agnostic, "categories": len(dataset["categories"]), "pred": pred, "gt": gt,
            "output": output, "gt_out": gt_out}


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
