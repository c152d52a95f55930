"""Map between a feature grid and image pixels, using the geometry recorded in ``feat.json``.

``extract`` resizes an image by ``scale`` (keeping aspect), runs the network, and crops the
feature map to the cells that cover the image. Cell ``(i, j)`` covers resized pixels
``[i*stride, (i+1)*stride)`` (shifted by ``offset`` for overlapping ViT patches), i.e. image
pixels ``[i*stride/scale, (i+1)*stride/scale)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["image_to_cell_index", "grid_to_image", "mask_to_grid"]


def image_to_cell_index(meta: dict, height: int | None = None, width: int | None = None):
    """For each image row and column, the feature-grid row and column that covers it."""
    H, W = meta["image_size"] if height is None else (height, width)
    gh, gw = meta["grid"]
    off = meta.get("offset", 0.0)  # overlapping ViT patches: cell i is centred at i*stride + patch/2
    # resized-input coordinate of each pixel centre, then the cell that holds it
    ys = (np.arange(H) + 0.5) * (meta["resized"][0] / H)
    xs = (np.arange(W) + 0.5) * (meta["resized"][1] / W)
    rows = np.clip(np.floor((ys - off) / meta["stride"]), 0, gh - 1).astype(np.int64)
    cols = np.clip(np.floor((xs - off) / meta["stride"]), 0, gw - 1).astype(np.int64)
    return rows, cols


def grid_to_image(grid: np.ndarray, meta: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Nearest-neighbour upsampling of a grid-shaped array (labels, saliency) to image size."""
    rows, cols = image_to_cell_index(meta, height, width)
    return grid[..., rows[:, None], cols[None, :]]


def mask_to_grid(mask: np.ndarray, meta: dict) -> np.ndarray:
    """Fraction of each feature cell covered by an image-resolution boolean mask (h x w floats)."""
    gh, gw = meta["grid"]
    rows, cols = image_to_cell_index(meta, *mask.shape)
    flat = rows[:, None] * gw + cols[None, :]
    covered = np.bincount(flat.ravel(), weights=mask.ravel().astype(np.float64), minlength=gh * gw)
    total = np.bincount(flat.ravel(), minlength=gh * gw)
    return (covered / np.maximum(total, 1)).reshape(gh, gw)
