"""Point-splatting renderer in torch: views of a point cloud, the point seen at every pixel, and back.

Each point is drawn as a square of half-width ``radius`` pixels at its projected centre; a
z-buffer keeps the nearest. Depth and point index are packed into one int64 key (depth in the
high bits), so one ``scatter_reduce(amin)`` over all views, then a min filter for the splat
extent, resolve visibility with no loop over points. The result keeps, for every pixel, the
index of the visible point (-1 for background), which is what back-projection of 2D labels needs.

>>> r = render_points(points, normals, size=224)  # doctest: +SKIP
>>> r.image.shape, r.index.shape  # (V, H, W, 3) uint8, (V, H, W) int64  # doctest: +SKIP
>>> votes = backproject(r.index, labels_2d, len(points), num_classes=4)  # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import PartkitError
from .pointcloud import normalize
from .viz import label_colors, save_png, titled

__all__ = ["DEFAULT_ELEVATIONS", "DEFAULT_AZIMUTHS", "Cameras", "Rendering", "make_cameras", "auto_radius",
           "render_points", "backproject", "render_views_png"]

# 10 views: a ring of 5 above and 5 below the equator (ShapeNet is y-up), as PartSLIP's 10 views.
DEFAULT_ELEVATIONS = (30.0, -20.0)
DEFAULT_AZIMUTHS = (0.0, 72.0, 144.0, 216.0, 288.0)
_INDEX_BITS = 31  # points per cloud < 2**31; depth takes the bits above
_DEPTH_LEVELS = (1 << 31) - 1
_EMPTY = torch.iinfo(torch.int64).max
_BASE_GREY = 0.78  # grey points on white, as PartSLIP's renders


@dataclass
class Cameras:
    """Pinhole cameras looking at the origin: world -> camera rotations, positions, focal length."""

    rotation: torch.Tensor  # (V, 3, 3): rows are the camera's right, up and forward axes
    eye: torch.Tensor  # (V, 3)
    focal: float  # pixels
    size: int  # square images of size x size pixels

    def __len__(self) -> int:
        return len(self.eye)

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3) world points -> pixel x, pixel y and depth, each (V, N)."""
        t = torch.einsum("vij,vj->vi", self.rotation, self.eye)
        cam = torch.matmul(points, self.rotation.transpose(1, 2)) - t[:, None]  # (V, N, 3)
        x, y, z = cam.unbind(-1)
        f = self.focal / z.clamp_min(1e-6)
        c = self.size / 2
        return c + f * x, c - f * y, z


def make_cameras(elevations: Sequence[float] = DEFAULT_ELEVATIONS, azimuths: Sequence[float] = DEFAULT_AZIMUTHS,
                 *, size: int = 224, distance: float = 2.5, margin: float = 0.95, device=None) -> Cameras:
    """One camera per (elevation, azimuth) pair of the two lists (degrees), aimed at the origin.

    The focal length makes the unit sphere fill ``margin`` of the image at ``distance``.
    """
    if size < 8:
        raise PartkitError(f"render size must be at least 8 pixels, got {size}")
    if distance <= 1.0:
        raise PartkitError(f"camera distance must exceed the unit sphere's radius 1, got {distance}")
    if not elevations or not azimuths:
        raise PartkitError("give at least one elevation and one azimuth")
    rows, eyes = [], []
    for el in elevations:
        for az in azimuths:
            e, a = math.radians(el), math.radians(az)
            eye = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)]) * distance
            fwd = -eye / np.linalg.norm(eye)
            up = np.array([0.0, 1.0, 0.0]) if abs(fwd[1]) < 0.999 else np.array([0.0, 0.0, -1.0])
            right = np.cross(fwd, up)
            right /= np.linalg.norm(right)
            rows.append(np.stack([right, np.cross(right, fwd), fwd]))
            eyes.append(eye)
    half = math.asin(1.0 / distance)
    focal = margin * (size / 2) / math.tan(half)
    return Cameras(torch.tensor(np.stack(rows), dtype=torch.float32, device=device),
                   torch.tensor(np.stack(eyes), dtype=torch.float32, device=device), float(focal), int(size))


def auto_radius(num_points: int, size: int) -> int:
    """A splat half-width (pixels) that closes the gaps between points without blurring parts."""
    return max(1, math.ceil(0.9 * size / math.sqrt(max(num_points, 1))))


@dataclass
class Rendering:
    """Views of one point cloud. ``index[v, y, x]`` is the point seen there, -1 for background."""

    image: torch.Tensor  # (V, H, W, 3) uint8
    index: torch.Tensor  # (V, H, W) int64
    depth: torch.Tensor  # (V, H, W) float32, inf for background
    cameras: Cameras
    radius: int

    @property
    def foreground(self) -> torch.Tensor:
        return self.index >= 0


def _zbuffer(cams: Cameras, points: torch.Tensor, radius: int, near: float, far: float, fill: int = 0,
             hole_depth: float = 0.1) -> torch.Tensor:
    """Packed (depth, index) key of the nearest splat at every pixel, (V, H*W); ``_EMPTY`` if none.

    Each point's key goes to its centre pixel with one ``scatter_reduce(amin)`` over all views;
    a square splat of half-width ``radius`` is then a min filter of that buffer (the nearest
    point whose splat covers a pixel is the nearest centre within ``radius`` of it). ``fill`` > 0
    then closes see-through holes (:func:`_fill_holes`) within that many pixels.
    """
    V, N, S = len(cams), len(points), cams.size
    px, py, z = cams.project(points)
    x0, y0 = px.floor().to(torch.int64), py.floor().to(torch.int64)
    inside = (x0 >= 0) & (x0 < S) & (y0 >= 0) & (y0 < S) & (z > 0)
    q = ((z - near) / (far - near)).clamp(0, 1) * _DEPTH_LEVELS
    key = (q.to(torch.int64) << _INDEX_BITS) | torch.arange(N, device=points.device)  # nearer first, then lower index
    key = torch.where(inside, key, torch.full_like(key, _EMPTY))  # outside points aim at pixel 0 and never win
    view = torch.arange(V, device=points.device)[:, None]
    flat = torch.where(inside, (view * S + y0) * S + x0, torch.zeros_like(x0))
    keys = torch.full((V * S * S,), _EMPTY, dtype=torch.int64, device=points.device)
    keys.scatter_reduce_(0, flat.reshape(-1), key.reshape(-1), reduce="amin")
    keys = keys.view(V, S, S)
    if radius > 0:
        keys = _window_min(keys, radius)
    if fill > 0:
        keys = _fill_holes(keys, fill, int(hole_depth / (far - near) * _DEPTH_LEVELS))
    return keys.reshape(V, S * S)


def _window_min(keys: torch.Tensor, w: int) -> torch.Tensor:
    """Minimum over the (2w+1)^2 window around each pixel of (V, H, W) int64 keys (int64 has no min-pool).

    Separable, and each axis by doubling: log2(2w+1) + 1 elementwise minima instead of 2w+1.
    """
    V, H, W = keys.shape
    length = 2 * w + 1
    f = torch.full((V, H + 2 * w, W + 2 * w), _EMPTY, dtype=keys.dtype, device=keys.device)
    f[:, w:w + H, w:w + W] = keys
    for dim, n in ((1, H), (2, W)):
        m = 1
        while 2 * m <= length:  # f[i] = min over [i, i + m) along the padded axis
            f = torch.minimum(f.narrow(dim, 0, f.shape[dim] - m), f.narrow(dim, m, f.shape[dim] - m))
            m *= 2
        f = torch.minimum(f.narrow(dim, 0, n), f.narrow(dim, length - m, n))
    return f


def _fill_holes(keys: torch.Tensor, w: int, depth_q: int) -> torch.Tensor:
    """Where a surface shows through a gap between the splats of a nearer one, draw the nearer one.

    A foreground pixel much deeper (by ``depth_q``) than the nearest point within ``w`` pixels
    sees through a hole; it takes that nearest point, so back-facing points never leak through.
    """
    near = _window_min(keys, w)
    fg = keys != _EMPTY
    hole = fg & ((keys >> _INDEX_BITS) > (near >> _INDEX_BITS) + depth_q)
    return torch.where(hole, near, keys)


def render_points(points, normals=None, colors=None, *, cameras: Optional[Cameras] = None,
                  elevations: Sequence[float] = DEFAULT_ELEVATIONS, azimuths: Sequence[float] = DEFAULT_AZIMUTHS,
                  size: int = 224, radius: Optional[int] = None, distance: float = 2.5,
                  fill_holes: Optional[int] = None, device=None) -> Rendering:
    """Render a point cloud (inside the unit sphere) from every camera.

    Shading is Lambertian from ``normals`` with a light at the camera (two-sided, so flipped
    normals shade alike), or by depth without normals; points are grey on white unless
    ``colors`` (N x 3 uint8) are given. Gaps between splats through which a farther surface
    shows are closed by the nearest point within ``fill_holes`` pixels (default ``2 * radius``;
    0 turns it off), so back faces stay hidden on sparse clouds.
    """
    pts = torch.as_tensor(np.asarray(points, np.float32) if not torch.is_tensor(points) else points,
                          dtype=torch.float32, device=device)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise PartkitError(f"points must be N x 3 with N >= 1, got shape {tuple(pts.shape)}")
    if len(pts) >= 1 << _INDEX_BITS:
        raise PartkitError(f"{len(pts)} points is too many to render (at most {(1 << _INDEX_BITS) - 1})")
    device = pts.device
    cams = cameras or make_cameras(elevations, azimuths, size=size, distance=distance, device=device)
    radius = auto_radius(len(pts), cams.size) if radius is None else int(radius)
    if radius < 0:
        raise PartkitError(f"splat radius must be >= 0 pixels, got {radius}")
    dist = cams.eye.norm(dim=1)
    near, far = float(dist.min()) - 1.01, float(dist.max()) + 1.01
    fill = 2 * radius if fill_holes is None else int(fill_holes)
    keys = _zbuffer(cams, pts, radius, near, far, fill)
    V, S, N = len(cams), cams.size, len(pts)
    fg = keys != _EMPTY
    index = torch.where(fg, keys & ((1 << _INDEX_BITS) - 1), torch.full_like(keys, -1))
    depth = torch.where(fg, (keys >> _INDEX_BITS).float() * ((far - near) / _DEPTH_LEVELS) + near,
                        torch.full(keys.shape, float("inf"), device=device))
    # shade every (view, point) once, then look the values up per pixel: no boolean indexing
    if normals is not None:
        nrm = torch.as_tensor(np.asarray(normals, np.float32) if not torch.is_tensor(normals) else normals,
                              dtype=torch.float32, device=device)
        to_eye = cams.eye[:, None] - pts[None]  # (V, N, 3)
        lam = (nrm[None] * to_eye).sum(-1).abs() / (nrm.norm(dim=1)[None] * to_eye.norm(dim=-1)).clamp_min(1e-9)
        shade = 0.35 + 0.65 * lam
    else:
        _, _, z = cams.project(pts)
        shade = 1.0 - 0.6 * ((z - (dist[:, None] - 1.0)) / 2.0).clamp(0, 1)
    flat = (torch.arange(V, device=device)[:, None] * N + index.clamp_min(0)).reshape(-1)
    pix = shade.reshape(-1)[flat].view(V, S * S, 1)
    if colors is not None:
        col = torch.as_tensor(np.asarray(colors), device=device).float()
        value = col[index.clamp_min(0)] * (0.55 + 0.45 * pix)
    else:
        value = (255 * _BASE_GREY) * pix
    image = torch.where(fg[..., None], value, torch.full_like(value, 255.0))
    image = image.round_().clamp_(0, 255).to(torch.uint8).expand(V, S * S, 3).contiguous()
    return Rendering(image.view(V, S, S, 3), index.view(V, S, S), depth.view(V, S, S), cams, radius)


def backproject(index: torch.Tensor, labels: torch.Tensor, num_points: int, num_classes: int,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Votes (num_points x num_classes): each pixel adds its weight to (its visible point, its label).

    ``labels`` has the shape of ``index``; pixels with ``index < 0`` (background) or
    ``labels < 0`` (unlabelled) do not vote. A point no pixel voted for has all-zero votes.
    """
    index, labels = torch.as_tensor(index), torch.as_tensor(labels, device=index.device)
    if labels.shape != index.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and index {tuple(index.shape)} differ in shape")
    ok = (index >= 0) & (labels >= 0)
    if (labels[ok] >= num_classes).any():
        raise ValueError(f"a label exceeds num_classes={num_classes}")
    w = torch.ones(int(ok.sum()), device=index.device) if weights is None else \
        torch.as_tensor(weights, device=index.device, dtype=torch.float32)[ok]
    votes = torch.zeros(num_points * num_classes, device=index.device)
    votes.index_add_(0, index[ok] * num_classes + labels[ok].long(), w)
    return votes.view(num_points, num_classes)


def render_views_png(path: Optional[str], points: np.ndarray, panels: Sequence[tuple[str, Optional[np.ndarray]]], *,
                     normals: Optional[np.ndarray] = None, elevations: Sequence[float] = (25.0,),
                     azimuths: Sequence[float] = (30.0, 150.0, 270.0), size: int = 256,
                     radius: Optional[int] = None) -> np.ndarray:
    """One picture of a point cloud: a row per panel (title, N labels, N x 3 colours or None for
    grey), a column per view.

    Writes a PNG when ``path`` is given; returns the H x W x 3 uint8 picture.
    """
    pts = torch.from_numpy(normalize(points)[0])
    cams = make_cameras(elevations, azimuths, size=size)
    rows = []
    for title, values in panels:
        if values is None:  # no labels: every point grey, shaded
            values = np.full((len(points), 3), int(255 * _BASE_GREY), np.uint8)
        values = np.asarray(values)
        colors = values if values.ndim == 2 else label_colors(values)
        r = render_points(pts, normals, colors, cameras=cams, radius=radius)
        rows.append(titled(np.concatenate(list(r.image.numpy()), axis=1), title, bar=18, font_size=None))
    picture = np.concatenate(rows, axis=0) if rows else np.full((size, size, 3), 255, np.uint8)
    if path:
        save_png(path, picture)
    return picture
