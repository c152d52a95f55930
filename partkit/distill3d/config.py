"""``distill-3d``'s options: :class:`DistillConfig` (every CLI flag, checked) and the teachers' defaults."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import PartkitError
from ..render3d import DEFAULT_AZIMUTHS, DEFAULT_ELEVATIONS
from ..training import check_count, check_rate

TEACHERS = ("parts", "clip")
# Prompt ensemble for the clip teacher (averaged unit text embeddings, as CLIP's zero-shot recipe).
PROMPTS = ("a {part} of a {category}.", "a photo of the {part} of a {category}.", "the {part} of the {category}.",
           "a rendering of the {part} of a {category}.", "a close-up photo of the {part} of a {category}.",
           "a 3D model of the {part} of a {category}.")
DEFAULT_TEMPERATURE = {"parts": 0.05, "clip": 0.01}  # softmax temperature on cosine similarities
DEFAULT_MODEL = {"parts": "efficientnet_lite0", "clip": "clip_vitb16"}


@dataclass
class DistillConfig:
    """Every option of ``distill-3d`` (the CLI flags, with dashes)."""

    teacher: str = "parts"
    teacher_model: Optional[str] = None  # default: efficientnet_lite0 (parts) / clip_vitb16 (clip)
    weights: Optional[str] = None
    layers: Optional[Sequence[int]] = None  # feature layers of the parts teacher's backbone
    k: int = 8  # parts teacher: number of parts (over-segmenting, then matching, works best)
    parts: Optional[Sequence[str]] = None  # clip teacher: part names (default: the samples' json "parts")
    category: Optional[str] = None  # clip prompts (default: the samples' json "category")
    elevations: Sequence[float] = DEFAULT_ELEVATIONS
    azimuths: Sequence[float] = DEFAULT_AZIMUTHS
    size: int = 224  # rendered view size (pixels)
    radius: Optional[int] = None  # splat radius in pixels (default: from point count and size)
    temperature: Optional[float] = None
    max_cells: int = 100_000  # parts teacher: k-means is fit on at most this many foreground cells
    width: int = 64
    depth: int = 3
    knn: int = 16
    points: int = 1024  # points per shape in a training step (and per inference chunk)
    batch_size: int = 8  # shapes per step
    epochs: int = 60
    lr: float = 1e-3
    plateau: float = 0.01  # relative change of the 5-epoch mean loss that counts as converged
    backward: bool = True
    use_normals: bool = True
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "DistillConfig":
        if self.teacher not in TEACHERS:
            raise PartkitError(f"unknown --teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")
        checks = [("-k", self.k, 2), ("--size", self.size, 32), ("--width", self.width, 4), ("--depth", self.depth, 1),
                  ("--knn", self.knn, 1), ("--points", self.points, 2), ("--batch-size", self.batch_size, 1),
                  ("--epochs", self.epochs, 1), ("--max-cells", self.max_cells, 2)]
        for opt, value, low in checks:
            check_count(opt, value, low)
        if self.knn >= self.points:
            raise PartkitError(f"--knn ({self.knn}) must be smaller than --points ({self.points})")
        check_rate("--lr", self.lr, fix="pass a learning rate such as --lr 1e-3")
        check_rate("--plateau", self.plateau, strict=False, fix="pass a fraction such as --plateau 0.01")
        check_rate("--temperature", self.temperature, fix="pass a temperature such as 0.05, or drop it")
        if self.radius is not None and self.radius < 0:
            raise PartkitError(f"--radius must be >= 0 pixels, got {self.radius}")
        if not self.elevations or not self.azimuths:
            raise PartkitError("--elevations and --azimuths need at least one angle each")
        if not all(math.isfinite(a) for a in (*self.elevations, *self.azimuths)):
            raise PartkitError(f"--elevations and --azimuths must be finite angles in degrees, got "
                               f"{list(self.elevations)} and {list(self.azimuths)}; pass comma-separated degrees, e.g. "
                               "--elevations 30,-20 --azimuths 0,72,144")
        if any(abs(e) > 90 for e in self.elevations):
            raise PartkitError(f"--elevations must lie in -90..90 degrees, got {list(self.elevations)}")
        if self.teacher != "clip" and (self.parts or self.category):
            raise PartkitError("--parts and --category name the prompts of --teacher clip; the parts teacher "
                               "discovers its -k parts without names, so drop them (or use --teacher clip)")
        if self.parts is not None and len(self.parts) < 2:
            raise PartkitError(f"--parts needs at least two part names, got {list(self.parts)}")
        return self

    @property
    def model_name(self) -> str:
        return self.teacher_model or DEFAULT_MODEL[self.teacher]

    @property
    def tau(self) -> float:
        return self.temperature or DEFAULT_TEMPERATURE[self.teacher]

    @property
    def num_views(self) -> int:
        return len(self.elevations) * len(self.azimuths)
