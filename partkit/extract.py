"""``partkit extract``: dense features per image, written as ``feat.npy`` + ``feat.json``.

>>> from partkit.extract import extract
>>> extract(["images.tar"], model="efficientnet_lite0", output=Output("feats/"))  # doctest: +SKIP
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import Handler, PartkitError, stop
from .io import Output, decode_image, encode_json, encode_npy, run_stage
from .models import Backbone, create_backbone

__all__ = ["FeatureExtractor", "extract", "hypercolumn"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hypercolumn(maps: Sequence[torch.Tensor], size: Optional[tuple[int, int]] = None,
                normalize: bool = True) -> torch.Tensor:
    """Feature maps -> one ``B x C x h x w`` float32 grid (PARTICLE's hypercolumn).

    Each map is resampled bilinearly to ``size`` (when given), L2-normalised per cell (when
    ``normalize``), then the maps are concatenated along channels.
    """
    maps = [m.float() for m in maps]
    if size is not None:
        size = tuple(size)
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
    if normalize:
        maps = [F.normalize(m, dim=1) for m in maps]
    return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


class FeatureExtractor:
    """Image -> dense feature grid, with the geometry needed to map cells back to pixels.

    CNNs give hypercolumns (each chosen stage resampled bilinearly to one grid and
    L2-normalised per cell, then concatenated); ViTs give one facet of chosen layers.
    """

    def __init__(self, backbone: Backbone, *, layers: Optional[Sequence[int]] = None, facet: Optional[str] = None,
                 stride: Optional[int] = None, grid_stride: Optional[int] = None, size: int = 224,
                 keep_aspect: bool = True, saliency: bool = False, device: str = "auto", dtype: str = "float32"):
        if size < 1:
            raise PartkitError(f"--size must be positive, got {size}")
        if dtype not in _DTYPES:
            raise PartkitError(f"unknown --dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        self.backbone = backbone
        self.layers = backbone.layer_indices(layers)
        self.facet = facet if backbone.family == "vit" else None
        if backbone.family == "vit":
            self.facet = facet or getattr(backbone, "default_facet", None) or "token"
        elif facet not in (None, "token"):
            raise PartkitError(f"--facet {facet} applies to ViTs only; {backbone.name} is a {backbone.family} backbone")
        if saliency and backbone.family != "vit":
            raise PartkitError(f"--saliency needs a ViT's CLS attention; {backbone.name} is a {backbone.family} backbone")
        if stride is not None and (backbone.family != "vit" or not 1 <= stride <= backbone.patch_size):
            raise PartkitError(f"--stride must be between 1 and the ViT patch size; {backbone.name} "
                               f"{'is not a ViT' if backbone.family != 'vit' else f'has patch {backbone.patch_size}'}")
        self.stride = stride
        self.saliency = saliency
        self.size = size
        self.keep_aspect = keep_aspect
        self.device = resolve_device(device)
        self.dtype = _DTYPES[dtype]
        patch = backbone.patch_size or 1
        self.input_size = int(math.ceil(size / patch) * patch)
        if backbone.family == "vit":
            self.cell = stride or backbone.patch_size
            self.offset = (backbone.patch_size - self.cell) / 2
        else:
            self.cell = grid_stride or min(backbone.reductions[i] for i in self.layers)
            self.offset = 0.0
        self.min_size = backbone.min_image_size()
        self.mean = torch.tensor(backbone.mean).view(3, 1, 1)
        self.std = torch.tensor(backbone.std).view(3, 1, 1)
        self.backbone.to(self.device).eval()
        if backbone.family == "cnn" and self.device.type != "mps":
            self.backbone.to(memory_format=torch.channels_last)

    # ---- preprocessing (runs in worker threads)
    def geometry(self, height: int, width: int) -> dict:
        if self.keep_aspect:
            s = self.size / max(height, width)
            rh, rw = max(1, round(height * s)), max(1, round(width * s))
        else:
            rh = rw = self.size
        return {"image_size": [height, width], "resized": [rh, rw], "input_size": [self.input_size] * 2}

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict]:
        """H x W x 3 uint8 -> normalised, padded C x S x S tensor and its geometry."""
        geom = self.geometry(*rgb.shape[:2])
        rh, rw = geom["resized"]
        im = Image.fromarray(rgb)
        if (rh, rw) != rgb.shape[:2]:
            im = im.resize((rw, rh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
        x = (x - self.mean) / self.std
        out = torch.zeros(3, self.input_size, self.input_size)  # zero after normalisation = mean colour
        out[:, :rh, :rw] = x
        return out, geom

    # ---- features
    def valid_grid(self, geom: dict, full: tuple[int, int]) -> tuple[int, int]:
        """Cells whose patch starts inside the resized image (the rest cover only padding)."""
        rh, rw = geom["resized"]
        return min(full[0], math.ceil(rh / self.cell)), min(full[1], math.ceil(rw / self.cell))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch of preprocessed images -> (B x C x h x w float32 features, saliency or None)."""
        x = x.to(self.device, non_blocking=True)
        if self.backbone.family == "cnn":
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            maps, sal = self.backbone.forward_features(x, self.layers, facet=self.facet, saliency=self.saliency,
                                                       stride=self.stride)
        feats = hypercolumn(maps, self.grid_size(x), self.normalized)
        return feats, (sal.float() if sal is not None else None)

    def grid_size(self, x: torch.Tensor) -> Optional[tuple[int, int]]:
        """The hypercolumn grid of a CNN (or pixel) input batch; ``None`` for ViTs (their maps share one grid)."""
        return (x.shape[-2] // self.cell, x.shape[-1] // self.cell) if self.backbone.family != "vit" else None

    @property
    def normalized(self) -> bool:
        return len(self.layers) > 1 or self.backbone.family == "cnn"

    def meta(self, geom: dict, channels: int, grid: tuple[int, int]) -> dict:
        bb = self.backbone
        return {
            **geom, "model": bb.name, "family": bb.family, "weights": bb.weights, "source": bb.source,
            "kind": "hypercolumn" if bb.family != "vit" else self.facet, "layers": self.layers,
            "channels": int(channels), "level_channels": [int(bb.channels[i]) for i in self.layers],
            "grid": [int(grid[0]), int(grid[1])], "stride": self.cell,
            "offset": self.offset, "mean": list(bb.mean), "std": list(bb.std), "patch_size": bb.patch_size,
            "normalized": self.normalized, "keep_aspect": self.keep_aspect, "partkit_version": __version__,
        }


def extract(
    inputs: Sequence[str],
    *,
    model: str = "efficientnet_lite0",
    weights: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    facet: Optional[str] = None,
    stride: Optional[int] = None,
    grid_stride: Optional[int] = None,
    size: int = 224,
    keep_aspect: bool = True,
    saliency: bool = False,
    batch_size: int = 16,
    workers: int = 1,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    output: Output = Output(),
    handler: Handler = stop,
) -> dict:
    """Add ``feat.npy`` (float16, C x h x w) and ``feat.json`` to every sample with an image."""
    if batch_size < 1:
        raise PartkitError(f"--batch-size must be at least 1, got {batch_size}")
    seed_everything(seed)
    backbone = create_backbone(model, weights)
    fx = FeatureExtractor(backbone, layers=layers, facet=facet, stride=stride, grid_stride=grid_stride, size=size,
                          keep_aspect=keep_aspect, saliency=saliency, device=device, dtype=dtype)

    def prepare(sample: dict):
        rgb = decode_image(sample, min_size=fx.min_size)
        x, geom = fx.preprocess(rgb)
        return sample, x, geom

    def process(batch: list) -> list:
        with torch.inference_mode():
            feats, sal = fx.forward(torch.stack([x for _, x, _ in batch]))
        feats = feats.to(torch.float16).cpu().numpy()
        sal = sal.to(torch.float16).cpu().numpy() if sal is not None else None
        out = []
        for i, (sample, _, geom) in enumerate(batch):
            gh, gw = fx.valid_grid(geom, feats.shape[-2:])
            f = feats[i, :, :gh, :gw]
            meta = fx.meta(geom, f.shape[0], (gh, gw))
            meta["seed"] = seed
            new = {**sample, "feat.npy": encode_npy(f), "feat.json": encode_json(meta)}
            if sal is not None:
                new["saliency.npy"] = encode_npy(sal[i, :gh, :gw])
            out.append(new)
        return out

    config = {"model": model, "weights": backbone.weights, "layers": fx.layers, "facet": fx.facet, "stride": stride,
              "grid_stride": fx.cell, "size": size, "keep_aspect": keep_aspect, "saliency": saliency,
              "dtype": dtype, "seed": seed}
    return run_stage(inputs, process, output=output, name="extract", batch_size=batch_size, prepare=prepare,
                     prepare_workers=workers, handler=handler, config=config)
