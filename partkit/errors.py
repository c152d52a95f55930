"""Errors a user can fix. The CLI prints their message on one line, with no traceback."""
from __future__ import annotations

__all__ = ["PartkitError", "BadSample", "missing_field"]


class PartkitError(Exception):
    """A problem with the user's input or options; the message says how to fix it."""


class BadSample(PartkitError):
    """One sample cannot be processed; ``--skip-bad`` skips it, otherwise the run stops."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"sample {key!r}: {reason}")

    def record(self) -> dict:
        """How a ``--skip-bad`` run reports this sample (stats files, run configs, eval reports)."""
        return {"key": self.key, "reason": self.reason}


# Which command produces a field, so a missing-field error can say what to run first.
PRODUCERS = {
    "jpg": "partkit pack",
    "png": "partkit pack",
    "json": "partkit pack",
    "gt_parts.png": "partkit pack --labels DIR",
    "gt_objects.json": "partkit pack --coco FILE",
    "gt_kpts.json": "partkit pack --coco FILE (with keypoints)",
    "feat.npy": "partkit extract",
    "feat.json": "partkit extract",
    "saliency.npy": "partkit extract --saliency",
    "parts.png": "partkit cluster",
    "parts.json": "partkit cluster",
    "points.npy": "partkit pack (3D inputs)",
    "gt_parts.npy": "partkit pack (3D inputs with part labels)",
    "pred_parts.npy": "partkit distill-3d",
    "pred_parts.json": "partkit distill-3d",
    "proposals.json": "partkit predict",
    "proposals.npy": "partkit predict",
    "ranked.json": "partkit rank apply",
    "ranked_parts.png": "partkit rank apply",
    "targets.png": "partkit rank apply --as-targets",
    "targets.json": "partkit rank apply --as-targets",
}


def missing_field(key: str, field: str) -> BadSample:
    producer = PRODUCERS.get(field)
    hint = f"; run `{producer}` first" if producer else ""
    return BadSample(key, f"has no '{field}' field{hint}")
