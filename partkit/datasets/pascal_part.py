"""Pascal-Part (Chen et al. 2014): per-image MATLAB annotation files over PASCAL VOC 2010 images.

Layout: ``ROOT/Annotations_Part/<image id>.mat`` (the release's ``trainval.tar.gz``), ``ROOT/JPEGImages/
<image id>.jpg`` (VOC2010's images) and, for ``--split train|val``, VOC2010's ``ROOT/ImageSets/Main/
{train,val}.txt`` (Pascal-Part has no split of its own; works use VOC's). ROOT is typically
``VOCdevkit/VOC2010`` with ``Annotations_Part`` placed in it.

A ``.mat`` file holds ``anno`` with ``imname`` and ``objects``; each object has ``class``,
``class_ind``, ``mask`` (its silhouette, image size) and ``parts``, each with ``part_name`` and
``mask`` (the structure the release's ``mat2map.m`` reads). A sample gets:

- ``gt_parts.png``: one id per (class, part) of the release's ``part2ind.m`` part list, numbered
  the same for every image (``part_names`` ``"cat/head"``, ...); numbered instances of a part
  (``wheel_1``, ``wheel_2``, ``window_3``, ``coach_2``, ...) share one id (``car/wheel``). Objects are
  painted in file order (later objects occlude earlier ones, as the release documents); object pixels
  that no part covers (including whole boat, chair, table and sofa objects, which have no parts) are
  255 (ignore); 0 is background.
- ``gt_objects.json``: one instance per object (its silhouette), ``category`` = the VOC class.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .. import rle as R
from ..errors import BadSample, PartkitError
from ..io import encode_json, encode_png
from ..pack import image_sample
from ._registry import Recipe, read_table, register_dataset, require

NAME = "pascal-part"
SPLITS = ("train", "val")
LAYOUT = ("ROOT/Annotations_Part/*.mat (Pascal-Part), ROOT/JPEGImages/*.jpg (VOC2010) and for train/val "
          "ROOT/ImageSets/Main/{train,val}.txt (VOC2010)")

# The parts of each VOC class, as the release's part2ind.m lists them (numbered instances merged).
_ANIMAL = ["head", "leye", "reye", "lear", "rear"]
_CAT = _ANIMAL + ["nose", "torso", "neck", "lfleg", "lfpa", "rfleg", "rfpa", "lbleg", "lbpa", "rbleg", "rbpa", "tail"]
_COW = _ANIMAL + ["muzzle", "lhorn", "rhorn", "torso", "neck", "lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg",
                  "lblleg", "rbuleg", "rblleg", "tail"]
_VEHICLE = ["frontside", "leftside", "rightside", "backside", "roofside", "leftmirror", "rightmirror", "fliplate",
            "bliplate", "door", "wheel", "headlight", "window"]
PARTS = {
    "aeroplane": ["body", "stern", "lwing", "rwing", "tail", "engine", "wheel"],
    "bicycle": ["fwheel", "bwheel", "saddle", "handlebar", "chainwheel", "headlight"],
    "bird": ["head", "leye", "reye", "beak", "torso", "neck", "lwing", "rwing", "lleg", "lfoot", "rleg", "rfoot",
             "tail"],
    "boat": [],
    "bottle": ["cap", "body"],
    "bus": _VEHICLE,
    "car": _VEHICLE,
    "cat": _CAT,
    "chair": [],
    "cow": _COW,
    "diningtable": [],
    "dog": _CAT + ["muzzle"],
    "horse": [p for p in _COW if p not in ("lhorn", "rhorn")] + ["lfho", "rfho", "lbho", "rbho"],
    "motorbike": ["fwheel", "bwheel", "handlebar", "saddle", "headlight"],
    "person": ["head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair", "torso", "neck",
               "llarm", "luarm", "lhand", "rlarm", "ruarm", "rhand", "llleg", "luleg", "lfoot", "rlleg", "ruleg",
               "rfoot"],
    "pottedplant": ["pot", "plant"],
    "sheep": _COW,
    "sofa": [],
    "train": ["head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside", "headlight", "coach",
              "cfrontside", "cleftside", "crightside", "cbackside", "croofside"],
    "tvmonitor": ["screen"],
}
PART_IDS = {f"{c}/{p}": i + 1 for i, (c, p) in enumerate((c, p) for c in PARTS for p in PARTS[c])}
PART_NAMES = {str(i): name for name, i in PART_IDS.items()}


def part_label(cls: str, part: str) -> str:
    """``("car", "wheel_2")`` -> ``"car/wheel"`` (numbered instances of a part share its name)."""
    return cls + "/" + re.sub(r"_\d+$", "", part)


def _text(value) -> str:
    """A MATLAB char array as loadmat gives it (``array(['cat'])``) -> ``"cat"``."""
    arr = np.asarray(value)
    return str(arr.reshape(-1)[0]) if arr.size else ""


def _structs(value) -> list:
    """A MATLAB struct array (loadmat: a 1 x n record array, or empty) -> its records."""
    arr = np.asarray(value)
    return list(arr.reshape(-1)) if arr.size and arr.dtype.names else []


def read_annotation(path: str, key: str):
    """``(image name, [(class, silhouette mask, [(part name, mask), ...]), ...])`` of one ``.mat`` file."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        doc = loadmat(path)
        anno = np.asarray(doc["anno"]).reshape(-1)[0]
        objects = []
        for o in _structs(anno["objects"]):
            parts = [(_text(p["part_name"]), np.asarray(p["mask"]).astype(bool)) for p in _structs(o["parts"])]
            objects.append((_text(o["class"]), np.asarray(o["mask"]).astype(bool), parts))
        return _text(anno["imname"]), objects
    except (MatReadError, OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError) as e:
        raise BadSample(key, f"cannot read Pascal-Part annotation {path}: {type(e).__name__}: {e}; expected a .mat "
                             "file with anno.objects(i).{class, mask, parts(j).{part_name, mask}}") from None


@register_dataset(NAME, title="Pascal-Part", splits=SPLITS, layout=LAYOUT)
def read(root: str, split: str) -> Recipe:
    ann_dir = require(NAME, root, "Annotations_Part", kind="folder")
    require(NAME, root, "JPEGImages", kind="folder")
    on_disk = sorted(f[:-4] for f in os.listdir(ann_dir) if f.endswith(".mat"))
    if split == "all":
        ids, split_of = on_disk, {}
        for s in SPLITS:  # record each image's VOC split when the lists are there
            path = os.path.join(root, "ImageSets", "Main", f"{s}.txt")
            if os.path.isfile(path):
                split_of.update({r[0]: s for r in read_table(path, 1)})
    else:
        listed = [r[0] for r in read_table(require(NAME, root, "ImageSets", "Main", f"{split}.txt"), 1)]
        have = set(on_disk)
        ids = sorted(i for i in listed if i in have)  # VOC lists every image; only some have part annotations
        split_of = {i: split for i in ids}
    items = [(i.replace(".", "_"), i) for i in ids]
    files = [os.path.join(ann_dir, f"{i}.mat") for i in ids] + [os.path.join(root, "JPEGImages", f"{i}.jpg")
                                                                 for i in ids]

    def prepare(key: str, image_id: str) -> dict:
        ann = os.path.join(ann_dir, f"{image_id}.mat")
        imname, objects = read_annotation(ann, key)
        path = os.path.join(root, "JPEGImages", f"{imname or image_id}.jpg")
        if not os.path.isfile(path):
            raise BadSample(key, f"Pascal-Part annotation {ann} is for image {path}, which does not exist")
        sample, meta, im = image_sample(key, path)
        width, height = im.size
        labels = np.zeros((height, width), np.uint8)
        objs = []
        for n, (cls, silhouette, parts) in enumerate(objects, 1):
            if cls not in PARTS:
                raise BadSample(key, f"{ann}: object {n} has class {cls!r}, not a PASCAL VOC class")
            for what, mask in [("silhouette", silhouette)] + [(f"part {p!r}", m) for p, m in parts]:
                if mask.shape != (height, width):
                    raise BadSample(key, f"{ann}: object {n} {what} mask is {mask.shape[1]}x{mask.shape[0]} but the "
                                         f"image is {width}x{height}")
            labels[silhouette] = 255
            for part, mask in parts:
                name = part_label(cls, part)
                if name not in PART_IDS:
                    raise BadSample(key, f"{ann}: object {n} ({cls}) has part {part!r}, which the Pascal-Part part "
                                         f"list does not name for {cls} ({', '.join(PARTS[cls]) or 'no parts'})")
                labels[mask] = PART_IDS[name]
            if silhouette.any():
                rle = R.encode(silhouette)
                objs.append({"id": n, "category_id": list(PARTS).index(cls) + 1, "category": cls, "bbox": R.bbox(rle),
                             "area": R.area(rle), "iscrowd": 0, "segmentation": rle})
        sample["gt_parts.png"] = encode_png(labels)
        sample["gt_objects.json"] = encode_json({"objects": objs})
        classes = sorted({o["category"] for o in objs})
        if len(classes) == 1:
            meta["category"] = classes[0]
        meta.update(part_names=PART_NAMES, classes=classes)
        if image_id in split_of:
            meta["split"] = split_of[image_id]
        sample["json"] = meta
        return sample

    return Recipe(items, prepare, files)
