"""Errors a user can fix, and the one policy for bad samples.

The CLI prints an error's message on one line, with no traceback. A bad sample goes to a
*handler*, as in webdataset: :func:`stop` (the default) raises it, a :class:`SkipBad` records it
(``BadSample.record()``, the one record format of stats files, run configs and eval reports)
and reading goes on. Only :mod:`partkit.io.pipeline` applies a handler.

Example:
    >>> skip = SkipBad()
    >>> skip(BadSample("img_1", "feat.npy holds NaN values")); skip.records
    [{'key': 'img_1', 'reason': 'feat.npy holds NaN values'}]
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["PartkitError", "BadSample", "missing_field", "Handler", "stop", "SkipBad", "recorded", "handler_for"]


class PartkitError(Exception):
    """A problem with the user's input or options; the message says how to fix it."""


class BadSample(PartkitError):
    """One sample cannot be processed; ``--skip-bad`` skips it, otherwise the run stops."""

    def __init__(self, key: Optional[str], reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"sample {key!r}: {reason}" if key is not None else reason)

    def record(self) -> dict:
        """How a ``--skip-bad`` run reports this sample (stats files, run configs, eval reports)."""
        return {"key": self.key, "reason": self.reason}


Handler = Callable[[BadSample], None]


def stop(bad: BadSample) -> None:
    """The default handler: the run stops at the first bad sample, naming it."""
    raise bad


class SkipBad:
    """The ``--skip-bad`` handler: leave the sample out and keep its record."""

    def __init__(self):
        self.records: list[dict] = []

    def __call__(self, bad: BadSample) -> None:
        self.records.append(bad.record())


def recorded(handler: Handler, records: list) -> Handler:
    """``handler``, also keeping the record of each bad sample it lets the run skip."""
    def on_bad(bad: BadSample) -> None:
        handler(bad)
        records.append(bad.record())

    return on_bad


def handler_for(skip_bad: bool) -> Handler:
    """The handler of a ``--skip-bad`` flag: a fresh :class:`SkipBad`, else :func:`stop`."""
    return SkipBad() if skip_bad else stop


# Which command produces a field, so a missing-field error can say what to run first.
PRODUCERS = {
    "jpg": "partkit pack",
    "png": "partkit pack",
    "json": "partkit pack",
    "gt_parts.png": "partkit pack --labels DIR",
    "gt_objects.json": "partkit pack --coco FILE` or `partkit detect",
    "gt_kpts.json": "partkit pack --coco FILE (with keypoints)",
    "feat.npy": "partkit extract",
    "feat.json": "partkit extract",
    "saliency.npy": "partkit extract --saliency",
    "kpt_feat.npy": "partkit extract --patches-at keypoints",
    "kpt_feat.json": "partkit extract --patches-at keypoints",
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
