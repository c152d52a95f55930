"""A query-based part decoder (Mask2Former-style) over frozen dense features.

Input: a hypercolumn grid ``B x C x h x w`` (the concatenation of several backbone levels,
as ``extract`` writes it). The pixel decoder fuses the levels FPN-style into mask features at
twice the grid resolution; N learned queries go through L layers of masked cross-attention
(each layer attends only where the previous layer's mask is on), self-attention and FFN.
Each query yields a mask logit map, class logits (C classes + no-part; C = 1, "part", when
class-agnostic) and a feature vector.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderConfig", "PartDecoder"]


@dataclass
class DecoderConfig:
    in_channels: int
    level_channels: Sequence[int] = ()  # channel groups of the hypercolumn (one per backbone level)
    hidden_dim: int = 128
    num_queries: int = 200  # PartDistillation: MASK_FORMER.NUM_OBJECT_QUERIES 200 (Swin-L base config)
    num_layers: int = 3
    num_heads: int = 4
    ffn_dim: int = 512
    num_classes: int = 1  # 1 = class-agnostic "part"; C for a class list (rank --as-targets, gt part names)
    dropout: float = 0.0
    # class-aware decoders: [label id, name] per class index (the ids of the label map trained on)
    classes: Optional[list] = None

    def __post_init__(self):
        if self.classes is not None:
            self.classes = [[int(i), str(n)] for i, n in self.classes]
            self.num_classes = len(self.classes)
        self.level_channels = list(self.level_channels) or [self.in_channels]
        if sum(self.level_channels) != self.in_channels:
            self.level_channels = [self.in_channels]

    def validate(self) -> "DecoderConfig":
        """One-line errors for shapes the decoder cannot be built with."""
        from ..training import check_count, check_rate, require

        check_count("--queries", self.num_queries, fix="pass --queries 200 or another count of part queries")
        check_count("--dec-layers", self.num_layers)
        check_count("num_heads", self.num_heads)
        check_count("ffn_dim", self.ffn_dim)
        check_count("num_classes", self.num_classes)
        require(self.classes is None or len(self.classes) > 0, "the class list", self.classes,
                "at least one class", "train on a label map whose ids name classes, or class-agnostic")
        check_count("--hidden", self.hidden_dim, 4)
        step = math.lcm(4, self.num_heads)
        require(self.hidden_dim % step == 0, "--hidden", self.hidden_dim,
                f"a multiple of {step} (the {self.num_heads} attention heads, and 4 for the 2-D position encoding)",
                f"pass e.g. --hidden {max(1, self.hidden_dim // step) * step}")
        check_rate("dropout", self.dropout, high=1.0, strict=False)
        require(self.dropout < 1, "dropout", self.dropout, "below 1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def class_aware(self) -> bool:
        return self.classes is not None

    def class_ids(self) -> list[int]:
        """Label id per class index (``[1]`` for the class-agnostic "part")."""
        return [i for i, _ in self.classes] if self.classes is not None else [1]

    def class_names(self) -> list[str]:
        return [n for _, n in self.classes] if self.classes is not None else ["part"]


def sine_position(h: int, w: int, dim: int, device) -> torch.Tensor:
    """2-D sine positional encoding, ``(h*w) x dim`` (DETR)."""
    d = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(d, device=device, dtype=torch.float32) / d))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] * freq[None], xs[:, None] * freq[None]
    pos = torch.cat([
        torch.cat([py.sin(), py.cos()], 1)[:, None, :].expand(h, w, 2 * d),
        torch.cat([px.sin(), px.cos()], 1)[None, :, :].expand(h, w, 2 * d)], dim=2)
    pos = pos.reshape(h * w, 4 * d)
    return F.pad(pos, (0, dim - 4 * d))


class PixelDecoder(nn.Module):
    """Lateral 1x1 projection per level, summed, smoothed, upsampled x2 into mask features."""

    def __init__(self, level_channels: Sequence[int], dim: int):
        super().__init__()
        self.splits = list(level_channels)
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in self.splits)
        self.smooth = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.ReLU())
        # 1x1 convs at the doubled resolution: 3x3 convs there cost 9x more for little gain
        self.up = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GroupNorm(8, dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (memory at grid resolution, mask features at 2x grid resolution)."""
        levels = torch.split(x, self.splits, dim=1)
        fused = sum(lat(lv) for lat, lv in zip(self.lateral, levels))
        memory = self.smooth(fused)
        mask_feat = self.up(F.interpolate(memory, scale_factor=2, mode="bilinear", align_corners=False))
        return memory, mask_feat


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN (post-norm, as Mask2Former)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q, qpos, memory, mpos, attn_mask):
        q = self.n1(q + self.cross(q + qpos, memory + mpos, memory, attn_mask=attn_mask, need_weights=False)[0])
        q = self.n2(q + self.self_attn(q + qpos, q + qpos, q, need_weights=False)[0])
        return self.n3(q + self.ffn(q))


class PartDecoder(nn.Module):
    """Frozen features in, part proposals out: ``forward(feats) -> dict`` of per-layer predictions.

    >>> dec = PartDecoder(DecoderConfig(in_channels=64, num_queries=10))
    >>> out = dec(torch.randn(2, 64, 12, 16))
    >>> out["pred_masks"].shape, out["pred_logits"].shape, out["query_feats"].shape
    (torch.Size([2, 10, 24, 32]), torch.Size([2, 10, 2]), torch.Size([2, 10, 128]))
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.pixel = PixelDecoder(cfg.level_channels, d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_pos = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.class_head = nn.Linear(d, cfg.num_classes + 1)  # last logit = no-part
        self.mask_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def _predict(self, q, mask_feat, memory_hw, last: bool = False):
        qn = self.norm(q)
        logits = self.class_head(qn)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(qn), mask_feat)
        if last:
            return logits, masks, qn, None
        # attention mask for the next layer: attend only where this mask is on (True = blocked)
        small = F.interpolate(masks, size=memory_hw, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2)
        blocked[blocked.all(-1)] = False  # an empty mask attends everywhere instead of nowhere
        return logits, masks, qn, blocked

    def forward(self, feats: torch.Tensor) -> dict:
        memory, mask_feat = self.pixel(feats)
        B, d, h, w = memory.shape
        mem = memory.flatten(2).transpose(1, 2) + self.level_embed
        mpos = sine_position(h, w, d, feats.device)[None]
        q = self.query_feat.weight[None].expand(B, -1, -1)
        qpos = self.query_pos.weight[None].expand(B, -1, -1)
        heads = self.cfg.num_heads
        aux = []
        n = len(self.layers)
        logits, masks, qn, blocked = self._predict(q, mask_feat, (h, w), last=n == 0)
        for i, layer in enumerate(self.layers):
            aux.append({"pred_logits": logits, "pred_masks": masks})
            attn = blocked.repeat_interleave(heads, dim=0)
            q = layer(q, qpos, mem, mpos, attn)
            # the last layer's masks feed no attention: no mask for it
            logits, masks, qn, blocked = self._predict(q, mask_feat, (h, w), last=i == n - 1)
        return {"pred_logits": logits, "pred_masks": masks, "query_feats": qn, "aux_outputs": aux}

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """Score of each query: its most probable class's probability (with one class, 1 - no-part)."""
        return PartDecoder.classify(logits)[0]

    @staticmethod
    def classify(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, class index) of each query: max and argmax of the class probabilities, no-part left
        out (Guided Distillation's pseudo-label rule; Mask2Former's per-query class)."""
        return logits.float().softmax(-1)[..., :-1].max(-1)
