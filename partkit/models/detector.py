"""Instance-segmentation detectors (torchvision's COCO Mask R-CNN) from the registry.

"Which network" is the registry name (``family="detector"``, ``source="torchvision:ARCH"``);
"which weights" resolves as for backbones: ``--weights FILE``, ``$PARTKIT_WEIGHTS_DIR/NAME.pth``,
``none`` (random init: offline tests), else torchvision's weights enum member named by the
preset's tag (``COCO_V1``), read from the torch hub cache or downloaded once. Missing weights
offline give the registry's one-line error.

>>> det = create_detector("maskrcnn_resnet50_fpn_v2", weights="none", size=64)  # doctest: +SKIP
>>> found = det.detect([rgb])[0]  # masks (N x H x W bool), boxes, labels, names, scores  # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import PartkitError
from ._registry import BackboneSpec, get_spec, list_detectors
from ._weights import hub_reachable, load_state_dict, offline_error, resolve_weights

__all__ = ["Detector", "Detections", "create_detector", "MASK_THRESHOLD"]

MASK_THRESHOLD = 0.5  # torchvision's soft masks -> binary, as its COCO evaluation pastes them
_DOWNLOAD_HOST = "download.pytorch.org"
_ARCHS = {  # torchvision builder name -> its weights enum name
    "maskrcnn_resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights",
    "maskrcnn_resnet50_fpn_v2": "MaskRCNN_ResNet50_FPN_V2_Weights",
}


@dataclass
class Detections:
    """One image's instances, best score first."""

    masks: np.ndarray  # N x H x W bool
    boxes: np.ndarray  # N x 4 float, x0 y0 x1 y1 in pixels
    labels: np.ndarray  # N int: the detector's category ids
    names: list  # N str
    scores: np.ndarray  # N float


class Detector:
    """A torchvision instance-segmentation model, its category names and its weights' source."""

    def __init__(self, name: str, net, categories: Sequence[str], weights: str, device="cpu"):
        self.name, self.net, self.categories, self.weights = name, net.eval(), list(categories), weights
        self.device = device
        self.net.to(device)

    def category_ids(self, names: Sequence[str]) -> list[int]:
        """The ids of category ``names``; an unknown name is an error listing close matches."""
        known = {n: i for i, n in enumerate(self.categories) if n not in ("__background__", "N/A")}
        ids = []
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise PartkitError(f"--classes: {self.name} has no category {name!r}; {hint}its categories: "
                                   f"{', '.join(list(known)[:12])}, ... ({len(known)} in all)")
            ids.append(known[name])
        return ids

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """H x W x 3 uint8 RGB images -> their detections (the model's score threshold applied)."""
        import torch

        xs = [torch.from_numpy(np.array(im)).permute(2, 0, 1).to(self.device, torch.float32) / 255.0
              for im in images]
        with torch.inference_mode():
            outs = self.net(xs)
        res = []
        for out in outs:
            order = torch.argsort(out["scores"], descending=True, stable=True)
            labels = out["labels"][order].cpu().numpy().astype(np.int64)
            res.append(Detections(
                masks=(out["masks"][order, 0] > MASK_THRESHOLD).cpu().numpy(),
                boxes=out["boxes"][order].cpu().numpy().astype(np.float64),
                labels=labels, names=[self.categories[i] if i < len(self.categories) else str(i) for i in labels],
                scores=out["scores"][order].cpu().numpy().astype(np.float64)))
        return res


def _weights_enum(arch: str):
    from torchvision.models import detection

    return getattr(detection, _ARCHS[arch])


def _hub_state_dict(spec: BackboneSpec, member):
    """The state dict of a torchvision weights enum member: from the torch hub cache, else downloaded."""
    import torch

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(member.url))
    if not os.path.isfile(cached) and not hub_reachable(_DOWNLOAD_HOST):
        raise offline_error(spec, "offline, not in the torch hub cache", downloader="torchvision")
    try:
        return member.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise offline_error(spec, type(e).__name__, downloader="torchvision") from None


def create_detector(name: str = "maskrcnn_resnet50_fpn_v2", weights: Optional[str] = None, *,
                    score_threshold: float = 0.5, size: int = 800, max_size: int = 1333,
                    max_detections: int = 100, rpn_proposals: int = 1000, device="cpu") -> Detector:
    """Build a registry detector.

    ``size``/``max_size``: the shorter/longer image side the model resizes to (torchvision's
    ``min_size``/``max_size``, 800/1333 as trained); ``score_threshold`` and ``max_detections``
    are its ``box_score_thresh`` and ``box_detections_per_img``; ``rpn_proposals`` the region
    proposals kept before and after the RPN's NMS (``rpn_{pre,post}_nms_top_n_test``, 1000 as trained;
    fewer is faster and may miss objects).
    """
    spec = get_spec(name)
    if spec.family != "detector":
        raise PartkitError(f"{name!r} is a feature backbone, not a detector; detectors: {', '.join(list_detectors())}")
    kind, arch = spec.source.split(":", 1)
    if kind != "torchvision" or arch not in _ARCHS:
        raise PartkitError(f"detector {name!r} has an unknown source {spec.source!r}")
    if not 0 <= score_threshold < 1:
        raise PartkitError(f"--score-threshold must be in [0, 1), got {score_threshold}")
    if size < 1 or max_size < size:
        raise PartkitError(f"--size must be at least 1 and at most --max-size ({max_size}), got {size}")
    if max_detections < 1:
        raise PartkitError(f"--max-detections must be at least 1, got {max_detections}")
    if rpn_proposals < 1:
        raise PartkitError(f"--rpn-proposals must be at least 1, got {rpn_proposals}")
    from torchvision.models import detection

    enum = _weights_enum(arch)
    src = resolve_weights(spec, weights)
    member = None
    if src.kind == "hub":
        tags = [m for m in enum.__members__ if m != "DEFAULT"]
        if src.value not in tags:
            raise PartkitError(f"{name} has no torchvision weights {src.value!r}; use one of {', '.join(tags)}, a "
                               "weights file, or none")
        member = enum[src.value]
    categories = (member or enum[spec.hub_tag]).meta["categories"]
    net = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=len(categories),
                                   box_score_thresh=score_threshold, min_size=size, max_size=max_size,
                                   box_detections_per_img=max_detections, rpn_pre_nms_top_n_test=rpn_proposals,
                                   rpn_post_nms_top_n_test=rpn_proposals)
    if member is not None:
        net.load_state_dict(_hub_state_dict(spec, member))
    elif src.kind in ("file", "package"):
        missing, unexpected = net.load_state_dict(load_state_dict(src.value), strict=False)
        if missing or unexpected:
            show = (missing or unexpected)[:2]
            raise PartkitError(f"weights file {src.value!r} does not fit {name}: {len(missing)} missing and "
                               f"{len(unexpected)} unexpected keys (e.g. {', '.join(show)}); pass weights saved for "
                               "this architecture")
    return Detector(name, net, categories, src.describe(), device)
