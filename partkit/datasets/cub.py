"""CUB-200-2011 (Wah et al. 2011): 15 part keypoints, a box and a class per bird image.

Layout (the release's ``CUB_200_2011/`` folder, its README): ``images.txt`` (``<image_id> <path>``),
``image_class_labels.txt`` (``<image_id> <class_id>``), ``classes.txt`` (``<class_id> <name>``),
``train_test_split.txt`` (``<image_id> <1 = train | 0 = test>``), ``bounding_boxes.txt``
(``<image_id> <x> <y> <width> <height>``), ``parts/parts.txt`` (``<part_id> <name>``),
``parts/part_locs.txt`` (``<image_id> <part_id> <x> <y> <visible>``) and ``images/<path>``.
Optional: the separately released ``segmentations/<path>.png`` (soft masks, the mean of several
annotators) beside them.

A sample: the image; ``gt_kpts.json`` with the 15 keypoints in ``parts.txt`` order, named, with
``v = 2`` where ``visible`` is 1 and ``[0, 0, 0]`` where it is 0 (COCO's "not labelled");
``gt_objects.json``: one bird with the official box as ``bbox``, whose ``segmentation`` is the
segmentation mask thresholded at 50% when ``segmentations/`` is present, else the box itself
(``"mask_from": "box"``); ``json`` ``category`` = the class name, ``class_id``, ``split``.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .. import rle as R
from ..errors import BadSample, PartkitError
from ..io import encode_json
from ..io.tario import sample_key
from ..pack import image_sample
from ._registry import Recipe, read_table, register_dataset, require

NAME = "cub"
SPLITS = ("train", "test")
LAYOUT = ("CUB_200_2011/: images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, bounding_boxes.txt, "
          "parts/parts.txt, parts/part_locs.txt, images/ (optional segmentations/)")
FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt",
         os.path.join("parts", "parts.txt"), os.path.join("parts", "part_locs.txt"))


def _number(path: str, n: int, text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise PartkitError(f"{path} line {n}: {text!r} is not a number") from None


@register_dataset(NAME, title="CUB-200-2011", splits=SPLITS, layout=LAYOUT)
def read(root: str, split: str) -> Recipe:
    paths = {f: require(NAME, root, *f.split(os.sep)) for f in FILES}
    require(NAME, root, "images", kind="folder")
    images = {r[0]: r[1] for r in read_table(paths["images.txt"], 2, text_last=True)}
    classes = {r[0]: r[1] for r in read_table(paths["classes.txt"], 2, text_last=True)}
    labels = {r[0]: r[1] for r in read_table(paths["image_class_labels.txt"], 2)}
    is_train = {r[0]: r[1] for r in read_table(paths["train_test_split.txt"], 2)}
    boxes = {r[0]: r[1:] for r in read_table(paths["bounding_boxes.txt"], 5)}
    parts = read_table(paths[os.path.join("parts", "parts.txt")], 2, text_last=True)
    part_index = {r[0]: i for i, r in enumerate(parts)}
    names = [r[1] for r in parts]
    locs: dict = {}
    locs_path = paths[os.path.join("parts", "part_locs.txt")]
    for n, (iid, pid, x, y, vis) in enumerate(read_table(locs_path, 5), 1):
        if pid not in part_index:
            raise PartkitError(f"{locs_path}: part id {pid!r} is not in parts/parts.txt")
        locs.setdefault(iid, {})[part_index[pid]] = (_number(locs_path, n, x), _number(locs_path, n, y),
                                                      _number(locs_path, n, vis, int))
    seg_root = os.path.join(root, "segmentations")
    has_seg = os.path.isdir(seg_root)

    for iid in images:
        for what, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                            ("bounding_boxes.txt", boxes)):
            if iid not in table:
                raise PartkitError(f"CUB-200-2011: image id {iid} of images.txt has no line in {what}")
        if is_train[iid] not in ("0", "1"):
            raise PartkitError(f"CUB-200-2011: train_test_split.txt gives image {iid} {is_train[iid]!r}; expected 1 "
                               "(train) or 0 (test)")
        if labels[iid] not in classes:
            raise PartkitError(f"CUB-200-2011: class id {labels[iid]} of image {iid} is not in classes.txt")
    wanted = [iid for iid in images
              if split == "all" or (is_train[iid] == "1") == (split == "train")]
    wanted.sort(key=lambda i: _number(paths["images.txt"], 0, i, int))
    items = [(sample_key(images[i]), i) for i in wanted]
    files = list(paths.values()) + [os.path.join(root, "images", images[i]) for i in wanted]

    def prepare(key: str, iid: str) -> dict:
        path = os.path.join(root, "images", images[iid])
        if not os.path.isfile(path):
            raise BadSample(key, f"CUB-200-2011 image {images[iid]!r} (id {iid}) is listed in images.txt but "
                                 f"{path} does not exist")
        cls = classes[labels[iid]]
        sample, meta, im = image_sample(key, path, category=cls)
        width, height = im.size
        x, y, w, h = (float(v) for v in boxes[iid])
        kpts = []
        for j in range(len(names)):
            px, py, vis = locs.get(iid, {}).get(j, (0.0, 0.0, 0))
            kpts.append([px, py, 2] if vis else [0.0, 0.0, 0])
        mask_from = "box"
        seg_path = os.path.join(seg_root, os.path.splitext(images[iid])[0] + ".png")
        if has_seg and os.path.isfile(seg_path):
            seg = Image.open(seg_path)
            if seg.size != (width, height):
                raise BadSample(key, f"segmentation {seg_path} is {seg.size[0]}x{seg.size[1]} but the image is "
                                     f"{width}x{height}")
            arr = np.asarray(seg.convert("L"))
            mask, mask_from = arr >= 128, "segmentation"
        else:
            mask = np.zeros((height, width), bool)
            x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
            mask[y0:int(np.ceil(y + h)), x0:int(np.ceil(x + w))] = True
        rle = R.encode(mask)
        obj = {"id": 1, "category_id": int(labels[iid]), "category": cls, "bbox": [x, y, w, h], "area": R.area(rle),
               "iscrowd": 0, "segmentation": rle, "mask_from": mask_from}
        sample["gt_objects.json"] = encode_json({"objects": [obj]})
        sample["gt_kpts.json"] = encode_json({"keypoints": [kpts], "names": names})
        meta.update(split="train" if is_train[iid] == "1" else "test", class_id=int(labels[iid]), image_id=int(iid))
        sample["json"] = meta
        return sample

    return Recipe(items, prepare, files)
