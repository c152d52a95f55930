"""``partkit extract``: dense features per image, written as ``feat.npy`` + ``feat.json``.

>>> from partkit.extract import extract
>>> extract(["images.tar"], model="efficientnet_lite0", output=Output("feats/"))  # doctest: +SKIP
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import fields
from ._runtime import resolve_device, seed_everything
from ._version import __version__
from .errors import BadSample, Handler, PartkitError, stop
from .io import Output, decode_image, encode_json, encode_npy, run_stage
from .models import Backbone, create_backbone

__all__ = ["FeatureExtractor", "extract", "hypercolumn", "keypoint_crops", "PATCH_POOLS"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PATCHES_AT = ("keypoints",)
PATCH_POOLS = ("mean", "cls")  # Zhu et al.: the average of the patch tokens, or the class token
MIN_PATCH = 2  # pixels: a fixed --patch-size below this is no patch


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


def parse_patch_size(value: Union[str, int, None]) -> Union[str, int]:
    """``--patch-size``: ``nn`` (Zhu et al.: the distance to the nearest other keypoint) or pixels >= 2."""
    if value is None or value == "nn":
        return "nn"
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise PartkitError(f"--patch-size must be 'nn' or a whole number of pixels, got {value!r}") from None
    if size < MIN_PATCH:
        raise PartkitError(f"--patch-size must be at least {MIN_PATCH} pixels, got {size}; or pass 'nn'")
    return size


def check_patch_options(patches_at: Optional[str], patch_size, patch_pool: str, kpt_min_visibility: int = 1):
    """One-line errors for ``--patches-at``, ``--patch-size``, ``--patch-pool``, ``--kpt-min-v``; the parsed size."""
    if patches_at is not None and patches_at not in PATCHES_AT:
        raise PartkitError(f"--patches-at must be one of {', '.join(PATCHES_AT)}, got {patches_at!r}")
    if patch_pool not in PATCH_POOLS:
        raise PartkitError(f"--patch-pool must be one of {', '.join(PATCH_POOLS)}, got {patch_pool!r}")
    if kpt_min_visibility < 0:
        raise PartkitError(f"--kpt-min-v must be 0 or more, got {kpt_min_visibility}")
    return parse_patch_size(patch_size)


def keypoint_crops(rgb: np.ndarray, points: np.ndarray, patch_size: Union[str, int], key: str = "?"):
    """Square crops centred on keypoints, as Zhu et al.'s part retrieval makes them.

    ``points`` is ``K x 2`` (x, y) in image pixels. The side ``d`` is ``patch_size`` pixels, or with
    ``"nn"`` the distance from the keypoint to the nearest other one in ``points`` (rounded). The box
    is ``[floor(x - d/2 + 0.5), +d) x [floor(y - d/2 + 0.5), +d)``; pixels beyond the image are the
    normalisation mean colour (see :func:`_crop`). Returns one ``(left, top, d)`` per keypoint, or
    ``(None, None, reason)`` for a keypoint with no other keypoint, or one closer than 2 pixels (``nn``).
    """
    height, width = rgb.shape[:2]
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    outside = (pts[:, 0] < 0) | (pts[:, 1] < 0) | (pts[:, 0] > width) | (pts[:, 1] > height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise BadSample(key, f"keypoint at ({pts[i, 0]:g}, {pts[i, 1]:g}) lies outside the {width}x{height} image; "
                             "fix gt_kpts.json or pass --skip-bad")
    if patch_size != "nn" and patch_size > max(height, width):
        raise BadSample(key, f"--patch-size {patch_size} is larger than the {width}x{height} image; pass a "
                             "smaller --patch-size or 'nn'")
    out = []
    for i, (x, y) in enumerate(pts):
        if patch_size == "nn":
            dist = np.hypot(pts[:, 0] - x, pts[:, 1] - y)
            dist[i] = np.inf
            d = int(round(float(dist.min()))) if len(pts) > 1 else 0
            if len(pts) < 2:
                out.append((None, None, "no other keypoint in the image to size its patch"))
                continue
            if d < MIN_PATCH:
                out.append((None, None, f"the nearest other keypoint is {float(dist.min()):.2f} pixels away"))
                continue
        else:
            d = int(patch_size)
        left, top = int(math.floor(x - d / 2 + 0.5)), int(math.floor(y - d / 2 + 0.5))
        out.append((left, top, d))
    return out


def _crop(rgb: np.ndarray, left: int, top: int, d: int, fill: tuple[int, int, int]) -> np.ndarray:
    """The d x d window at (left, top) of ``rgb``, padded with ``fill`` beyond the image."""
    height, width = rgb.shape[:2]
    out = np.empty((d, d, 3), np.uint8)
    out[:] = fill
    y0, y1, x0, x1 = max(top, 0), min(top + d, height), max(left, 0), min(left + d, width)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = rgb[y0:y1, x0:x1]
    return out


def _patch_features(fx: FeatureExtractor, crops: torch.Tensor, pool: str) -> torch.Tensor:
    """Preprocessed crops (B x 3 x S x S) -> one B x C float32 vector per crop.

    ``mean``: the mean of the crop's feature grid (what ``feat.npy`` would hold for the crop);
    ``cls``: a ViT's CLS token at the chosen layers (concatenated; L2-normalised per layer when
    several), or for CNNs and ``rgb`` global average pooling of the deepest chosen stage.
    """
    x = crops.to(fx.device)
    autocast = fx.dtype != torch.float32
    with torch.autocast(fx.device.type, dtype=fx.dtype, enabled=autocast):
        if pool == "mean":
            feats, _ = fx.forward(crops)
            gh, gw = fx.valid_grid({"resized": [fx.size, fx.size]}, feats.shape[-2:])
            return feats[:, :, :gh, :gw].float().mean((2, 3))
        if fx.backbone.family == "vit":
            tokens = [t.float() for t in fx.backbone.forward_cls(x, fx.layers, facet=fx.facet)]
            if len(tokens) > 1:
                tokens = [F.normalize(t, dim=1) for t in tokens]
            return torch.cat(tokens, dim=1)
        maps, _ = fx.backbone.forward_features(x, fx.layers[-1:])
        return maps[0].float().mean((2, 3))


def _pool_name(fx: FeatureExtractor, pool: str) -> str:
    return "gap" if pool == "cls" and fx.backbone.family != "vit" else pool


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
    patches_at: Optional[str] = None,
    patch_size: Union[str, int] = "nn",
    patch_pool: str = "mean",
    kpt_min_visibility: int = 1,
) -> dict:
    """Add ``feat.npy`` (float16, C x h x w) and ``feat.json`` to every sample with an image.

    With ``patches_at="keypoints"``, also ``kpt_feat.npy`` (float32, K x C: one vector per keypoint
    with ``v >= kpt_min_visibility``, from a ``patch_size`` crop centred on it, resized to ``size``
    and run through the backbone, as in Zhu et al.'s part retrieval) and ``kpt_feat.json``.
    """
    if batch_size < 1:
        raise PartkitError(f"--batch-size must be at least 1, got {batch_size}")
    patch_size = check_patch_options(patches_at, patch_size, patch_pool, kpt_min_visibility)
    seed_everything(seed)
    backbone = create_backbone(model, weights)
    fx = FeatureExtractor(backbone, layers=layers, facet=facet, stride=stride, grid_stride=grid_stride, size=size,
                          keep_aspect=keep_aspect, saliency=saliency, device=device, dtype=dtype)

    fill = tuple(int(round(m * 255)) for m in backbone.mean)

    def prepare(sample: dict):
        rgb = decode_image(sample, min_size=fx.min_size)
        x, geom = fx.preprocess(rgb)
        if patches_at is None:
            return sample, x, geom, None
        return sample, x, geom, _keypoint_patches(sample, rgb)

    def _keypoint_patches(sample: dict, rgb: np.ndarray):
        objects, names = fields.keypoints(sample)
        rows = [(o, k, pt) for o, pts in enumerate(objects) for k, pt in enumerate(pts)
                if pt[2] >= kpt_min_visibility]
        boxes = keypoint_crops(rgb, np.array([pt[:2] for _, _, pt in rows]).reshape(-1, 2), patch_size,
                               sample["__key__"])
        kept, skipped, crops = [], [], []
        for (o, k, pt), box in zip(rows, boxes):
            entry = {"object": o, "index": k, "name": names[k] if k < len(names) else str(k),
                     "x": float(pt[0]), "y": float(pt[1]), "v": int(pt[2])}
            if box[0] is None:
                skipped.append({**entry, "reason": box[2]})
                continue
            left, top, d = box
            crops.append(fx.preprocess(_crop(rgb, left, top, d, fill))[0])
            kept.append({**entry, "box": [left, top, left + d, top + d]})
        return kept, skipped, crops

    def patch_features(crops: list) -> np.ndarray:
        if not crops:
            return np.zeros((0, 0), np.float32)
        out = [_patch_features(fx, torch.stack(crops[i:i + batch_size]), patch_pool)
               for i in range(0, len(crops), batch_size)]
        return torch.cat(out).cpu().numpy().astype(np.float32)

    def patch_meta(kept: list, skipped: list, channels: int) -> dict:
        bb = backbone
        return {"model": bb.name, "family": bb.family, "weights": bb.weights, "source": bb.source,
                "layers": fx.layers, "facet": fx.facet, "pool": _pool_name(fx, patch_pool),
                "kind": f"patch-{_pool_name(fx, patch_pool)}", "channels": int(channels),
                "patch_size": patch_size, "size": size, "input_size": [fx.input_size] * 2,
                "kpt_min_visibility": kpt_min_visibility, "keypoints": kept, "skipped": skipped,
                "mean": list(bb.mean), "std": list(bb.std), "seed": seed, "partkit_version": __version__}

    def process(batch: list) -> list:
        with torch.inference_mode():
            feats, sal = fx.forward(torch.stack([x for _, x, _, _ in batch]))
        feats = feats.to(torch.float16).cpu().numpy()
        sal = sal.to(torch.float16).cpu().numpy() if sal is not None else None
        out = []
        for i, (sample, _, geom, patches) in enumerate(batch):
            gh, gw = fx.valid_grid(geom, feats.shape[-2:])
            f = feats[i, :, :gh, :gw]
            meta = fx.meta(geom, f.shape[0], (gh, gw))
            meta["seed"] = seed
            new = {**sample, "feat.npy": encode_npy(f), "feat.json": encode_json(meta)}
            if sal is not None:
                new["saliency.npy"] = encode_npy(sal[i, :gh, :gw])
            if patches is not None:
                kept, skipped, crops = patches
                with torch.inference_mode():
                    kf = patch_features(crops)
                new["kpt_feat.npy"] = encode_npy(kf)
                new["kpt_feat.json"] = encode_json(patch_meta(kept, skipped, kf.shape[1] if kf.size else 0))
            out.append(new)
        return out

    config = {"model": model, "weights": backbone.weights, "layers": fx.layers, "facet": fx.facet, "stride": stride,
              "grid_stride": fx.cell, "size": size, "keep_aspect": keep_aspect, "saliency": saliency,
              "dtype": dtype, "seed": seed}
    if patches_at is not None:
        config.update(patches_at=patches_at, patch_size=patch_size, patch_pool=_pool_name(fx, patch_pool),
                      kpt_min_visibility=kpt_min_visibility)
    return run_stage(inputs, process, output=output, name="extract", batch_size=batch_size, prepare=prepare,
                     prepare_workers=workers, handler=handler, config=config)
