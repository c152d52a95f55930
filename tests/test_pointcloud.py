"""Point-cloud and mesh readers, surface sampling, normalisation, and `pack` on 3D inputs."""
import struct

import numpy as np
import pytest

from conftest import SHAPENET, read_shard
from partkit.errors import BadSample, PartkitError, SkipBad
from partkit.io import Output, decode_json, decode_npy
from partkit.pack import pack
from partkit.pointcloud import normalize, read_shape, sample_surface, shapenet_category

CUBE_V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float)
CUBE_QUADS = [[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [2, 3, 7, 6], [1, 2, 6, 5], [0, 4, 7, 3]]  # outward


def _on_cube_surface(p, tol=1e-5):
    return np.all((p > -tol) & (p < 1 + tol), 1) & np.any((np.abs(p) < tol) | (np.abs(p - 1) < tol), 1)


def test_ascii_ply_with_normals_and_colors(tmp_path):
    rows = ["0 0 0 0 0 1 255 0 0", "1 0 0 0 0 1 0 255 0", "0 1 0 0 0 1 0 0 255"]
    text = ("ply\nformat ascii 1.0\ncomment made by hand\nelement vertex 3\nproperty float x\nproperty float y\n"
            "property float z\nproperty float nx\nproperty float ny\nproperty float nz\nproperty uchar red\n"
            "property uchar green\nproperty uchar blue\nend_header\n" + "\n".join(rows) + "\n")
    (tmp_path / "tri.ply").write_text(text)
    s = read_shape(str(tmp_path / "tri.ply"))
    assert s.points.shape == (3, 3) and s.normals[:, 2].tolist() == [1, 1, 1]
    assert s.colors.dtype == np.uint8 and s.colors.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def _binary_ply(path, faces, quads=False):
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(CUBE_V)}\nproperty float x\n"
            f"property float y\nproperty float z\nelement face {len(faces)}\n"
            "property list uchar int vertex_indices\nend_header\n").encode()
    body = b"".join(struct.pack("<3f", *v) for v in CUBE_V)
    body += b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in faces)
    path.write_bytes(head + body)
    return str(path)


@pytest.mark.parametrize("quads", [False, True])
def test_binary_ply_mesh_is_sampled_on_its_surface(tmp_path, quads):
    faces = CUBE_QUADS if quads else [t for q in CUBE_QUADS for t in ([q[0], q[1], q[2]], [q[0], q[2], q[3]])]
    s = read_shape(_binary_ply(tmp_path / "cube.ply", faces), num_points=3000, seed=1)
    assert s.points.shape == (3000, 3) and _on_cube_surface(s.points).all()
    # area-weighted: each of the 6 equal faces gets about 1/6 of the points
    counts = [np.sum(np.abs(s.points[:, a] - v) < 1e-6) for a in range(3) for v in (0, 1)]
    assert min(counts) > 400 and max(counts) < 600
    # face normals point outward for outward-wound faces
    outward = np.sign(s.points - 0.5) * (np.abs(s.points - 0.5) > 0.5 - 1e-6)
    assert np.all((s.normals * outward).sum(1) > 0.99)


def test_obj_and_off_meshes(tmp_path):
    obj = "# cube\n" + "".join(f"v {x} {y} {z}\n" for x, y, z in CUBE_V) + "vn 0 0 1\n"
    obj += "".join("f " + " ".join(f"{i - 8}//1" for i in q) + "\n" for q in CUBE_QUADS)  # negative indices
    (tmp_path / "cube.obj").write_text(obj)
    off = f"OFF\n8 6 0\n" + "".join(f"{x} {y} {z}\n" for x, y, z in CUBE_V)
    off += "".join(f"4 {' '.join(map(str, q))}\n" for q in CUBE_QUADS)
    (tmp_path / "cube.off").write_text(off)
    a = read_shape(str(tmp_path / "cube.obj"), num_points=500)
    b = read_shape(str(tmp_path / "cube.off"), num_points=500)
    for s in (a, b):
        assert len(s) == 500 and _on_cube_surface(s.points).all() and s.normals.shape == (500, 3)
    np.testing.assert_allclose(a.points, b.points)  # same mesh, same seed, same samples


def test_surface_sampling_follows_area():
    big = np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0]], float)  # area 4.5
    small = big / 3 + [0, 0, 5]  # area 0.5
    pts, nrm, face = sample_surface(np.vstack([big, small]), np.array([[0, 1, 2], [3, 4, 5]]), 10000, seed=0)
    assert 0.88 < np.mean(face == 0) < 0.92 and np.allclose(np.abs(nrm[:, 2]), 1)


def test_npy_and_shapenet_txt(tmp_path):
    rng = np.random.default_rng(0)
    xyzn = rng.normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "cloud.npy", xyzn)
    s = read_shape(str(tmp_path / "cloud.npy"))
    assert np.allclose(s.points, xyzn[:, :3]) and np.allclose(s.normals, xyzn[:, 3:]) and s.labels is None
    rows = np.column_stack([xyzn, rng.integers(12, 16, 50)])
    np.savetxt(tmp_path / "1a2b.txt", rows, fmt="%.6f")
    t = read_shape(str(tmp_path / "1a2b.txt"))
    assert t.labels.dtype == np.int64 and set(t.labels) <= {12, 13, 14, 15}
    assert np.allclose(t.points, xyzn[:, :3], atol=1e-5)
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match="N x 3"):
        read_shape(str(tmp_path / "bad.npy"))


def test_normalize_records_an_invertible_transform():
    p = np.random.default_rng(0).normal(size=(100, 3)) * 7 + 3
    q, center, scale = normalize(p)
    assert np.isclose(np.linalg.norm(q, axis=1).max(), 1.0, atol=1e-6)
    np.testing.assert_allclose(q * scale + center, p, atol=1e-4)


def test_shapenet_categories():
    assert shapenet_category("cap_test") == "cap" and shapenet_category("02954340") == "cap"
    assert shapenet_category("Chair") == "chair" and shapenet_category("photos") is None


def test_pack_shapenetpart_npz(tmp_path):
    src = SHAPENET / "cap_test.npz"
    out = tmp_path / "out"
    pack([str(src)], output=Output(str(out)))
    samples = read_shard(out / "000000.tar")
    raw = np.load(src)
    off = raw["offsets"]
    assert [s["__key__"] for s in samples] == [f"cap_test_{i:03d}" for i in range(len(off) - 1)]
    for i, s in enumerate(samples):
        pts, meta = decode_npy(s, "points.npy"), decode_json(s)
        assert pts.dtype == np.float32 and pts.shape == (off[i + 1] - off[i], 3)
        assert np.isclose(np.linalg.norm(pts, axis=1).max(), 1, atol=1e-5)
        np.testing.assert_allclose(pts * meta["scale"] + meta["center"], raw["pos"][off[i]:off[i + 1]], atol=1e-5)
        assert decode_npy(s, "gt_parts.npy").tolist() == raw["part"][off[i]:off[i + 1]].tolist()
        assert decode_npy(s, "normals.npy").shape == pts.shape
        assert meta["category"] == "cap" and meta["parts"] == {"6": "panel", "7": "peak"}
        assert meta["source_index"] == i and meta["kind"] == "points"


def test_pack_meshes_is_deterministic_and_keeps_images_apart(tmp_path, cihp_dir):
    d = tmp_path / "meshes"
    d.mkdir()
    (d / "a.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    (d / "b.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    runs = []
    for name in ("o1", "o2"):
        pack([str(d)], points_per_shape=64, output=Output(str(tmp_path / name)))
        runs.append((tmp_path / name / "000000.tar").read_bytes())
    assert runs[0] == runs[1]
    samples = read_shard(runs[0])
    assert [s["__key__"] for s in samples] == ["a", "b"]
    assert all(decode_npy(s, "points.npy").shape == (64, 3) for s in samples)
    # a folder of images with a stray .txt beside them still packs only the images
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    first = sorted((cihp_dir / "images").glob("*.jpg"))[0]
    (imgs / first.name).write_bytes(first.read_bytes())
    (imgs / "notes.txt").write_text("not a point cloud\n")
    pack([str(imgs)], output=Output(str(tmp_path / "o3")))
    assert "jpg" in read_shard(tmp_path / "o3" / "000000.tar")[0]


def test_pack_bad_3d_file_names_it_or_is_skipped(tmp_path):
    (tmp_path / "broken.ply").write_bytes(
        b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nend_header\n1\n2\n")
    (tmp_path / "ok.npy").write_bytes(b"")
    np.save(tmp_path / "ok.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(BadSample, match="broken.ply"):
        pack([str(tmp_path / "broken.ply")], output=Output(str(tmp_path / "o1")))
    totals = pack([str(tmp_path / "broken.ply"), str(tmp_path / "ok.npy")], handler=SkipBad(),
                  output=Output(str(tmp_path / "o2")))
    assert totals["written"] == 1 and totals["skipped"] == 1
    with pytest.raises(PartkitError, match="points-per-shape"):
        pack([str(tmp_path / "ok.npy")], points_per_shape=0, output=Output(str(tmp_path / "o3")))
