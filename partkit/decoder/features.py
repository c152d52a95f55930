"""The decoder's inputs: cached ``feat.npy`` grids or features recomputed online by a frozen backbone.

Used by training (``train-decoder``, ``self-train``: streamed, :class:`ExampleStream`) and by ``predict``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from ..errors import Handler, stop
from ..fields import SALIENCY_THRESHOLD, FeatureSource, image, label_classes
from ..io import iter_loaded
from .data import Example, example_from_sample, targets_from_sample

# the fields an example keeps for its object masks (--objects-from gt_objects / gt_parts / saliency)
OBJECT_FIELDS = ("__key__", "gt_parts.png", "gt_objects.json", "json", "saliency.npy", "feat.json")

__all__ = ["OnlineFeatures", "example_loader", "load_examples", "ExampleStream", "batch_features"]


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


def example_loader(*, field: Optional[str], min_part_area: float, online: Optional[OnlineFeatures] = None,
                   class_map=None, source: Optional[FeatureSource] = None,
                   prepare: Optional[Callable[[Example], Example]] = None, objects: Optional[str] = None,
                   fg_threshold: float = SALIENCY_THRESHOLD) -> Callable[[dict], Example]:
    """``load(sample) -> Example``: decode one sample into a training example (features as float16,
    or the preprocessed image for online features); raises :class:`~partkit.errors.BadSample`.

    Cached features must all come from one model (``source``, whose first sample is set by the
    first call); ``prepare`` (a trainer's hook) may change or reject the example.
    """
    source = source or FeatureSource("train-decoder")

    def load(sample: dict) -> Example:
        if online is not None:
            x, meta = online.meta(sample)
            target, ids, classes = targets_from_sample(sample, meta, field=field, min_part_area=min_part_area,
                                                       class_map=class_map, objects=objects,
                                                       fg_threshold=fg_threshold)
            ex = Example(sample["__key__"], None, target, ids, classes, meta)
            ex.image = x
        else:
            ex = example_from_sample(sample, field=field, min_part_area=min_part_area, class_map=class_map,
                                     objects=objects, fg_threshold=fg_threshold)
            source.check(sample, ex.meta, ex.feat.shape[0])
        ex.sample = {k: v for k, v in sample.items() if k in OBJECT_FIELDS}  # what object masks are read from
        ex.label_classes = label_classes(sample, field) if field else None  # the field's class list, if any
        return prepare(ex) if prepare is not None else ex

    return load


def load_examples(inputs: Sequence[str], *, field: Optional[str], min_part_area: float, rank: int = 0, world: int = 1,
                  online: Optional[OnlineFeatures] = None, handler: Handler = stop, class_map=None,
                  source: Optional[FeatureSource] = None) -> list:
    """Read this rank's shards into memory as examples (validation sets, few-shot labelled sets).

    Training streams instead (:class:`ExampleStream`). Bad samples go to ``handler``.
    """
    load = example_loader(field=field, min_part_area=min_part_area, online=online, class_map=class_map,
                          source=source)
    return list(iter_loaded(inputs, load, handler=handler, rank=rank, world=world))


class ExampleStream:
    """Training examples streamed from shards (:mod:`partkit.streaming`), after a scan that checks them.

    The scan decodes every sample once, in order, before training starts: bad samples go to
    ``handler`` there (so a run stops before writing anything, or records what it skipped), the
    first example gives the model's input geometry, and the count gives ``--epochs`` its length.
    ``scanned`` keeps what each example's labels need to be checked as a whole (its key, ids and
    class list, a few numbers per sample): the decoder's class list is pooled from it, and
    :meth:`drop` leaves out the samples found bad that way. Only the scan's current sample and the
    loader's shuffle buffers are ever held in memory.
    """

    def __init__(self, inputs: Sequence[str], load: Callable[[dict], Example], *, handler: Handler, seed: int,
                 batch: int, rank: int = 0, world: int = 1, workers: int = 0, buffer: int = 256,
                 transform: Optional[Callable] = None):
        from ..errors import BadSample
        from ..streaming import SampleStream, StreamLoader

        self.first: Optional[Example] = None
        self.count = 0
        bad: list = []

        def on_bad(b: BadSample) -> None:
            handler(b)
            bad.append(b.key)

        stream = SampleStream(inputs, load, seed=seed, buffer=buffer, rank=rank, world=world,  # checks the inputs
                              transform=transform)
        self.scanned: list = []
        for ex in iter_loaded(inputs, load, handler=on_bad):
            if self.first is None:
                self.first = ex
            self.count += 1
            self.scanned.append(SimpleNamespace(key=ex.key, ids=ex.ids, label_classes=ex.label_classes))
        stream.exclude, stream.per_epoch = frozenset(k for k in bad if k is not None), self.count
        self.stream = stream
        self.loader = StreamLoader(stream, batch=batch, workers=workers, handler=handler,
                                   item_bytes=stream.item_bytes(self.first))

    def drop(self, keys: Sequence[str]) -> None:
        """Leave out these scanned samples too (found bad after the scan); before the first batch only."""
        keys = frozenset(keys)
        if keys:
            self.stream.exclude = self.stream.exclude | keys
            self.count -= len(keys)
            self.stream.per_epoch = self.count


def batch_features(examples: list, online: Optional[OnlineFeatures]) -> list[torch.Tensor]:
    """The feature grids of a batch of examples: cached, or computed now by the frozen backbone."""
    if online is None:
        return [ex.feat for ex in examples]
    return online.features(torch.stack([ex.image for ex in examples]), [ex.meta for ex in examples])
