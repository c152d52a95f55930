"""ShapeNetPart (Yi et al. 2016): 16 categories of point clouds with per-point part labels.

Two official layouts, told apart by what is on disk (both have ``synsetoffset2category.txt``,
``<name> <synset>`` per line, and ``train_test_split/shuffled_{train,val,test}_file_list.json``,
lists of ``"shape_data/<synset>/<shape id>"``):

- ``shapenetcore_partanno_segmentation_benchmark_v0``: ``<synset>/points/<id>.pts`` (``x y z`` rows)
  and ``<synset>/points_label/<id>.seg`` (one label per row, numbered 1..P within the category);
- ``shapenetcore_partanno_segmentation_benchmark_v0_normal``: ``<synset>/<id>.txt`` (``x y z nx ny nz
  label`` rows, the label in the global 0..49 numbering).

A sample is what ``pack`` writes for a point cloud (points in the unit sphere, ``normals.npy`` when
given, ``gt_parts.npy``) with labels in the **global** numbering either way (``.seg`` label ``l`` of a
category whose first global id is ``f`` becomes ``f + l - 1``), ``category`` and ``parts`` names in
``json``. ``all`` packs every shape on disk; a shape listed in a split file but missing is a bad
sample.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import BadSample, PartkitError
from ..io import decode_json
from ..pointcloud import SHAPENETPART, Shape, read_shape, shape_sample
from ._registry import Recipe, read_table, register_dataset, require

NAME = "shapenetpart"
SPLITS = ("train", "val", "test")
LAYOUT = ("ROOT/synsetoffset2category.txt, ROOT/<synset>/points/*.pts + points_label/*.seg (v0) or "
          "ROOT/<synset>/*.txt (v0_normal), ROOT/train_test_split/shuffled_{train,val,test}_file_list.json")
_SYNSET_TO_CATEGORY = {v[0]: k for k, v in SHAPENETPART.items()}


def _split_entries(path: str) -> list[tuple[str, str]]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        raise PartkitError(f"ShapeNetPart split file {path!r} is not readable JSON") from None
    out = []
    for e in doc if isinstance(doc, list) else [None]:
        parts = e.split("/") if isinstance(e, str) else []
        if len(parts) < 2:
            raise PartkitError(f"ShapeNetPart split file {path!r} holds {json.dumps(e)[:60]}; expected "
                               "\"shape_data/<synset>/<shape id>\" strings")
        out.append((parts[-2], parts[-1]))
    return out


def _read_pts(pts: str, seg: str, first: int) -> Shape:
    points = np.loadtxt(pts, dtype=np.float64, ndmin=2)
    if points.shape[1] != 3:
        raise ValueError(f"{pts} has {points.shape[1]} columns; expected x y z")
    labels = np.loadtxt(seg, dtype=np.int64, ndmin=1).reshape(-1)
    if len(labels) != len(points):
        raise ValueError(f"{seg} has {len(labels)} labels but {pts} has {len(points)} points")
    if len(labels) and labels.min() < 1:
        raise ValueError(f"{seg} holds label {labels.min()}; .seg labels are numbered from 1")
    return Shape(points.astype(np.float32), labels=labels + first - 1)


@register_dataset(NAME, title="ShapeNetPart", splits=SPLITS, layout=LAYOUT)
def read(root: str, split: str) -> Recipe:
    table = require(NAME, root, "synsetoffset2category.txt")
    categories = {}
    for name, synset in read_table(table, 2):
        if synset not in _SYNSET_TO_CATEGORY:
            raise PartkitError(f"{table}: synset {synset!r} ({name}) is not one of ShapeNetPart's 16 categories")
        categories[synset] = _SYNSET_TO_CATEGORY[synset]
    for synset in categories:
        require(NAME, root, synset, kind="folder")
    normal = not any(os.path.isdir(os.path.join(root, s, "points")) for s in categories)

    def files_of(synset: str, shape_id: str) -> tuple[str, ...]:
        if normal:
            return (os.path.join(root, synset, f"{shape_id}.txt"),)
        return (os.path.join(root, synset, "points", f"{shape_id}.pts"),
                os.path.join(root, synset, "points_label", f"{shape_id}.seg"))

    split_of: dict = {}
    for s in SPLITS:
        path = os.path.join(root, "train_test_split", f"shuffled_{s}_file_list.json")
        if split == s:
            require(NAME, root, "train_test_split", f"shuffled_{s}_file_list.json")
        if os.path.isfile(path) and split in (s, "all"):
            split_of.update({e: s for e in _split_entries(path)})
    if split == "all":
        shapes = []
        for synset in categories:
            folder = os.path.join(root, synset, "" if normal else "points")
            ext = ".txt" if normal else ".pts"
            shapes += [(synset, f[: -len(ext)]) for f in sorted(os.listdir(folder)) if f.endswith(ext)]
    else:
        shapes = [e for e, s in split_of.items() if s == split and e[0] in categories]
        shapes.sort()
    items = [(f"{categories[syn]}_{sid}", (syn, sid)) for syn, sid in shapes]
    inputs = [p for syn, sid in shapes for p in files_of(syn, sid)]

    def prepare(key: str, item) -> dict:
        synset, shape_id = item
        paths = files_of(synset, shape_id)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise BadSample(key, f"ShapeNetPart shape {synset}/{shape_id} has no file {missing[0]}")
        category = categories[synset]
        try:
            shape = read_shape(paths[0]) if normal else _read_pts(*paths, SHAPENETPART[category][1])
        except (ValueError, OSError) as e:
            raise BadSample(key, f"cannot read ShapeNetPart shape {paths[0]}: {e}") from None
        if shape.labels is None:
            raise BadSample(key, f"{paths[0]} has no label column; expected x y z nx ny nz label rows")
        first, names = SHAPENETPART[category][1], SHAPENETPART[category][2]
        bad = shape.labels[(shape.labels < first) | (shape.labels >= first + len(names))]
        if len(bad):
            raise BadSample(key, f"{paths[-1]} holds label {int(bad[0])}, outside {category}'s parts "
                                 f"({first}..{first + len(names) - 1} global)")
        sample = shape_sample(shape, key, source=paths[0], category=category)
        meta = decode_json(sample, "json")
        meta.update(shape_id=shape_id, synset=synset)
        if (synset, shape_id) in split_of:
            meta["split"] = split_of[(synset, shape_id)]
        sample["json"] = meta
        return sample

    return Recipe(items, prepare, inputs)
