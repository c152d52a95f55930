"""The backbone registry: ``@register_backbone`` presets plus ``timm:`` / ``open_clip:`` sources.

"Which network" (the name) and "which weights" (``weights=``) are separate questions.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import PartkitError

__all__ = ["BackboneSpec", "register_backbone", "get_spec", "list_backbones", "list_detectors"]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the registry knows about a named backbone before building it."""

    name: str
    family: str  # "cnn", "vit", "pixels", or "detector" (instance segmentation, for `partkit detect`)
    source: str  # "timm:ARCH", "open_clip:ARCH", "torchvision:ARCH" (detectors) or "partkit"
    hub_tag: Optional[str] = None  # default pretrained tag on the hub
    default_layers: tuple = ()
    default_facet: Optional[str] = None
    description: str = ""
    # (path-finding function, key-remap function, preprocessing overrides) for weights a package ships
    package_weights: Optional[Callable[[], Optional[str]]] = None
    remap: Optional[Callable[[dict], dict]] = None
    package_cfg: dict = field(default_factory=dict)
    builder: Optional[Callable] = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Register the spec returned by ``fn`` under its name (like timm's ``@register_model``).

    >>> @register_backbone
    ... def my_vit():
    ...     return BackboneSpec("my_vit", "vit", "timm:vit_small_patch16_224", hub_tag="augreg_in21k")
    """
    spec = fn()
    _REGISTRY[spec.name] = spec
    return fn


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the dense-feature backbones (not the detectors) matching a glob."""
    return sorted(n for n, s in _REGISTRY.items() if s.family != "detector" and fnmatch.fnmatch(n, pattern))


def list_detectors(pattern: str = "*") -> list[str]:
    """Names of the instance-segmentation detectors (``partkit detect --model``) matching a glob."""
    return sorted(n for n, s in _REGISTRY.items() if s.family == "detector" and fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> BackboneSpec:
    """A preset by name, or a spec made on the fly for ``timm:ARCH[.TAG]`` / ``open_clip:ARCH[/TAG]``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        arch, _, tag = name[5:].partition(".")
        import timm

        if not timm.models.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            raise PartkitError(f"timm has no model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        family = "vit" if _is_timm_vit(arch) else "cnn"
        return BackboneSpec(name, family, f"timm:{arch}", hub_tag=tag or None,
                            default_layers=(-1,) if family == "vit" else (2, 3, 4),
                            default_facet="token" if family == "vit" else None)
    if name.startswith("open_clip:"):
        arch, _, tag = name[10:].partition("/")
        import open_clip

        if arch not in open_clip.list_models():
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            raise PartkitError(f"open_clip has no model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return BackboneSpec(name, "vit", f"open_clip:{arch}", hub_tag=tag or None, default_layers=(-1,),
                            default_facet="token")
    choices = list(_REGISTRY)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PartkitError(
        f"unknown model {name!r}; {hint}see `partkit models` for presets, or use timm:ARCH[.TAG] / open_clip:ARCH/TAG"
    )


def _is_timm_vit(arch: str) -> bool:
    import timm

    module = timm.models.model_entrypoint(arch).__module__
    return module.endswith((".vision_transformer", ".deit")) and "hybrid" not in arch
