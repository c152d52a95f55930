"""Backbones with one dense-feature API, whatever the family.

``Backbone.forward_features(x, layers, facet)`` returns a list of ``B x C x h x w`` maps, one
per requested layer (ViT facets: ``token``, ``key``, ``query``, ``value``), and optionally the
CLS-attention saliency of the last layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PartkitError

__all__ = ["Backbone", "TimmCNN", "TimmViT", "OpenClipViT", "PixelBackbone", "FACETS"]

FACETS = ("token", "key", "query", "value")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Common interface; subclasses set ``family``, ``num_layers``, ``reductions``, ``channels``."""

    family = "cnn"

    def __init__(self, name: str, mean, std, weights: str, patch_size: Optional[int] = None):
        super().__init__()
        self.name = name
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.weights = weights
        self.patch_size = patch_size

    # ---- layer bookkeeping
    def layer_indices(self, layers: Optional[Sequence[int]]) -> list[int]:
        layers = list(layers) if layers else list(self.default_layers)
        out = []
        for i in layers:
            j = i + self.num_layers if i < 0 else i
            if not 0 <= j < self.num_layers:
                raise PartkitError(
                    f"layer {i} is out of range for {self.name} ({self.num_layers} layers: "
                    f"use 0..{self.num_layers - 1} or negative indices from the end)")
            out.append(j)
        return out

    def min_image_size(self) -> int:
        return self.patch_size or 1

    def forward_features(self, x: torch.Tensor, layers: Sequence[int], facet: Optional[str] = None,
                         saliency: bool = False, stride: Optional[int] = None):
        raise NotImplementedError

    def forward_last(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The network's last feature map, what global pooling would read: ``(B x C x h x w, CLS)``.

        CNNs: the map before global average pooling (timm's ``forward_features``: ResNet's last
        stage, EfficientNet's head convolution), CLS ``None``. ViTs: the output patch tokens after
        the final norm as a map, and the output CLS token (``B x C``). ``C`` is ``last_channels``.
        """
        raise PartkitError(f"{self.name} has no last feature map to fine-tune; pick a CNN or ViT backbone")


class PixelBackbone(Backbone):
    """Normalised RGB, average-pooled to a grid: the colour baseline PARTICLE compares against."""

    family = "pixels"
    num_layers = 1
    default_layers = (0,)

    def __init__(self, name: str, cell: int = 4):
        super().__init__(name, IMAGENET_MEAN, IMAGENET_STD, "none")
        self.cell = cell
        self.reductions = [cell]
        self.channels = [3]

    def forward_features(self, x, layers, facet=None, saliency=False, stride=None):
        s = stride or self.cell
        return [F.avg_pool2d(x, s, s, ceil_mode=True)], None


class TimmCNN(Backbone):
    """Any timm CNN through ``forward_intermediates`` (stage indices as in ``feature_info``)."""

    family = "cnn"

    def __init__(self, name: str, net: nn.Module, mean, std, weights: str, default_layers=(2, 3, 4)):
        super().__init__(name, mean, std, weights)
        self.net = net
        info = net.feature_info
        self.reductions = [int(f["reduction"]) for f in info]
        self.channels = [int(f["num_chs"]) for f in info]
        self.num_layers = len(info)
        self.default_layers = tuple(default_layers)

    def forward_features(self, x, layers, facet=None, saliency=False, stride=None):
        if facet not in (None, "token"):
            raise PartkitError(f"--facet {facet} applies to ViTs only; {self.name} is a CNN (use hypercolumn layers)")
        if saliency:
            raise PartkitError(f"--saliency needs a ViT's CLS attention; {self.name} is a CNN")
        if stride:
            raise PartkitError("--stride overrides a ViT's patch stride; for CNNs use --grid-stride")
        feats = self.net.forward_intermediates(x, indices=list(layers), intermediates_only=True)
        return list(feats), None

    @property
    def last_channels(self) -> int:
        return int(self.net.num_features)

    def forward_last(self, x):
        return self.net.forward_features(x), None


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)  # B, heads, N, hd


def _cls_saliency(q: torch.Tensor, k: torch.Tensor, heads: int, prefix: int) -> torch.Tensor:
    """Mean over heads of the CLS token's attention to each patch, scaled so the max is 1."""
    qh, kh = _split_heads(q[:, :1], heads), _split_heads(k, heads)
    attn = (qh @ kh.transpose(-2, -1)) * (qh.shape[-1] ** -0.5)
    attn = attn.softmax(-1)[:, :, 0, prefix:].mean(1)  # B, N_patches
    return attn / attn.amax(-1, keepdim=True).clamp_min(1e-12)


class _ViTBase(Backbone):
    family = "vit"
    default_layers = (-1,)
    prefix = 1

    def _run(self, tokens: torch.Tensor, blocks, qkv_fn, layers, facet, saliency, heads):
        """Run ``blocks`` and collect the requested facet at each layer; (features, saliency)."""
        facet = facet or "token"
        if facet not in FACETS:
            raise PartkitError(f"unknown --facet {facet!r}; choose one of {', '.join(FACETS)}")
        wanted = set(layers)
        last = len(blocks) - 1 if saliency else max(layers)
        out: dict[int, torch.Tensor] = {}
        sal = None
        for i, blk in enumerate(blocks):
            if (i in wanted and facet != "token") or (saliency and i == last):
                q, k, v = qkv_fn(blk, tokens)
                if i in wanted and facet != "token":
                    out[i] = {"query": q, "key": k, "value": v}[facet]
                if saliency and i == last:
                    sal = _cls_saliency(q, k, heads, self.prefix)
            tokens = blk(tokens)
            if i in wanted and facet == "token":
                out[i] = tokens
            if i >= last:
                break
        return [out[i] for i in layers], sal

    def _embed(self, x, stride):
        """Preprocessed images -> (tokens with prefix, blocks, grid height, grid width)."""
        raise NotImplementedError

    def forward_features(self, x, layers, facet=None, saliency=False, stride=None):
        tokens, blocks, gh, gw = self._embed(x, stride)
        feats, sal = self._run(tokens, blocks, self._qkv, layers, facet, saliency, self.heads)
        return self._to_maps(feats, sal, gh, gw)

    def forward_cls(self, x: torch.Tensor, layers: Sequence[int], facet: Optional[str] = None) -> list[torch.Tensor]:
        """The CLS token (``B x C``) of ``facet`` at each of ``layers``: a whole-input embedding."""
        tokens, blocks, _, _ = self._embed(x, None)
        feats, _ = self._run(tokens, blocks, self._qkv, layers, facet, False, self.heads)
        return [f[:, 0] for f in feats]

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_channels(self) -> int:
        return int(self.channels[-1])

    def forward_last(self, x):
        tokens, blocks, gh, gw = self._embed(x, None)
        for blk in blocks:
            tokens = blk(tokens)
        tokens = self._final_norm(tokens)
        maps, _ = self._to_maps([tokens], None, gh, gw)
        return maps[0], tokens[:, 0]

    def _to_maps(self, feats, sal, gh, gw):
        maps = [f[:, self.prefix:].transpose(1, 2).reshape(f.shape[0], -1, gh, gw) for f in feats]
        if sal is not None:
            sal = sal.reshape(-1, gh, gw)
        return maps, sal


class TimmViT(_ViTBase):
    """timm VisionTransformer family (DINO, DINOv2, DeiT, MAE, ...), any input size and stride."""

    def __init__(self, name: str, net: nn.Module, mean, std, weights: str, default_layers=(-1,)):
        patch = net.patch_embed.patch_size
        super().__init__(name, mean, std, weights, patch_size=int(patch[0]))
        self.net = net
        self.num_layers = len(net.blocks)
        self.prefix = net.num_prefix_tokens
        self.heads = net.blocks[0].attn.num_heads
        self.reductions = [self.patch_size] * self.num_layers
        self.channels = [net.embed_dim] * self.num_layers
        self.default_layers = tuple(default_layers)

    def _final_norm(self, tokens):
        return self.net.norm(tokens)

    def _qkv(self, blk, tokens):
        attn = blk.attn
        if getattr(attn, "qkv", None) is None:
            raise PartkitError(f"{self.name}: its attention has no fused qkv layer, so only --facet token works")
        qkv = attn.qkv(blk.norm1(tokens))
        return qkv.chunk(3, dim=-1)

    def _embed(self, x, stride):
        net = self.net
        proj = net.patch_embed.proj
        x = F.conv2d(x, proj.weight, proj.bias, stride=stride or proj.stride)
        B, C, gh, gw = x.shape
        x = net.patch_embed.norm(x.permute(0, 2, 3, 1))  # NHWC: timm resamples pos_embed to (gh, gw)
        x = net.norm_pre(net.patch_drop(net._pos_embed(x)))
        return x, net.blocks, gh, gw


class OpenClipViT(_ViTBase):
    """open_clip's VisionTransformer image tower (dense tokens, any input size and stride)."""

    def __init__(self, name: str, visual: nn.Module, mean, std, weights: str, default_layers=(-1,)):
        patch = visual.conv1.kernel_size
        super().__init__(name, mean, std, weights, patch_size=int(patch[0]))
        self.visual = visual
        blocks = visual.transformer.resblocks
        self.num_layers = len(blocks)
        self.heads = blocks[0].attn.num_heads
        width = visual.conv1.out_channels
        self.reductions = [self.patch_size] * self.num_layers
        self.channels = [width] * self.num_layers
        self.default_layers = tuple(default_layers)
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    def _final_norm(self, tokens):
        return self.visual.ln_post(tokens)

    @staticmethod
    def _qkv(blk, tokens):
        blk = getattr(blk, "block", blk)  # unwrap _SeqFirst; layer norm and projection are layout-free
        qkv = F.linear(blk.ln_1(tokens), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        return qkv.chunk(3, dim=-1)

    def _embed(self, x, stride):
        from timm.layers import resample_abs_pos_embed

        v = self.visual
        x = F.conv2d(x, v.conv1.weight, v.conv1.bias, stride=stride or v.conv1.stride)
        B, C, gh, gw = x.shape
        x = x.reshape(B, C, -1).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = resample_abs_pos_embed(v.positional_embedding[None], [gh, gw], old_size=list(v.grid_size),
                                     num_prefix_tokens=1)[0]
        x = v.ln_pre(x + pos.to(x.dtype))
        blocks = v.transformer.resblocks
        if not self.batch_first:
            blocks = [_SeqFirst(b) for b in blocks]
        return x, blocks, gh, gw


class _SeqFirst(nn.Module):
    """Adapt a sequence-first block to batch-first tokens."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x.transpose(0, 1)).transpose(0, 1)
