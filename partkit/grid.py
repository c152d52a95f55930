"""Map between a feature grid and image pixels, using the geometry recorded in ``feat.json``.

``extract`` resizes an image by ``scale`` (keeping aspect), runs the network, and crops the
feature map to the cells that cover the image. Cell ``(i, j)`` covers resized pixels
``[i*stride, (i+1)*stride)`` (shifted by ``offset`` for overlapping ViT patches), i.e. image
pixels ``[i*stride/scale, (i+1)*stride/scale)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["image_to_cell_index", "grid_to_image", "mask_to_grid", "sample_on_grid"]


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


def sample_on_grid(image_map: np.ndarray, meta: dict, factor: int = 1, fill: int = 0) -> np.ndarray:
    """Nearest samples of an image-resolution map at the centres of the grid's sub-cells.

    Returns ``(h*factor) x (w*factor)``: the image map aligned with the feature grid (cells
    beyond the image, i.e. padding, get ``fill``).
    """
    gh, gw = meta["grid"]
    H, W = image_map.shape[:2]
    step = meta["stride"] / factor
    off = meta.get("offset", 0.0)
    ys = ((np.arange(gh * factor) + 0.5) * step + off) * (H / meta["resized"][0])
    xs = ((np.arange(gw * factor) + 0.5) * step + off) * (W / meta["resized"][1])
    rows, cols = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    out = np.full((gh * factor, gw * factor) + image_map.shape[2:], fill, dtype=image_map.dtype)
    ry, cx = rows < H, cols < W
    out[np.ix_(ry, cx)] = image_map[np.ix_(rows[ry], cols[cx])]
    return out
