"""Where weights come from: explicit file, $PARTKIT_WEIGHTS_DIR, a package that ships them, the hub."""
from __future__ import annotations

import os
from typing import Optional

from ..errors import PartkitError
from ._registry import BackboneSpec

__all__ = ["WeightSource", "resolve_weights", "load_state_dict", "offline_error", "match_prefix", "WRAPPER_PREFIXES"]

_EXTS = (".safetensors", ".pth", ".pt", ".bin")
# Where self-supervised checkpoints keep the backbone, in order of preference: MoCo's query encoder
# (``encoder_q.``, never the key encoder), DetCon/BYOL-style ``backbone.``/``encoder.``, plain wrappers.
WRAPPER_PREFIXES = ("", "encoder_q.", "backbone.", "encoder.", "online_network.encoder.", "model.", "net.")


class WeightSource(tuple):
    """``(kind, value)``: kind is ``file``, ``package``, ``hub`` or ``none``."""

    def __new__(cls, kind: str, value: Optional[str] = None):
        return super().__new__(cls, (kind, value))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def value(self) -> Optional[str]:
        return self[1]

    def describe(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.endswith(_EXTS) or s.startswith(".")


def find_local(spec: BackboneSpec) -> Optional[WeightSource]:
    """Weights available without a network: $PARTKIT_WEIGHTS_DIR/NAME.{pth,...}, then a package."""
    folder = os.environ.get("PARTKIT_WEIGHTS_DIR")
    if folder:
        stem = spec.name.replace(":", "_").replace("/", "_")
        for ext in _EXTS:
            path = os.path.join(folder, stem + ext)
            if os.path.isfile(path):
                return WeightSource("file", path)
    if spec.package_weights is not None:
        path = spec.package_weights()
        if path and os.path.isfile(path):
            return WeightSource("package", path)
    return None


def resolve_weights(spec: BackboneSpec, weights: Optional[str]) -> WeightSource:
    """Resolve ``--weights PATH|tag|none`` for a backbone (``None`` = the default)."""
    if spec.family == "pixels":
        return WeightSource("none")
    if weights is not None and weights.lower() == "none":
        return WeightSource("none")
    if weights is not None and os.path.isdir(weights):
        path = os.path.join(weights, "backbone.pt")  # a self-train run folder
        if os.path.isfile(path):
            return WeightSource("file", path)
        raise PartkitError(f"--weights folder {weights!r} has no backbone.pt; pass the weights file itself")
    if weights is not None and os.path.isfile(weights):
        return WeightSource("file", weights)
    if weights is not None and _looks_like_path(weights):
        raise PartkitError(f"--weights file {weights!r} does not exist; check the path")
    if weights is None:
        local = find_local(spec)
        if local is not None:
            return local
    tag = weights or spec.hub_tag
    return WeightSource("hub", tag)


_REACHABLE: dict = {}


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick connectivity check, so offline use fails in seconds instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if host not in _REACHABLE:
        import socket

        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def offline_error(spec: BackboneSpec, reason: str = "", downloader: str = "timm/open_clip") -> PartkitError:
    stem = spec.name.replace(":", "_").replace("/", "_")
    why = f" ({reason})" if reason else ""
    return PartkitError(
        f"no weights for {spec.name!r} on this machine and the model hub is unreachable{why}; fix: "
        f"pass --weights FILE, or put {stem}.pth in $PARTKIT_WEIGHTS_DIR, or go online once so {downloader} "
        f"can download and cache them (or --weights none for random init)"
    )


def load_state_dict(path: str, with_preprocessing: bool = False):
    """Read a state dict from .safetensors/.pt/.pth; unwraps ``{"state_dict"|"model"|"backbone": ...}``.

    With ``with_preprocessing``, also returns the ``mean``/``std`` a partkit-saved file carries
    (fine-tuned weights keep the statistics they were trained with).
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            import torch

            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PartkitError(f"cannot read weights file {path!r}: not a valid torch/safetensors file "
                           f"({type(e).__name__}); re-download or re-export it") from None
    sd = raw
    for key in ("backbone", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise PartkitError(f"weights file {path!r} holds no state dict")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    if not with_preprocessing:
        return sd
    prep = {k: tuple(float(x) for x in raw[k]) for k in ("mean", "std") if isinstance(raw, dict) and k in raw
            and isinstance(raw[k], (list, tuple))}
    return sd, prep


def match_prefix(sd: dict, reference: dict) -> tuple[dict, str]:
    """The part of a checkpoint that belongs to a network: ``(state dict, stripped prefix)``.

    ``reference`` is the network's own ``state_dict``. Each prefix of :data:`WRAPPER_PREFIXES`
    gives a candidate (its keys with the prefix removed); the candidate with the most keys that
    fit ``reference`` (same name and shape) wins, ties going to the earlier prefix, so a MoCo
    checkpoint (``module.encoder_q.*`` and ``module.encoder_k.*``; ``module.`` is already gone) gives
    its query encoder and a DetCon/BYOL one (``backbone.*`` next to ``projector.*``) its backbone.
    """
    def fits(cand: dict) -> int:
        return sum(1 for k, v in cand.items() if k in reference and tuple(getattr(v, "shape", ())) ==
                   tuple(reference[k].shape))

    best, best_prefix, best_score = sd, "", fits(sd)
    for prefix in WRAPPER_PREFIXES[1:]:
        cand = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        score = fits(cand) if cand else 0
        if score > best_score:
            best, best_prefix, best_score = cand, prefix, score
    return best, best_prefix
