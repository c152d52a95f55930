"""Point clouds and meshes in, normalised point-cloud samples out (the 3D side of ``pack``).

Readers return a :class:`Shape` (points plus optional normals, colours, part labels); meshes
(``.obj``, ``.off``, ``.ply`` with faces) are sampled on their surface, area-weighted. A sample
stores ``points.npy`` (N x 3 float32, centred and scaled into the unit sphere), ``normals.npy``,
``colors.npy``, ``gt_parts.npy`` and ``json`` (category, part names, ``center`` and ``scale``,
so ``raw = points * scale + center``).

>>> shape = read_shape("chair.obj", num_points=2048)  # doctest: +SKIP
>>> sample = shape_sample(shape, "chair")  # doctest: +SKIP
"""
from __future__ import annotations

import io
import itertools
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import BadSample, PartkitError
from .io import decode_json, decode_npy, encode_json, encode_npy
from .io.tario import sample_key

__all__ = ["POINT_EXTS", "SHAPENETPART", "Shape", "read_shape", "list_shapes", "read_ply", "write_ply", "read_obj", "read_off",
           "sample_surface", "normalize", "shape_sample", "decode_shape", "shapenet_category"]

POINT_EXTS = ("ply", "obj", "off", "npz", "npy", "txt")

# ShapeNetPart's 16 categories: (synset id, first global part id, part names in id order).
# Names as the zero-shot literature prompts them (PointCLIP V2); Cap 6 is the crown, 7 the flat visor.
SHAPENETPART = {
    "airplane": ("02691156", 0, ["body", "wing", "tail", "engine"]),
    "bag": ("02773838", 4, ["handle", "body"]),
    "cap": ("02954340", 6, ["panel", "peak"]),
    "car": ("02958343", 8, ["roof", "hood", "wheel", "body"]),
    "chair": ("03001627", 12, ["back", "seat", "leg", "arm"]),
    "earphone": ("03261776", 16, ["earcup", "headband", "data wire"]),
    "guitar": ("03467517", 19, ["head", "neck", "body"]),
    "knife": ("03624134", 22, ["blade", "handle"]),
    "lamp": ("03636649", 24, ["base", "lampshade", "canopy", "tube"]),
    "laptop": ("03642034", 28, ["keyboard", "screen"]),
    "motorbike": ("03790512", 30, ["gas tank", "seat", "wheel", "handlebar", "light", "frame"]),
    "mug": ("03797390", 36, ["handle", "body"]),
    "pistol": ("03948459", 38, ["barrel", "handle", "trigger and guard"]),
    "rocket": ("04099429", 41, ["body", "fin", "nose cone"]),
    "skateboard": ("04225987", 44, ["wheel", "deck", "belt for foot"]),
    "table": ("04379243", 47, ["desktop", "leg", "drawer"]),
}
_SYNSETS = {v[0]: k for k, v in SHAPENETPART.items()}


@dataclass
class Shape:
    """One point cloud; ``faces`` only until it is sampled."""

    points: np.ndarray  # (N, 3) float32
    normals: Optional[np.ndarray] = None  # (N, 3) float32, unit length
    colors: Optional[np.ndarray] = None  # (N, 3) uint8
    labels: Optional[np.ndarray] = None  # (N,) int64 part ids
    faces: Optional[np.ndarray] = None  # (F, 3) int64 triangles
    meta: dict = field(default_factory=dict)  # category, parts, center, scale, ...

    def __len__(self) -> int:
        return len(self.points)


def shapenet_category(name: str) -> Optional[str]:
    """``cap``, ``Cap``, ``02954340`` or ``cap_test`` -> ``cap``; None when not a ShapeNetPart category."""
    for token in re.split(r"[_\-./\\ ]", name.lower()):
        if token in SHAPENETPART:
            return token
        if token in _SYNSETS:
            return _SYNSETS[token]
    return None


def category_parts(category: Optional[str]) -> Optional[dict]:
    """``{part id: name}`` of a ShapeNetPart category (global numbering), else None."""
    if category not in SHAPENETPART:
        return None
    _, first, names = SHAPENETPART[category]
    return {first + i: n for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# Readers

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _ply_header(f) -> tuple[str, list]:
    if f.readline().strip() != b"ply":
        raise ValueError("not a PLY file (no 'ply' magic)")
    fmt, elements = None, []
    for number in itertools.count(2):
        line = f.readline()
        if not line:
            raise ValueError("PLY header has no end_header")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        where = f"PLY header line {number} ({' '.join(words)[:60]!r})"
        if words[0] == "format":
            if len(words) < 2:
                raise ValueError(f"{where} names no format")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) < 3 or not words[2].isdigit():
                raise ValueError(f"{where}: expected 'element NAME COUNT' with a whole COUNT")
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"{where}: a property before any element")
            types = words[2:4] if words[1:2] == ["list"] else words[1:2]
            unknown = [t for t in types if t not in _PLY_TYPES]
            if unknown or len(words) < (5 if words[1:2] == ["list"] else 3):
                what = f"unknown type {unknown[0]!r} (known: {', '.join(sorted(_PLY_TYPES))})" if unknown else \
                    "expected 'property TYPE NAME' or 'property list COUNT_TYPE ITEM_TYPE NAME'"
                raise ValueError(f"{where}: {what}")
            if words[1] == "list":
                elements[-1][2].append((words[4], ("list", _PLY_TYPES[words[2]], _PLY_TYPES[words[3]])))
            else:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unsupported PLY format {fmt!r}")
    return fmt, elements


def _ply_binary_element(f, count: int, props: list, endian: str):
    if not any(isinstance(t, tuple) for _, t in props):
        dtype = np.dtype([(n, endian + t) for n, t in props])
        data = np.frombuffer(f.read(dtype.itemsize * count), dtype=dtype, count=count)
        return {n: data[n] for n, _ in props}
    if len(props) == 1:
        # faces: try the common all-triangles layout in one read, else walk them one by one
        name, (_, ct, it) = props[0]
        pos = f.tell()
        tri = np.dtype([("n", endian + ct), ("v", endian + it, (3,))])
        buf = f.read(tri.itemsize * count)
        if len(buf) == tri.itemsize * count:
            data = np.frombuffer(buf, dtype=tri)
            if (data["n"] == 3).all():
                return {name: data["v"].astype(np.int64)}
        f.seek(pos)
        ctype, itype = np.dtype(endian + ct), np.dtype(endian + it)
        rows = []
        for _ in range(count):
            n = int(np.frombuffer(f.read(ctype.itemsize), ctype)[0])
            rows.append(np.frombuffer(f.read(itype.itemsize * n), itype).astype(np.int64))
        return {name: rows}
    raise ValueError("PLY elements mixing list and scalar properties are not supported")


def read_ply(data: bytes) -> Shape:
    """ASCII or binary PLY: vertices (x, y, z, optional nx/ny/nz and red/green/blue), optional faces."""
    f = io.BytesIO(data)
    fmt, elements = _ply_header(f)
    found = {}
    if fmt == "ascii":
        lines = iter(f.read().decode("ascii", "replace").splitlines())
        for name, count, props in elements:
            try:
                rows = [next(lines).split() for _ in range(count)]
            except StopIteration:
                raise ValueError(f"PLY body ends early: the header declares {count} '{name}' rows") from None
            try:
                if name == "face":
                    found[name] = {"vertex_indices": [np.asarray(r[1:1 + int(r[0])], np.int64) for r in rows]}
                elif all(not isinstance(t, tuple) for _, t in props):
                    arr = np.asarray(rows, dtype=np.float64).reshape(count, len(props))
                    found[name] = {n: arr[:, i] for i, (n, _) in enumerate(props)}
            except (ValueError, IndexError):
                raise ValueError(f"PLY '{name}' rows are not {len(props)} numbers each as the header declares") \
                    from None
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        for name, count, props in elements:
            if name not in ("vertex", "face") and any(isinstance(t, tuple) for _, t in props):
                break  # an unknown list element: nothing we need can follow reliably
            try:
                found[name] = _ply_binary_element(f, count, props, endian)
            except (ValueError, IndexError):
                raise ValueError(f"PLY body ends early: the header declares {count} '{name}' elements") from None
    v = found.get("vertex")
    if v is None or not {"x", "y", "z"} <= set(v):
        raise ValueError("PLY has no vertex element with x, y, z")
    points = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
    normals = np.stack([v["nx"], v["ny"], v["nz"]], 1).astype(np.float32) if {"nx", "ny", "nz"} <= set(v) else None
    colors = None
    if {"red", "green", "blue"} <= set(v):
        colors = np.stack([v["red"], v["green"], v["blue"]], 1)
        colors = (colors * 255 if colors.dtype.kind == "f" and colors.max(initial=0) <= 1 else colors)
        colors = np.clip(colors, 0, 255).astype(np.uint8)
    faces = None
    if "face" in found and found["face"]:
        polys = next(iter(found["face"].values()))
        faces = _triangulate(polys)
    return Shape(points, normals, colors, faces=faces)


def write_ply(points: np.ndarray, colors: Optional[np.ndarray] = None, normals: Optional[np.ndarray] = None,
              labels: Optional[np.ndarray] = None, *, binary: bool = True) -> bytes:
    """A PLY point cloud (binary little-endian, or ASCII) that MeshLab and CloudCompare open: vertices
    ``x y z`` (float), optional ``nx ny nz`` (float), ``red green blue`` (uchar) and ``label`` (int).
    :func:`read_ply` reads it back."""
    pts = np.asarray(points, np.float32).reshape(-1, 3)
    cols = [("x", "f4", pts[:, 0]), ("y", "f4", pts[:, 1]), ("z", "f4", pts[:, 2])]
    if normals is not None:
        nrm = np.asarray(normals, np.float32).reshape(-1, 3)
        cols += [("nx", "f4", nrm[:, 0]), ("ny", "f4", nrm[:, 1]), ("nz", "f4", nrm[:, 2])]
    if colors is not None:
        rgb = np.asarray(colors, np.uint8).reshape(-1, 3)
        cols += [("red", "u1", rgb[:, 0]), ("green", "u1", rgb[:, 1]), ("blue", "u1", rgb[:, 2])]
    if labels is not None:
        cols.append(("label", "i4", np.asarray(labels).reshape(-1).astype(np.int32)))
    ply_type = {"f4": "float", "u1": "uchar", "i4": "int"}
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by partkit",
              f"element vertex {len(pts)}"] + [f"property {ply_type[t]} {n}" for n, t, _ in cols] + ["end_header"]
    head = ("\n".join(header) + "\n").encode("ascii")
    if binary:
        rows = np.empty(len(pts), np.dtype([(n, "<" + t) for n, t, _ in cols]))
        for n, _, v in cols:
            rows[n] = v
        return head + rows.tobytes()
    fmt = " ".join("%.6g" if t == "f4" else "%d" for _, t, _ in cols)
    lines = [fmt % row for row in zip(*(v.tolist() for _, _, v in cols))]
    return head + ("\n".join(lines) + "\n").encode("ascii")


def _triangulate(polys) -> Optional[np.ndarray]:
    """Fan-triangulate polygons given as an (F, 3) array or a list of index arrays."""
    if isinstance(polys, np.ndarray):
        return polys.astype(np.int64)
    tris = [np.stack([np.full(len(p) - 2, p[0]), p[1:-1], p[2:]], 1) for p in polys if len(p) >= 3]
    return np.concatenate(tris).astype(np.int64) if tris else None


def read_obj(data: bytes) -> Shape:
    """Wavefront OBJ: ``v`` lines and ``f`` polygons (``v``, ``v/vt``, ``v//vn``, negative indices)."""
    verts, polys = [], []
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("v "):
            verts.append(line.split()[1:4])
        elif line.startswith("f "):
            idx = [int(t.split("/")[0]) for t in line.split()[1:]]
            polys.append(np.asarray([i - 1 if i > 0 else len(verts) + i for i in idx], np.int64))
    if not verts:
        raise ValueError("OBJ has no vertices")
    return Shape(np.asarray(verts, dtype=np.float32), faces=_triangulate(polys))


def read_off(data: bytes) -> Shape:
    """OFF: ``OFF``, counts, vertices, then ``n i j k ...`` faces (the counts may share the magic line)."""
    tokens = data.decode("ascii", "replace").split("\n")
    lines = [t.split("#")[0].strip() for t in tokens]
    lines = [t for t in lines if t]
    if not lines or not lines[0].startswith("OFF"):
        raise ValueError("not an OFF file (no 'OFF' magic)")
    rest = lines[0][3:].split()
    counts, body = (rest, lines[1:]) if rest else ((lines[1].split() if len(lines) > 1 else []), lines[2:])
    if len(counts) < 2 or not all(c.isdigit() for c in counts[:2]):
        raise ValueError(f"OFF counts line is {' '.join(counts)!r}; expected 'VERTICES FACES EDGES' whole numbers")
    nv, nf = int(counts[0]), int(counts[1])
    if len(body) < nv + nf:
        raise ValueError(f"OFF declares {nv} vertices and {nf} faces but has only {len(body)} lines after the counts")
    try:
        verts = np.asarray([body[i].split()[:3] for i in range(nv)], dtype=np.float32)
    except ValueError:
        verts = None
    if verts is None or verts.shape != (nv, 3):
        bad = next((i for i in range(nv) if len(body[i].split()) < 3 or not _numbers(body[i].split()[:3])), 0)
        raise ValueError(f"OFF vertex {bad} is {body[bad][:60]!r}; expected three numbers x y z")
    polys = []
    for i, line in enumerate(body[nv:nv + nf]):
        w = line.split()
        if not w[0].isdigit() or len(w) < 1 + int(w[0]) or not all(v.lstrip("-").isdigit() for v in w[1:1 + int(w[0])]):
            raise ValueError(f"OFF face {i} is {line[:60]!r}; expected 'N i1 ... iN' with N vertex indices")
        polys.append(np.asarray(w[1:1 + int(w[0])], np.int64))
    return Shape(verts, faces=_triangulate(polys))


def _numbers(words) -> bool:
    try:
        [float(w) for w in words]
    except ValueError:
        return False
    return True


def _read_txt(data: bytes) -> Shape:
    """ShapeNetPart ``x y z nx ny nz label`` rows (also ``x y z`` or ``x y z label``)."""
    arr = np.loadtxt(io.BytesIO(data), dtype=np.float64, ndmin=2)
    if arr.shape[1] not in (3, 4, 6, 7):
        raise ValueError(f"text point cloud has {arr.shape[1]} columns; expected x y z [nx ny nz] [label]")
    normals = arr[:, 3:6].astype(np.float32) if arr.shape[1] >= 6 else None
    labels = arr[:, -1].astype(np.int64) if arr.shape[1] in (4, 7) else None
    return Shape(arr[:, :3].astype(np.float32), normals, labels=labels)


def _array_shape(arr: np.ndarray) -> Shape:
    """An (N, 3|4|6|7) array: xyz, optional normals, optional label column."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 4, 6, 7):
        raise ValueError(f"array has shape {arr.shape}; expected N x 3 (xyz), N x 6 (xyz + normals), "
                         "optionally with a label column")
    normals = arr[:, 3:6].astype(np.float32) if arr.shape[1] >= 6 else None
    labels = arr[:, -1].astype(np.int64) if arr.shape[1] in (4, 7) else None
    return Shape(arr[:, :3].astype(np.float32), normals, labels=labels)


_NPZ_KEYS = {"points": ("points", "pos", "xyz", "vertices", "coords"), "normals": ("normals", "normal", "norm"),
             "colors": ("colors", "color", "rgb"), "labels": ("gt_parts", "labels", "label", "part", "parts", "seg"),
             "faces": ("faces", "triangles")}


def _npz_fields(npz) -> dict:
    out = {}
    for name, aliases in _NPZ_KEYS.items():
        for a in aliases:
            if a in npz.files:
                out[name] = a
                break
    if "points" not in out:
        raise ValueError(f"npz has no point array (one of {', '.join(_NPZ_KEYS['points'])}); it holds "
                         f"{', '.join(npz.files)}")
    return out


def _npz_shape(npz, index: Optional[int]) -> Shape:
    names = _npz_fields(npz)
    rows = slice(None)
    if index is not None:
        off = npz["offsets"]
        rows = slice(int(off[index]), int(off[index + 1]))
    got = {k: np.asarray(npz[v][rows] if k != "faces" else npz[v]) for k, v in names.items()}
    colors = got.get("colors")
    if colors is not None and colors.dtype.kind == "f":
        colors = np.clip(colors * (255 if colors.max(initial=0) <= 1 else 1), 0, 255)
    return Shape(got["points"].astype(np.float32),
                 got["normals"].astype(np.float32) if "normals" in got else None,
                 colors.astype(np.uint8) if colors is not None else None,
                 got["labels"].astype(np.int64).reshape(-1) if "labels" in got else None,
                 got["faces"].astype(np.int64) if "faces" in got else None)


def list_shapes(path: str) -> list[tuple[str, Optional[int]]]:
    """(key, index) of every shape in a file: one, or one per ``offsets`` row of an npz."""
    key = sample_key(path)
    if path.lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "offsets" in npz.files:
                    n = len(npz["offsets"]) - 1
                    return [(f"{key}_{i:03d}", i) for i in range(n)]
        except (OSError, ValueError):
            pass  # reported with the file's name when it is read
    return [(key, None)]


def read_shape(path: str, *, index: Optional[int] = None, num_points: int = 2048, seed: int = 0) -> Shape:
    """Read any supported file; meshes are sampled with ``num_points`` surface points."""
    ext = path.rsplit(".", 1)[-1].lower()
    if ext not in POINT_EXTS:
        raise PartkitError(f"{path!r} is not a point cloud or mesh; expected one of {', '.join(POINT_EXTS)}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("file is empty (0 bytes)")
    if ext == "ply":
        shape = read_ply(data)
    elif ext == "obj":
        shape = read_obj(data)
    elif ext == "off":
        shape = read_off(data)
    elif ext == "txt":
        shape = _read_txt(data)
    elif ext == "npy":
        shape = _array_shape(np.load(io.BytesIO(data), allow_pickle=False))
    else:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            shape = _npz_shape(npz, index)
    if shape.points.ndim != 2 or shape.points.shape[1] != 3:
        raise ValueError(f"points have shape {shape.points.shape}; expected N x 3 (one shape per file, or an npz "
                         "with an 'offsets' array)")
    if shape.faces is not None and len(shape.faces):
        if shape.faces.min() < 0 or shape.faces.max() >= len(shape.points):
            raise ValueError("faces refer to vertices that do not exist")
        pts, nrm, _ = sample_surface(shape.points, shape.faces, num_points, seed=seed)
        shape = Shape(pts, nrm, meta=shape.meta)
    if len(shape.points) == 0:
        raise ValueError("no points")
    if not np.isfinite(shape.points).all():
        raise ValueError("points hold NaN or infinite coordinates")
    n = len(shape.points)
    for name in ("normals", "colors", "labels"):
        arr = getattr(shape, name)
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows but there are {n} points")
    return shape


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, *, seed: int = 0):
    """``n`` points on a triangle mesh, area-weighted; returns (points, face normals, face index)."""
    if n < 1:
        raise PartkitError(f"--points-per-shape must be at least 1, got {n}")
    v = np.asarray(vertices, np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    if not area.sum() > 0:
        raise ValueError("mesh has zero surface area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=n, p=area / area.sum())
    u, w = rng.random(n), rng.random(n)
    flip = u + w > 1  # reflect into the triangle: uniform barycentric samples
    u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
    pts = a[face] + u[:, None] * (b[face] - a[face]) + w[:, None] * (c[face] - a[face])
    nrm = cross[face] / np.maximum(area[face], 1e-30)[:, None]
    return pts.astype(np.float32), nrm.astype(np.float32), face


def normalize(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre on the bounding-box centre and scale into the unit sphere: (points, center, scale)."""
    p = np.asarray(points, np.float64)
    center = (p.min(0) + p.max(0)) / 2
    scale = float(np.linalg.norm(p - center, axis=1).max())
    scale = scale if scale > 0 else 1.0
    return ((p - center) / scale).astype(np.float32), center, scale


def shape_sample(shape: Shape, key: str, *, source: Optional[str] = None, category: Optional[str] = None,
                 provenance: Optional[str] = None) -> dict:
    """A partkit sample (``points.npy``, ``normals.npy``, ``colors.npy``, ``gt_parts.npy``, ``json``)."""
    points, center, scale = normalize(shape.points)
    meta = {"kind": "points", "num_points": int(len(points)), "center": [float(c) for c in center],
            "scale": scale, **shape.meta}
    if source:
        meta["source"] = os.path.abspath(source)
        category = category or shapenet_category(os.path.basename(source)) or shapenet_category(
            os.path.basename(os.path.dirname(os.path.abspath(source))))
    if category:
        meta["category"] = category
        parts = category_parts(category)
        if parts is not None:
            meta["parts"] = {str(k): v for k, v in parts.items()}
    if provenance:
        meta["provenance"] = provenance
    sample = {"__key__": key, "points.npy": encode_npy(points), "json": encode_json(meta)}
    if shape.normals is not None:
        nrm = shape.normals / np.maximum(np.linalg.norm(shape.normals, axis=1, keepdims=True), 1e-12)
        sample["normals.npy"] = encode_npy(nrm.astype(np.float32))
    if shape.colors is not None:
        sample["colors.npy"] = encode_npy(shape.colors.astype(np.uint8))
    if shape.labels is not None:
        sample["gt_parts.npy"] = encode_npy(shape.labels.astype(np.int64))
    return sample


def pack_seed(key: str) -> int:
    """A per-file seed for surface sampling, so packing is deterministic and order-independent."""
    return zlib.crc32(key.encode("utf-8"))


def prepare_shape(key: str, path: str, index: Optional[int], *, num_points: int, category: Optional[str],
                  provenance: Optional[str]) -> dict:
    """``pack``'s per-file step for 3D inputs; an unreadable file becomes :class:`BadSample`."""
    try:
        shape = read_shape(path, index=index, num_points=num_points, seed=pack_seed(key))
    except (ValueError, KeyError, IndexError, OSError, EOFError, StopIteration) as e:
        what = f"shape {index} of " if index is not None else ""
        raise BadSample(key, f"cannot read {what}{path}: {e}") from None
    if index is not None:
        shape.meta["source_index"] = int(index)
    return shape_sample(shape, key, source=path, category=category, provenance=provenance)


def decode_shape(sample: dict) -> Shape:
    """A packed sample back to a :class:`Shape` (points already normalised)."""
    key = sample["__key__"]
    points = decode_npy(sample, "points.npy")
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise BadSample(key, f"'points.npy' has shape {points.shape}; expected N x 3 with N >= 1")
    n = len(points)
    opt = {}
    for name, field_name in (("normals", "normals.npy"), ("colors", "colors.npy"), ("labels", "gt_parts.npy")):
        if field_name in sample:
            arr = decode_npy(sample, field_name)
            if len(arr) != n:
                raise BadSample(key, f"'{field_name}' has {len(arr)} rows but 'points.npy' has {n} points")
            opt[name] = arr
    meta = decode_json(sample, "json") if "json" in sample else {}
    return Shape(points.astype(np.float32), opt.get("normals"), opt.get("colors"), opt.get("labels"),
                 meta=meta if isinstance(meta, dict) else {})
