"""The decoder's inputs: cached ``feat.npy`` grids or features recomputed online by a frozen backbone.

Used by training (``train-decoder``, ``self-train``) and by ``predict``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import Handler, stop
from ..fields import FeatureSource, image, label_classes
from ..io import iter_loaded
from .data import Example, example_from_sample, targets_from_sample

__all__ = ["OnlineFeatures", "load_examples", "batch_features"]


class OnlineFeatures:
    """Features recomputed from images each step by a frozen registry backbone."""

    def __init__(self, model: str, weights: Optional[str], layers, size: int, device):
        from ..extract import FeatureExtractor
        from ..models import create_backbone

        self.spec = {"model": model, "weights": weights, "layers": list(layers) if layers else None, "size": size}
        self.fx = FeatureExtractor(create_backbone(model, weights), layers=layers, size=size, device=str(device))
        for p in self.fx.backbone.parameters():
            p.requires_grad_(False)

    def meta(self, sample: dict) -> tuple[torch.Tensor, dict]:
        x, geom = self.fx.preprocess(image(sample, self.fx.min_size))
        full = (self.fx.input_size // self.fx.cell,) * 2
        grid = self.fx.valid_grid(geom, full)
        return x, self.fx.meta(geom, sum(self.fx.backbone.channels[i] for i in self.fx.layers), grid)

    @torch.no_grad()
    def features(self, images: torch.Tensor, metas: Sequence[dict]) -> list[torch.Tensor]:
        feats, _ = self.fx.forward(images)
        return [feats[i, :, :m["grid"][0], :m["grid"][1]] for i, m in enumerate(metas)]


def load_examples(inputs: Sequence[str], *, field: Optional[str], min_part_area: float, rank: int = 0, world: int = 1,
                  online: Optional[OnlineFeatures] = None, handler: Handler = stop, class_map=None,
                  source: Optional[FeatureSource] = None) -> list:
    """Read this rank's shards into memory as training examples (features kept as float16).

    Bad samples go to ``handler``; cached features must all come from one model (``source``).
    """
    source = source or FeatureSource("train-decoder")

    def load(sample: dict) -> Example:
        if online is not None:
            x, meta = online.meta(sample)
            target, ids, classes = targets_from_sample(sample, meta, field=field, min_part_area=min_part_area,
                                                       class_map=class_map)
            ex = Example(sample["__key__"], None, target, ids, classes, meta)
            ex.image = x
        else:
            ex = example_from_sample(sample, field=field, min_part_area=min_part_area, class_map=class_map)
            source.check(sample, ex.meta, ex.feat.shape[0])
        ex.sample = {k: v for k, v in sample.items() if k in ("__key__", "gt_parts.png", "gt_objects.json", "json")}
        ex.label_classes = label_classes(sample, field) if field else None  # the field's class list, if any
        return ex

    return list(iter_loaded(inputs, load, handler=handler, rank=rank, world=world))


def batch_features(examples: list, online: Optional[OnlineFeatures]) -> list[torch.Tensor]:
    """The feature grids of a batch of examples: cached, or computed now by the frozen backbone."""
    if online is None:
        return [ex.feat for ex in examples]
    return online.features(torch.stack([ex.image for ex in examples]), [ex.meta for ex in examples])
