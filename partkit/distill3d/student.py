"""The point-cloud student: a DGCNN-style segmentation network (EdgeConv on the xyz kNN graph)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n, 3) -> (B, n, k) indices of each point's k nearest points (itself included)."""
    return torch.cdist(x, x).topk(k, dim=-1, largest=False).indices


class EdgeConv(nn.Module):
    """DGCNN's EdgeConv with a one-layer edge MLP: ``max_j act(norm(W [x_i, x_j - x_i]))``.

    ``W [x_i, x_j - x_i] = (W1 - W2) x_i + W2 x_j``, and the normalisation and LeakyReLU are
    monotone, so the max over neighbours moves inside: ``act(norm((W1 - W2) x_i + max_j W2 x_j))``.
    That is exact up to BatchNorm's statistics being taken over points instead of edges (and the
    sign of its scale), and costs a gather and a max per layer instead of normalising and
    activating every edge (measured ~5x faster on CPU at 2,048 points, k=16).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.lin = nn.Linear(2 * cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.cin = cin

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        k = idx.shape[-1]
        w1, w2 = self.lin.weight[:, :self.cin], self.lin.weight[:, self.cin:]
        centre, nbr = x @ (w1 - w2).t(), x @ w2.t()
        flat = (idx + torch.arange(B, device=x.device).view(B, 1, 1) * n).reshape(B * n, k)
        nbr = nbr.reshape(B * n, -1)
        with torch.no_grad():  # find each channel's arg-max neighbour, then gather it with autograd:
            arg = nbr.index_select(0, flat.reshape(-1)).view(B * n, k, -1).max(1).indices  # the backward pass
        nbr_max = nbr.gather(0, flat.gather(1, arg))  # scatters B*n*C gradients, not B*n*k*C
        h = self.bn(centre.reshape(B * n, -1) + nbr_max)
        return F.leaky_relu(h, 0.2).view(B, n, -1)


class PointStudent(nn.Module):
    """A DGCNN-style segmentation network: ``depth`` EdgeConvs on the xyz kNN graph, a global max-pooled
    descriptor, and a per-point head. With ``text`` (P x D unit embeddings) the logits are scaled
    cosine similarities to them, so the classes are the part names."""

    def __init__(self, in_dim: int, num_classes: int, *, width: int = 64, depth: int = 3, k: int = 16,
                 text: Optional[torch.Tensor] = None):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList([EdgeConv(in_dim if i == 0 else width, width) for i in range(depth)])
        cat = width * depth
        self.glob = nn.Sequential(nn.Linear(cat, 4 * width, bias=False), nn.LayerNorm(4 * width), nn.LeakyReLU(0.2))
        out = num_classes if text is None else text.shape[1]
        self.head = nn.Sequential(nn.Linear(cat + 4 * width, 2 * width, bias=False), nn.LayerNorm(2 * width),
                                  nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(2 * width, out))
        if text is not None:
            self.register_buffer("text", F.normalize(text.float(), dim=1))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.text = None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, n, in_dim) with xyz first -> (B, n, classes) logits."""
        idx = knn_graph(feats[..., :3], min(self.k, feats.shape[1]))
        h, outs = feats, []
        for conv in self.convs:
            h = conv(h, idx)
            outs.append(h)
        local = torch.cat(outs, -1)
        g = self.glob(local).amax(1, keepdim=True).expand(-1, local.shape[1], -1)
        y = self.head(torch.cat([local, g], -1))
        if self.text is not None:
            y = F.normalize(y, dim=-1) @ self.text.t() * self.logit_scale.clamp(max=math.log(100)).exp()
        return y
