"""``partkit pack``: turn folders of images (and labels, COCO annotations) into shards.

>>> pack(["photos/"], labels="labels/", output=Output("shards/"))  # doctest: +SKIP
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Optional, Sequence

from . import rle as R
from .errors import BadSample, Handler, PartkitError, stop
from .fields import parse_part_names
import numpy as np

from .io import Output, encode_json, encode_png, run_stage
from .io.tario import sample_key
from .io.urls import expand_paths
from .io.codecs import IMAGE_EXTS, MIN_IMAGE_SIDE, _open_checked
from .pointcloud import POINT_EXTS, list_shapes, prepare_shape

__all__ = ["pack", "find_images", "find_inputs", "part_ids", "image_sample", "COCO_AS"]

_EXT_ALIASES = {"jpeg": "jpg", "tiff": "tif"}


def find_images(specs: Sequence[str], exts: Sequence[str] = IMAGE_EXTS) -> list[str]:
    """Image files (or files with ``exts``) from folders (recursive), globs or paths; sorted within each spec."""
    def in_folder(folder: str) -> list[str]:
        return [p for p in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
                if p.lower().rsplit(".", 1)[-1] in exts and os.path.isfile(p)]

    what = "images" if tuple(exts) == IMAGE_EXTS else "images, point clouds or meshes"
    return expand_paths(specs, in_folder, f"{what} ({', '.join(exts)})")


def find_inputs(specs: Sequence[str]) -> list[str]:
    """Images, point clouds and meshes (``POINT_EXTS``) from folders, globs or paths.

    A folder that holds images gives only its images (so stray ``.txt``/``.npy`` files beside
    photos are not read as point clouds); a folder without images gives its 3D files.
    """
    found: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            try:
                found.extend(find_images([spec]))
                continue
            except PartkitError:
                pass
        found.extend(find_images([spec], IMAGE_EXTS + POINT_EXTS))
    return found


def _is_3d(path: str) -> bool:
    return path.lower().rsplit(".", 1)[-1] in POINT_EXTS


def _read_json(path: str, option: str):
    """The JSON document an option names; an unreadable or invalid file is a one-line error."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise PartkitError(f"cannot read {option} file {path!r}: {e.strerror}") from None
    except ValueError:
        raise PartkitError(f"{option} file {path!r} is not valid JSON") from None


def _load_coco(path: str) -> dict:
    """COCO JSON -> {file stem: {"image": ..., "annotations": [...]}, "__categories__": {...}, "__path__": path}.

    The structure is checked here (null entries, duplicate image ids, keypoints, segmentation
    types); masks are checked against their image when it is packed (:func:`_objects`).
    """
    coco = _read_json(path, "--coco")
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise PartkitError(f"--coco file {path!r} lacks 'images'/'annotations'; expected COCO instances JSON")

    def bad(what: str) -> PartkitError:
        return PartkitError(f"--coco file {path!r}: {what}; fix or drop it")

    for name in ("images", "annotations", "categories"):
        if not isinstance(coco.get(name, []), list):
            raise bad(f"'{name}' is not a list")
    cats = {}
    for i, c in enumerate(coco.get("categories", [])):
        if not isinstance(c, dict) or "id" not in c:
            raise bad(f"categories[{i}] is {json.dumps(c)[:60]}, not an object with an 'id'")
        cats[c["id"]] = c
    by_id: dict = {}
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise bad(f"images[{i}] is {json.dumps(im)[:60]}, not an object with 'id' and 'file_name'")
        if im["id"] in by_id:
            raise bad(f"image id {im['id']!r} appears twice ({by_id[im['id']]['image']['file_name']!r} and "
                      f"{im['file_name']!r}); image ids must be unique")
        by_id[im["id"]] = {"image": im, "annotations": []}
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            raise bad(f"annotations[{i}] is {json.dumps(ann)[:60]}, not an object")
        aid = ann.get("id", f"#{i}")
        if "keypoints" in ann:
            k = ann["keypoints"]
            if (not isinstance(k, list) or len(k) % 3 or
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in k)):
                raise bad(f"annotation {aid} has keypoints {json.dumps(k)[:60]}; expected a flat list "
                          "[x1, y1, v1, x2, y2, v2, ...] of numbers")
        seg = ann.get("segmentation")
        if seg is not None and not (isinstance(seg, dict) or (isinstance(seg, list) and all(
                isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in seg))):
            raise bad(f"annotation {aid} has segmentation {json.dumps(seg)[:60]}; expected an RLE object or "
                      "polygons [[x1, y1, x2, y2, x3, y3, ...], ...]")
        if ann.get("image_id") in by_id:  # annotations of images not listed are ignored, as before
            by_id[ann["image_id"]]["annotations"].append(ann)
    table: dict = {}
    for v in by_id.values():
        key = sample_key(v["image"]["file_name"])
        if key in table:
            raise bad(f"images {table[key]['image']['id']!r} and {v['image']['id']!r} both name file "
                      f"{v['image']['file_name']!r}; file names must be unique")
        table[key] = v
    table["__categories__"] = cats
    table["__path__"] = path
    return table


def _instances(entry: dict, cats: dict, height: int, width: int, key: str,
               source: str = "--coco") -> tuple[list[dict], list, Optional[list]]:
    """One image's annotations, checked, as (objects with compressed RLE, keypoints, keypoint names)."""
    objects, kpts, kpt_names = [], [], None
    for ann in entry["annotations"]:
        aid = ann.get("id")
        where = f"{source} annotation {aid}"
        seg = ann.get("segmentation")
        if seg is None:
            raise BadSample(key, f"{where} has no segmentation")
        if isinstance(seg, dict):
            size = seg.get("size")
            if (not isinstance(size, list) or len(size) != 2 or
                    not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
                raise BadSample(key, f"{where}: RLE 'size' is {json.dumps(size)[:40]}; expected [height, width]")
            covered = R.pixels(seg.get("counts"))
            if covered is None:
                raise BadSample(key, f"{where}: RLE 'counts' is not readable; fix or drop the annotation")
            if covered != size[0] * size[1]:
                raise BadSample(key, f"{where}: RLE counts cover {covered} pixels but its size {size[0]}x{size[1]} "
                                     f"has {size[0] * size[1]}; fix or drop the annotation")
        try:
            if isinstance(seg, list) or isinstance(seg.get("counts"), list):
                rle = R.to_compressed(seg, height, width)
            else:
                rle = dict(seg)
        except Exception:
            raise BadSample(key, f"{where} has an unreadable segmentation") from None
        if list(rle["size"]) != [height, width]:
            raise BadSample(key, f"{where}: mask size {rle['size']} differs from the image's {[height, width]}")
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        cat = cats.get(ann.get("category_id"), {})
        objects.append({
            "id": aid, "category_id": ann.get("category_id"), "category": cat.get("name"),
            "bbox": R.bbox(rle), "area": R.area(rle),
            "iscrowd": int(ann.get("iscrowd", 0)), "segmentation": {"size": [height, width], "counts": counts},
        })
        if "keypoints" in ann:
            k = ann["keypoints"]
            kpts.append([[float(k[i]), float(k[i + 1]), int(k[i + 2])] for i in range(0, len(k), 3)])
            kpt_names = cat.get("keypoints", kpt_names)
    return objects, kpts, kpt_names


def _objects(entry: dict, cats: dict, height: int, width: int, key: str,
             source: str = "--coco") -> tuple[bytes, Optional[bytes]]:
    objects, kpts, kpt_names = _instances(entry, cats, height, width, key, source)
    objects_bytes = encode_json({"objects": objects})
    kpts_bytes = None
    if kpts:
        names = kpt_names or [f"kp{i}" for i in range(len(kpts[0]))]
        kpts_bytes = encode_json({"keypoints": kpts, "names": names})
    return objects_bytes, kpts_bytes


COCO_AS = ("objects", "parts")


def image_sample(key: str, path: str, *, category: Optional[str] = None,
                 provenance: Optional[str] = None) -> tuple[dict, dict, object]:
    """One image file -> (sample with the image bytes, its ``json`` metadata (not yet encoded), the PIL image);
    an unreadable or missing image is :class:`BadSample`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadSample(key, f"cannot read image {path}: {e.strerror}") from None
    im = _open_checked(data, key, f"image {path}", MIN_IMAGE_SIDE)
    ext = path.rsplit(".", 1)[-1].lower()
    ext = _EXT_ALIASES.get(ext, ext)
    meta = {"width": im.size[0], "height": im.size[1], "source": os.path.abspath(path)}
    if provenance:
        meta["provenance"] = provenance
    if category:
        meta["category"] = category
    return {"__key__": key, ext: data}, meta, im


def _load_label_names(path: str) -> dict:
    """``--label-names FILE``: ``{"id": name}`` JSON, checked, as ``json`` ``part_names`` (string ids)."""
    doc = _read_json(path, "--label-names")
    try:
        names = parse_part_names(doc, f"--label-names file {path!r}")
    except ValueError as e:
        raise PartkitError(f"{e}; expected {{\"0\": \"background\", \"1\": \"hat\", ...}}") from None
    return {str(i): names[i] for i in sorted(names)}


def part_ids(table: dict) -> dict:
    """``--coco-as parts``: COCO category id -> label id 1..N, for the categories that have at least
    one annotation (of a listed image) in the file, in order of category id; the same for every image.

    A category id that ``categories`` does not list is an error naming the annotation.
    """
    cats, used = table["__categories__"], set()
    for k, entry in table.items():
        if k.startswith("__"):
            continue
        for ann in entry["annotations"]:
            cid = ann.get("category_id")
            if cid not in cats:
                known = ", ".join(str(c) for c in sorted(cats, key=str)[:20]) or "none"
                raise PartkitError(f"--coco file {table['__path__']!r}: annotation {ann.get('id', '?')} has "
                                   f"category_id {json.dumps(cid)[:40]}, which 'categories' does not list "
                                   f"(ids: {known}); add the category or fix the annotation")
            used.add(cid)
    return {cid: i + 1 for i, cid in enumerate(sorted(used, key=lambda c: (str(type(c)), c)))}


def _parts(entry: dict, table: dict, ids: dict, height: int, width: int, key: str,
           category: Optional[str]) -> tuple[bytes, bytes]:
    """One image's part instances -> (``gt_parts.png`` bytes, ``gt_objects.json`` of their union).

    Overlaps: **the smaller part wins** (instances are painted largest first, so a small part is
    never hidden under a larger neighbour's slightly overlapping polygon; equal areas: the later
    annotation wins). Crowd instances are void (255/65535) wherever no non-crowd part covers them.
    """
    objects, _, _ = _instances(entry, table["__categories__"], height, width, key, f"--coco {table['__path__']}")
    masks = R.decode([o["segmentation"] for o in objects], (height, width))
    dtype = np.uint8 if len(ids) < 255 else np.uint16
    void = np.iinfo(dtype).max
    labels = np.zeros((height, width), dtype)
    crowd = np.zeros((height, width), bool)
    order = sorted((i for i, o in enumerate(objects) if not o["iscrowd"]), key=lambda i: (-masks[i].sum(), i))
    for i in order:
        labels[masks[i]] = ids[objects[i]["category_id"]]
    for i, o in enumerate(objects):
        if o["iscrowd"]:
            crowd |= masks[i]
    labels[crowd & (labels == 0)] = void
    union = masks.any(axis=0) if len(objects) else np.zeros((height, width), bool)
    objs = []
    if union.any():
        rle = R.encode(union)
        objs.append({"id": 1, "category_id": None, "category": category, "bbox": R.bbox(rle), "area": R.area(rle),
                     "iscrowd": 0, "segmentation": rle})
    return encode_png(labels), encode_json({"objects": objs})


def pack(
    images: Sequence[str],
    *,
    labels: Optional[str] = None,
    label_names: Optional[str] = None,
    coco: Optional[str] = None,
    coco_as: str = "objects",
    coco_objects: Optional[str] = None,
    category: Optional[str] = None,
    provenance: Optional[str] = None,
    output: Output = Output(),
    handler: Handler = stop,
    points_per_shape: int = 2048,
) -> dict:
    """Write one sample per image: the image bytes, ``json`` metadata, and ground truth if given.

    Point clouds and meshes (``.ply``, ``.obj``, ``.off``, ``.npz``, ``.npy``, ShapeNetPart ``.txt``)
    become 3D samples (:mod:`partkit.pointcloud`); an npz with ``offsets`` gives one per shape.

    ``coco_as="parts"`` reads ``coco`` as one instance per part (PartImageNet's format): each image
    gets ``gt_parts.png`` (ids from :func:`part_ids`, overlaps as :func:`_parts`), ``part_names``
    in its ``json``, and as ``gt_objects.json`` the union of its parts, or the instances of
    ``coco_objects`` (a second COCO file of whole objects) when given.

    ``label_names`` (with ``labels``): a JSON file ``{"id": name}`` naming the ids of the label maps
    (CCP's ``label_names.json``), recorded as ``part_names`` in every sample's ``json``.
    """
    if coco_as not in COCO_AS:
        raise PartkitError(f"--coco-as must be one of {', '.join(COCO_AS)}, got {coco_as!r}")
    if coco_as == "parts" and not coco:
        raise PartkitError("--coco-as parts needs --coco FILE, the COCO json of part instances")
    if coco_objects and coco_as != "parts":
        raise PartkitError("--coco-objects is for --coco-as parts (part instances in --coco, whole objects in "
                           "--coco-objects); with --coco-as objects pass the objects as --coco")
    if coco_as == "parts" and labels is not None:
        raise PartkitError("--labels and --coco-as parts both write gt_parts.png; pass one of them")
    if label_names is not None and labels is None:
        raise PartkitError("--label-names names the ids of --labels label maps; pass --labels too (--coco-as parts "
                           "takes the names from the COCO categories)")
    named = _load_label_names(label_names) if label_names is not None else None
    files = find_inputs(images)
    shapes = [p for p in files if _is_3d(p)]
    if shapes and (labels or coco or coco_objects):
        raise PartkitError(f"--labels and --coco are for images, but {shapes[0]!r} is a point cloud (3D inputs carry "
                           "their part labels inside the file); pack images and point clouds separately")
    if points_per_shape < 1:
        raise PartkitError(f"--points-per-shape must be at least 1, got {points_per_shape}")
    entries = [(k, p, i) for p in files
               for k, i in (list_shapes(p) if _is_3d(p) else [(sample_key(p), None)])]
    keys, files, indices = [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]
    seen: dict[str, str] = {}
    for k, p in zip(keys, files):
        if k in seen:
            raise PartkitError(f"two inputs give the same key {k!r}: {seen[k]} and {p}; rename one")
        seen[k] = p
    if labels is not None and not os.path.isdir(labels):
        raise PartkitError(f"--labels {labels!r} is not a folder; pass the folder of label PNGs")
    coco_table = _load_coco(coco) if coco else None
    ids = part_ids(coco_table) if coco_as == "parts" else None
    objects_table = _load_coco(coco_objects) if coco_objects else None
    if ids is not None:
        cats = coco_table["__categories__"]
        part_names = {str(i): cats[cid].get("name", str(cid)) for cid, i in ids.items()}
        part_cats = {str(i): cid for cid, i in ids.items()}

    def source(rank: int, world: int) -> Iterator[dict]:
        for i, (k, p, j) in enumerate(zip(keys, files, indices)):
            if i % world == rank:
                yield {"__key__": k, "__path__": p, "__index__": j}

    def prepare(rec: dict) -> dict:
        key, path = rec["__key__"], rec["__path__"]
        if _is_3d(path):
            return prepare_shape(key, path, rec["__index__"], num_points=points_per_shape, category=category,
                                 provenance=provenance)
        sample, meta, im = image_sample(key, path, category=category, provenance=provenance)
        width, height = im.size
        if labels is not None:
            lpath = os.path.join(labels, os.path.splitext(os.path.basename(path))[0] + ".png")
            if not os.path.isfile(lpath):
                raise BadSample(key, f"no label map {lpath} for image {path}")
            with open(lpath, "rb") as f:
                ldata = f.read()
            lab = _open_checked(ldata, key, f"label map {lpath}")
            if lab.size != im.size:
                raise BadSample(key, f"label map {lpath} is {lab.size[0]}x{lab.size[1]} but the image is {width}x{height}")
            if lab.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise BadSample(key, f"label map {lpath} has mode {lab.mode}; expected single-channel label ids")
            sample["gt_parts.png"] = ldata
            if named is not None:
                meta["part_names"] = named
        if ids is not None:
            meta["part_names"], meta["part_category_ids"] = part_names, part_cats
            entry = coco_table.get(key)
            if entry is not None:
                sample["gt_parts.png"], sample["gt_objects.json"] = _parts(entry, coco_table, ids, height, width, key,
                                                                           category)
            oentry = objects_table.get(key) if objects_table is not None else None
            if oentry is not None:
                sample["gt_objects.json"], kp = _objects(oentry, objects_table["__categories__"], height, width, key,
                                                         f"--coco-objects {coco_objects}")
                if kp is not None:
                    sample["gt_kpts.json"] = kp
        elif coco_table is not None:
            entry = coco_table.get(key)
            if entry is not None:
                sample["gt_objects.json"], kp = _objects(entry, coco_table["__categories__"], height, width, key,
                                                         f"--coco {coco}")
                if kp is not None:
                    sample["gt_kpts.json"] = kp
        sample["json"] = encode_json(meta)
        return sample

    config = {"labels": labels, **({"label_names": label_names} if label_names else {}), "coco": coco, "category": category, "provenance": provenance}
    if coco_as != "objects":
        config.update(coco_as=coco_as, coco_objects=coco_objects)
    if any(_is_3d(p) for p in files):
        config["points_per_shape"] = points_per_shape
    inputs = list(dict.fromkeys(files))
    if labels is not None:
        stems = (os.path.splitext(os.path.basename(p))[0] for p in inputs if not _is_3d(p))
        inputs += [q for q in (os.path.join(labels, f"{stem}.png") for stem in stems) if os.path.isfile(q)]
    inputs += [f for f in (label_names, coco, coco_objects) if f]
    return run_stage(images, lambda batch: batch, output=output, name="pack", prepare=prepare, handler=handler,
                     config=config, source=source, input_files=inputs)
