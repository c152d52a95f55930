"""Hungarian matching and the set losses of Mask2Former, on sampled points to bound memory."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = ["point_sample", "uncertain_points", "HungarianMatcher", "SetCriterion"]


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``x`` (N x C x H x W or N x H x W) at ``coords`` (N x P x 2, in [0, 1])."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x[:, None]
    out = F.grid_sample(x, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False)[..., 0]  # N x C x P
    return out[:, 0] if squeeze else out


def uncertain_points(logits: torch.Tensor, num: int, oversample: float, importance: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend sampling: most uncertain (|logit| near 0) of oversampled points, plus random ones."""
    n = logits.shape[0]
    over = int(num * oversample)
    coords = torch.rand(n, over, 2, generator=generator).to(logits.device)  # a CPU generator, any device
    unc = -point_sample(logits[:, None], coords)[:, 0].abs()
    k = int(importance * num)
    idx = unc.topk(k, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rand = torch.rand(n, num - k, 2, generator=generator).to(logits.device)
    return torch.cat([picked, rand], dim=1)


def _dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    inputs = inputs.sigmoid()
    num = 2 * inputs @ targets.T
    den = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def _bce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = inputs.shape[1]
    pos, neg = F.softplus(-inputs), F.softplus(inputs)  # BCE against 1 and against 0
    return (pos @ targets.T + neg @ (1 - targets).T) / p


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target masks (scipy ``linear_sum_assignment``)."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 1024):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, logits, masks, targets: Sequence[dict], generator=None) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        probs = logits.softmax(-1)
        for b, t in enumerate(targets):
            tm = t["masks"]
            if tm.shape[0] == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            coords = torch.rand(1, self.num_points, 2, generator=generator).to(masks.device)
            pm = point_sample(masks[b][:, None], coords.expand(masks.shape[1], -1, -1))[:, 0].float()
            gm = point_sample(tm[:, None].float(), coords.expand(tm.shape[0], -1, -1))[:, 0]
            cost = (self.cost_class * -probs[b][:, t["labels"]] + self.cost_mask * _bce_cost(pm, gm)
                    + self.cost_dice * _dice_cost(pm, gm))
            q, g = linear_sum_assignment(cost.cpu().numpy())
            out.append((q.astype(np.int64), g.astype(np.int64)))
        return out


class SetCriterion(nn.Module):
    """CE (down-weighted no-part class) + BCE + dice on matched masks, with aux losses per layer."""

    def __init__(self, num_classes: int = 1, no_part_weight: float = 0.1, weight_class: float = 2.0,
                 weight_mask: float = 5.0, weight_dice: float = 5.0, num_points: int = 1024,
                 oversample: float = 3.0, importance: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(weight_class, weight_mask, weight_dice, num_points)
        self.weights = {"class": weight_class, "mask": weight_mask, "dice": weight_dice}
        self.num_points, self.oversample, self.importance = num_points, oversample, importance
        empty = torch.ones(num_classes + 1)
        empty[-1] = no_part_weight
        self.register_buffer("class_weight", empty)

    def _single(self, logits, masks, targets, generator) -> dict:
        matches = self.matcher(logits, masks, targets, generator)
        B, Q = logits.shape[:2]
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.long, device=logits.device)
        for b, (q, g) in enumerate(matches):
            if len(q):
                target_classes[b, torch.as_tensor(q, device=logits.device)] = targets[b]["labels"][g]
        loss_class = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.class_weight)
        src = [masks[b, torch.as_tensor(q, device=masks.device)] for b, (q, _) in enumerate(matches)]
        tgt = [targets[b]["masks"][torch.as_tensor(g, device=masks.device)] for b, (_, g) in enumerate(matches)]
        src, tgt = torch.cat(src).float(), torch.cat(tgt).float()
        n = max(src.shape[0], 1)
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return {"class": loss_class, "mask": zero, "dice": zero}
        with torch.no_grad():
            coords = uncertain_points(src, self.num_points, self.oversample, self.importance, generator)
            labels = point_sample(tgt[:, None], coords)[:, 0]
        logits_p = point_sample(src[:, None], coords)[:, 0]
        loss_mask = F.binary_cross_entropy_with_logits(logits_p, labels, reduction="none").mean(1).sum() / n
        p = logits_p.sigmoid()
        loss_dice = (1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)).sum() / n
        return {"class": loss_class, "mask": loss_mask, "dice": loss_dice}

    def forward(self, outputs: dict, targets: Sequence[dict], generator=None) -> tuple[torch.Tensor, dict]:
        """-> (total weighted loss, dict of the final layer's unweighted terms)."""
        final = self._single(outputs["pred_logits"], outputs["pred_masks"], targets, generator)
        total = sum(self.weights[k] * v for k, v in final.items())
        for aux in outputs.get("aux_outputs", []):
            terms = self._single(aux["pred_logits"], aux["pred_masks"], targets, generator)
            total = total + sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in final.items()}
