"""PartImageNet (He et al. 2022): COCO part instances per split, images per split.

Layout (the release, as PartDistillation's loader reads it): ``ROOT/annotations/{train,val,test}.json``
(also accepted: ``annotations/{split}/{split}.json``) and ``ROOT/images/{split}/`` (any depth, e.g.
``images/train/n01440764/n01440764_10043.JPEG``); an image is matched to its COCO entry by file stem.
Each sample is what ``pack --coco-as parts`` writes: ``gt_parts.png`` (one id per part category;
overlaps to the smaller part), ``part_names`` and ``part_category_ids`` in ``json``, the union of
the parts as ``gt_objects.json``. The ids are the same for every split: the categories that have
instances in any split file present under ROOT, in order of category id. ``json`` ``category`` is
the parts' COCO ``supercategory`` (``Quadruped``, ``Car``, ...) when they agree, and ``wnid`` the
ImageNet class of ``nXXXXXXXX_*`` file names.
"""
from __future__ import annotations

import json
import os
import re

from ..errors import BadSample, PartkitError
from ..io.tario import sample_key
from ..io.codecs import IMAGE_EXTS
from ..pack import _load_coco, _parts, image_sample
from ._registry import Recipe, register_dataset, require

NAME = "partimagenet"
SPLITS = ("train", "val", "test")
LAYOUT = ("ROOT/annotations/{train,val,test}.json (COCO, one instance per part) and ROOT/images/{train,val,test}/ "
          "(image files, any depth)")


def _split_file(root: str, split: str):
    for rel in ((f"{split}.json",), (split, f"{split}.json")):
        path = os.path.join(root, "annotations", *rel)
        if os.path.isfile(path):
            return path
    return None


def _used_categories(path: str) -> set:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        raise PartkitError(f"PartImageNet annotation file {path!r} is not readable JSON") from None
    anns = doc.get("annotations", []) if isinstance(doc, dict) else []
    return {a.get("category_id") for a in anns if isinstance(a, dict)}


@register_dataset(NAME, title="PartImageNet", splits=SPLITS, layout=LAYOUT)
def read(root: str, split: str) -> Recipe:
    splits = SPLITS if split == "all" else (split,)
    files = {s: _split_file(root, s) for s in SPLITS}
    for s in splits:
        if files[s] is None:
            require(NAME, root, "annotations", f"{s}.json")
        require(NAME, root, "images", s, kind="folder")
    # one numbering for every split: the categories used by any split file present
    tables = {s: _load_coco(files[s]) for s in splits}
    used: set = set()
    for s in SPLITS:
        if files[s] is None:
            continue
        if s in tables:
            used |= {a.get("category_id") for k, e in tables[s].items() if not k.startswith("__")
                     for a in e["annotations"]}
        else:
            used |= _used_categories(files[s])
    cats: dict = {}
    for t in tables.values():
        cats.update(t["__categories__"])
    unknown = sorted((c for c in used if c not in cats), key=str)
    if unknown:
        raise PartkitError(f"PartImageNet annotations use category_id {unknown[0]!r}, which no 'categories' list "
                           "names; the annotation files are inconsistent")
    ids = {cid: i + 1 for i, cid in enumerate(sorted(used, key=lambda c: (str(type(c)), c)))}
    part_names = {str(i): str(cats[cid].get("name", cid)) for cid, i in ids.items()}
    part_cats = {str(i): cid for cid, i in ids.items()}

    items, inputs = [], [files[s] for s in splits]
    for s in splits:
        table = tables[s]
        on_disk = {sample_key(f): os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "images", s))
                   for f in names if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTS}
        for key in sorted(k for k in table if not k.startswith("__")):
            items.append((key, (s, on_disk.get(key), table[key]["image"].get("file_name"))))
        inputs += [on_disk[k] for k in table if k in on_disk]

    def prepare(key: str, item) -> dict:
        s, path, file_name = item
        if path is None:
            raise BadSample(key, f"PartImageNet {s} image {file_name!r} is listed in {files[s]} but not found under "
                                 f"{os.path.join(root, 'images', s)}")
        table = tables[s]
        entry = table[key]
        supers = {str(cats.get(a.get("category_id"), {}).get("supercategory") or "") for a in entry["annotations"]}
        supers.discard("")
        category = supers.pop() if len(supers) == 1 else None
        sample, meta, im = image_sample(key, path, category=category)
        width, height = im.size
        sample["gt_parts.png"], sample["gt_objects.json"] = _parts(entry, table, ids, height, width, key, category)
        meta.update(split=s, part_names=part_names, part_category_ids=part_cats)
        m = re.match(r"(n\d{8})_", os.path.basename(path))
        if m:
            meta["wnid"] = m.group(1)
        sample["json"] = meta
        return sample

    return Recipe(items, prepare, inputs)
