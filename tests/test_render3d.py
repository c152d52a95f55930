"""The point-splatting renderer: visibility, the z-buffer, back-projection, pictures."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHAPENET
from partkit.errors import PartkitError
from partkit.render3d import backproject, make_cameras, render_points, render_views_png


def cube_points(n=40):
    """Points on a grid over the 6 faces of the cube [-0.5, 0.5]^3, with outward normals."""
    g = (np.arange(n) + 0.5) / n - 0.5
    u, v = [a.ravel() for a in np.meshgrid(g, g)]
    pts, nrm = [], []
    for axis in range(3):
        for side in (-0.5, 0.5):
            p = np.zeros((len(u), 3))
            p[:, axis] = side
            p[:, (axis + 1) % 3], p[:, (axis + 2) % 3] = u, v
            n_ = np.zeros_like(p)
            n_[:, axis] = np.sign(side)
            pts.append(p)
            nrm.append(n_)
    return np.concatenate(pts).astype(np.float32), np.concatenate(nrm).astype(np.float32)


def sphere_points(n=4000, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (0.9 * x).astype(np.float32), x.astype(np.float32)


def test_cube_back_faces_are_hidden():
    pts, nrm = cube_points()
    r = render_points(pts, nrm, elevations=[0], azimuths=[0], size=128, radius=2)  # camera on +z
    seen = torch.unique(r.index[r.index >= 0]).numpy()
    front = np.flatnonzero(nrm[:, 2] > 0.5)
    assert not (nrm[seen, 2] < -0.5).any()  # the back face is hidden entirely
    # the sides face away from the camera: only their row of samples at the rim, which lies just
    # beyond the front face's outermost samples in perspective, may show
    sides = seen[np.abs(nrm[seen, 2]) < 0.5]
    assert (pts[sides, 2] == pts[:, 2][np.abs(nrm[:, 2]) < 0.5].max()).all()
    assert len(set(seen) & set(front)) / len(front) > 0.95
    assert r.image.shape == (1, 128, 128, 3) and r.image.dtype == torch.uint8
    assert (r.image[0][r.index[0] < 0] == 255).all()  # white background
    assert r.image[0][r.index[0] >= 0].float().mean() < 250  # grey points


def test_sphere_shows_only_its_near_side_from_every_view():
    pts, nrm = sphere_points()
    r = render_points(pts, nrm, size=96)  # the default 10 views
    assert r.index.shape == (10, 96, 96)
    for v in range(10):
        seen = torch.unique(r.index[v][r.index[v] >= 0])
        to_eye = r.cameras.eye[v].numpy() - pts[seen.numpy()]
        facing = (nrm[seen.numpy()] * to_eye).sum(1) / np.linalg.norm(to_eye, axis=1)
        assert facing.min() > -0.05  # back-facing points never win a pixel (tolerance: the silhouette)
    assert torch.unique(r.index[r.index >= 0]).numel() > 0.9 * len(pts)  # 10 views see almost everything


def test_zbuffer_keeps_the_nearest_point():
    pts = np.array([[0, 0, 0.5], [0, 0, -0.5], [0.001, 0, 0.0]], np.float32)  # same pixel, camera on +z
    r = render_points(pts, None, elevations=[0], azimuths=[0], size=32, radius=1)
    centre = r.index[0, 16, 16]
    assert centre == 0 and set(torch.unique(r.index).tolist()) == {-1, 0}
    assert torch.isfinite(r.depth[0][r.index[0] >= 0]).all() and torch.isinf(r.depth[0][r.index[0] < 0]).all()
    assert abs(float(r.depth[0, 16, 16]) - 2.0) < 1e-3  # camera at distance 2.5, point at z=0.5


def test_backprojection_returns_the_labels_of_visible_points_exactly():
    pts, nrm = sphere_points(3000, seed=1)
    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 5, len(pts)))
    r = render_points(pts, nrm, size=64, elevations=[20], azimuths=[0, 120, 240])
    label_map = torch.where(r.index >= 0, labels[r.index.clamp_min(0)], torch.full_like(r.index, -1))
    votes = backproject(r.index, label_map, len(pts), 5)
    visible = torch.zeros(len(pts), dtype=torch.bool)
    visible[r.index[r.index >= 0]] = True
    assert torch.equal(votes.argmax(1)[visible], labels[visible])
    assert (votes[~visible] == 0).all() and (votes[visible].sum(1) > 0).all()
    # every labelled pixel casts exactly its weight
    w = torch.rand(r.index.shape)
    assert torch.isclose(backproject(r.index, label_map, len(pts), 5, w).sum(), w[r.index >= 0].sum())


def test_cameras_and_errors():
    cams = make_cameras([0, 90], [0, 90], size=64)
    assert len(cams) == 4 and torch.allclose(cams.rotation @ cams.rotation.transpose(1, 2), torch.eye(3), atol=1e-5)
    px, py, z = cams.project(torch.zeros(1, 3))
    assert torch.allclose(px, torch.full_like(px, 32.0)) and torch.allclose(z, torch.full_like(z, 2.5))
    far = render_points(np.array([[0, 0, 0], [5, 0, 0], [0, -9, 0]], np.float32), elevations=[0], azimuths=[0],
                        size=16, radius=2)
    assert set(torch.unique(far.index).tolist()) == {-1, 0}  # points outside the view are dropped, no error
    with pytest.raises(PartkitError, match="N x 3"):
        render_points(np.zeros((0, 3)))
    with pytest.raises(PartkitError, match="distance"):
        make_cameras(distance=0.5)


def test_pictures_and_show_points(tmp_path):
    pts, nrm = sphere_points(500)
    pic = render_views_png(str(tmp_path / "a.png"), pts, [("labels", (pts[:, 0] > 0).astype(int))], normals=nrm,
                           size=64)
    assert pic.shape[1] == 3 * 64 and (tmp_path / "a.png").stat().st_size > 0
    grey = render_views_png(None, pts, [("points", None)], normals=nrm, size=64)
    assert grey.shape == pic.shape and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    from partkit.cli.main import app
    from partkit.io import Output
    from partkit.pack import pack

    pack([str(SHAPENET / "cap_val.npz")], output=Output(str(tmp_path / "caps")))
    res = CliRunner().invoke(app, ["show", "points", str(tmp_path / "caps" / "000000.tar"), "-o",
                                   str(tmp_path / "pics"), "--max", "2", "--size", "96"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert files == ["cap_val_000.png", "cap_val_001.png"]


@pytest.mark.parametrize("w", [1, 2, 3, 5])
def test_window_min_matches_brute_force(w):
    from partkit.render3d import _EMPTY, _window_min

    keys = torch.randint(0, 1000, (2, 13, 17))
    keys[0, 3, 4] = _EMPTY
    ref = torch.stack([torch.stack([keys[:, max(0, y - w):y + w + 1, max(0, x - w):x + w + 1].amin((1, 2))
                                    for x in range(17)], -1) for y in range(13)], -2)
    assert torch.equal(_window_min(keys, w), ref)
