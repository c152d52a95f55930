"""partkit pack --dataset NAME ROOT: each benchmark's official layout, written here in that exact format
(from the formats' own documentation and release files), read back into the fields every stage uses."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partkit import fields
from partkit import rle as R
from partkit.datasets import DATASETS, pack_dataset
from partkit.errors import PartkitError
from partkit.io import Output, decode_json, decode_label_map, decode_npy
from partkit.pack import pack
from partkit.pointcloud import decode_shape
from conftest import SHARED, invoke, one_error_line, read_shard

CARPARTS = SHARED / "carparts"


def cli(tmp_path, args):
    """``partkit pack -o FOLDER --dataset ARGS...`` (a folder output: stdout never carries a half tar)."""
    return invoke(["pack", "-o", tmp_path / "cli", "--dataset", *args])


def _pack(name, root, split, tmp_path, **kw):
    out = tmp_path / f"out_{name}_{split}"
    pack_dataset(name, str(root), split=split, output=Output(str(out)), **kw)
    return {s["__key__"]: s for s in read_shard(out / "000000.tar")}


def _img(path, w, h, color=(90, 120, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def test_registry_lists_the_four_datasets_with_their_splits():
    assert {k: DATASETS[k].splits for k in DATASETS} == {
        "partimagenet": ("train", "val", "test", "all"), "cub": ("train", "test", "all"),
        "pascal-part": ("train", "val", "all"), "shapenetpart": ("train", "val", "test", "all")}


# --------------------------------------------------------------------------------------------- PartImageNet

def _box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def partimagenet(tmp_path):
    root = tmp_path / "PartImageNet"
    cats = [{"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
            {"id": 1, "name": "Quadruped Body", "supercategory": "Quadruped"},
            {"id": 2, "name": "Car Tier", "supercategory": "Car"},
            {"id": 3, "name": "Boat Sail", "supercategory": "Boat"}]  # no instance in any split
    splits = {
        "train": [("n02085620_10074", [(0, _box(2, 2, 12, 10)), (1, _box(10, 8, 30, 20))])],
        "val": [("n02814533_1001", [(2, _box(4, 4, 14, 14))])],
        "test": [("n02085620_77", [(1, _box(0, 0, 20, 20))])],
    }
    aid = 1
    for split, images in splits.items():
        doc = {"images": [], "annotations": [], "categories": cats}
        for i, (stem, anns) in enumerate(images):
            _img(root / "images" / split / stem.split("_")[0] / f"{stem}.JPEG", 32, 24)
            doc["images"].append({"id": i, "file_name": f"{stem}.JPEG", "width": 32, "height": 24})
            for cid, seg in anns:
                doc["annotations"].append({"id": aid, "image_id": i, "category_id": cid, "segmentation": seg,
                                           "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]})
                aid += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(doc))
    return root


def test_partimagenet_ids_are_shared_by_every_split(partimagenet, tmp_path):
    train = _pack("partimagenet", partimagenet, "train", tmp_path)
    val = _pack("partimagenet", partimagenet, "val", tmp_path)
    (s,) = train.values()
    (v,) = val.values()
    names = {"1": "Quadruped Head", "2": "Quadruped Body", "3": "Car Tier"}  # used categories, by id; Sail unused
    for sample, split in ((s, "train"), (v, "val")):
        meta = decode_json(sample)
        assert meta["part_names"] == names and meta["split"] == split and meta["dataset"] == "partimagenet"
    meta = decode_json(s)
    assert meta["category"] == "Quadruped" and meta["wnid"] == "n02085620" and decode_json(v)["category"] == "Car"
    lab = decode_label_map(s, "gt_parts.png")
    assert lab[5, 5] == 1 and lab[15, 20] == 2 and lab[22, 5] == 0
    assert lab[9, 11] == 1  # head (80 px) overlaps body (240 px): the smaller part wins
    assert decode_label_map(v, "gt_parts.png")[8, 8] == 3
    (obj,) = fields.objects(s)
    union = R.decode([obj["segmentation"]])[0]
    assert np.array_equal(union, lab > 0)
    assert set(_pack("partimagenet", partimagenet, "all", tmp_path)) == {"n02085620_10074", "n02814533_1001",
                                                                          "n02085620_77"}


def test_partimagenet_missing_split_file_and_image(partimagenet, tmp_path):
    os.remove(partimagenet / "annotations" / "test.json")
    with pytest.raises(PartkitError, match=r"lacks the file 'annotations/test.json'"):
        _pack("partimagenet", partimagenet, "test", tmp_path)
    os.remove(partimagenet / "images" / "train" / "n02085620" / "n02085620_10074.JPEG")
    res = cli(tmp_path, [ "partimagenet", partimagenet, "--split", "train"])
    one_error_line(res, "n02085620_10074.JPEG", "not found")


def _carparts_root(tmp_path, n):
    """A PartImageNet-layout root holding the first ``n`` annotated images of the real car-parts COCO file."""
    doc = json.loads((CARPARTS / "annotations.json").read_text())
    keep = [im for im in doc["images"] if any(a["image_id"] == im["id"] for a in doc["annotations"])][:n]
    ids = {im["id"] for im in keep}
    doc.update(images=keep, annotations=[a for a in doc["annotations"] if a["image_id"] in ids])
    root = tmp_path / "pin"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.json").write_text(json.dumps(doc))
    (root / "images" / "train").mkdir(parents=True)
    for im in keep:
        os.symlink(CARPARTS / "images" / im["file_name"], root / "images" / "train" / im["file_name"])
    return root


def test_partimagenet_on_the_real_carparts_coco_file_equals_pack_coco_parts(tmp_path):
    """The real car-parts COCO file (PartImageNet's format, with tool keys and overlapping polygons): the first
    images with their real annotations, packed by the recipe and by ``pack --coco-as parts``, agree byte for byte."""
    root = _carparts_root(tmp_path, 4)
    got = _pack("partimagenet", root, "train", tmp_path)
    pack([str(root / "images" / "train")], coco=str(root / "annotations" / "train.json"), coco_as="parts",
         output=Output(str(tmp_path / "ref")))
    ref = {s["__key__"]: s for s in read_shard(tmp_path / "ref" / "000000.tar")}
    assert sorted(got) == sorted(ref) and len(got) == 4
    for k in got:
        for f in ("jpg", "gt_parts.png", "gt_objects.json"):
            assert got[k][f] == ref[k][f], (k, f)
        assert decode_json(got[k])["part_names"] == decode_json(ref[k])["part_names"]
    names = set(decode_json(got[k])["part_names"].values())
    assert {"wheel", "hood", "front_bumper"} <= names and "_background_" not in names
    lab = decode_label_map(next(iter(got.values())), "gt_parts.png")
    assert 0 < (lab > 0).mean() < 1


def test_recipe_output_runs_through_extract_cluster_eval_with_part_names(tmp_path):
    """Issue 20's check, on the recipe's output: pack | extract | cluster --scope dataset --fg-from gt_parts |
    eval miou nmi prints the car-part names in its per-part table."""
    root = _carparts_root(tmp_path, 3)
    steps = [["pack", "--dataset", "partimagenet", root, "--split", "train", "-o", tmp_path / "packed"],
             ["extract", tmp_path / "packed", "--model", "rgb", "--size", "64", "-o", tmp_path / "feat"],
             ["cluster", tmp_path / "feat", "--scope", "dataset", "-k", "18", "--fg-from", "gt_parts",
              "-o", tmp_path / "parts"]]
    for args in steps:
        res = invoke(args)
        assert res.exit_code == 0, (args[0], res.stderr)
    res = invoke(["eval", "miou", "nmi", tmp_path / "parts"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert 0 < report["metrics"]["miou"]["value"] <= 100 and 0 < report["metrics"]["nmi"]["value"] <= 100
    for name in ("wheel", "hood", "front_bumper"):
        assert name in res.stderr


# --------------------------------------------------------------------------------------------- CUB-200-2011

CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]


@pytest.fixture
def cub(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images = [(1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 1),
              (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 0),
              (3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 2, 1)]
    for iid, name, _, _ in images:
        _img(root / "images" / name, 40, 30)
    w = lambda f, lines: (root / f).write_text("".join(line + "\n" for line in lines))  # noqa: E731
    (root / "parts").mkdir()
    w("images.txt", [f"{i} {n}" for i, n, _, _ in images])
    w("classes.txt", ["1 001.Black_footed_Albatross", "2 002.Laysan_Albatross"])
    w("image_class_labels.txt", [f"{i} {c}" for i, _, c, _ in images])
    w("train_test_split.txt", [f"{i} {t}" for i, _, _, t in images])
    w("bounding_boxes.txt", ["1 5.0 4.0 20.0 15.0", "2 0.0 0.0 40.0 30.0", "3 10.0 2.0 12.5 8.0"])
    w("parts/parts.txt", [f"{j + 1} {n}" for j, n in enumerate(CUB_PARTS)])
    locs = []
    for i, _, _, _ in images:
        for j in range(15):
            vis = int((i + j) % 3 != 0)
            locs.append(f"{i} {j + 1} {float(j + 2) if vis else 0.0} {float(i + 3) if vis else 0.0} {vis}")
    w("parts/part_locs.txt", locs)
    seg = np.zeros((30, 40), np.uint8)
    seg[5:20, 6:26] = 255
    seg[20:22, 6:26] = 100  # fewer than half the annotators: outside the thresholded mask
    (root / "segmentations" / "001.Black_footed_Albatross").mkdir(parents=True)
    seg_dir = root / "segmentations" / "001.Black_footed_Albatross"
    Image.fromarray(seg).save(seg_dir / "Black_Footed_Albatross_0046_18.png")
    return root


def test_cub_keypoints_boxes_classes_and_splits(cub, tmp_path):
    train = _pack("cub", cub, "train", tmp_path)
    assert list(train) == ["Black_Footed_Albatross_0046_18", "Laysan_Albatross_0002_1027"]
    assert list(_pack("cub", cub, "test", tmp_path)) == ["Black_Footed_Albatross_0009_34"]
    s = train["Black_Footed_Albatross_0046_18"]
    meta = decode_json(s)
    assert meta["category"] == "001.Black_footed_Albatross" and meta["class_id"] == 1 and meta["split"] == "train"
    (kp,), names = fields.keypoints(s)
    assert names == CUB_PARTS and kp.shape == (15, 3)
    for j in range(15):
        if (1 + j) % 3 != 0:
            assert list(kp[j]) == [j + 2, 4, 2]  # visible -> COCO v = 2
        else:
            assert list(kp[j]) == [0, 0, 0]  # not visible -> not labelled
    objs, masks = fields.object_masks(s, (30, 40))
    assert objs[0]["bbox"] == [5.0, 4.0, 20.0, 15.0] and objs[0]["mask_from"] == "segmentation"
    assert masks[0].sum() == 15 * 20 and masks[0][5:20, 6:26].all()
    o3, m3 = fields.object_masks(train["Laysan_Albatross_0002_1027"], (30, 40))
    assert o3[0]["mask_from"] == "box" and o3[0]["category"] == "002.Laysan_Albatross"
    assert m3[0].sum() == 8 * 13 and m3[0][2:10, 10:23].all()  # box x 10..22.5, y 2..10


def test_cub_to_stdout_is_a_tar_of_the_split(cub):
    res = invoke(["pack", "--dataset", "cub", cub, "--split", "test"])
    assert res.exit_code == 0, res.stderr
    (s,) = read_shard(res.stdout_bytes)
    assert s["__key__"] == "Black_Footed_Albatross_0009_34" and decode_json(s)["split"] == "test"


def test_cub_missing_file_is_one_line(cub, tmp_path):
    os.remove(cub / "parts" / "part_locs.txt")
    one_error_line(cli(tmp_path, [ "cub", cub]), "parts/part_locs.txt", "CUB-200-2011")
    one_error_line(cli(tmp_path, [ "cub", cub, "--split", "val"]), "--split 'val'", "train, test, all")
    one_error_line(cli(tmp_path, [ "cub", cub, "--coco", "x.json"]), "drop --coco")
    one_error_line(cli(tmp_path, [ "birds", cub]), "unknown --dataset", "pascal-part")


# --------------------------------------------------------------------------------------------- Pascal-Part

def _struct_array(records, names):
    arr = np.empty((1, len(records)), dtype=[(n, "O") for n in names])
    for i, r in enumerate(records):
        for n in names:
            arr[0, i][n] = r[n]
    return arr


def _write_mat(path, imname, objects):
    """A Pascal-Part annotation as the release stores it: anno.imname, anno.objects(i).{class, class_ind, mask,
    parts(j).{part_name, mask}} (MATLAB struct arrays; masks uint8 H x W)."""
    from scipy.io import savemat

    objs = []
    for cls, ind, mask, parts in objects:
        p = _struct_array([{"part_name": n, "mask": m.astype(np.uint8)} for n, m in parts], ["part_name", "mask"]) \
            if parts else np.zeros((0, 0))
        objs.append({"class": cls, "class_ind": np.array([[ind]], np.uint8), "mask": mask.astype(np.uint8),
                     "parts": p})
    anno = {"imname": imname, "objects": _struct_array(objs, ["class", "class_ind", "mask", "parts"])}
    savemat(path, {"anno": anno})


def _rect(y0, y1, x0, x1, h=30, w=40):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def pascal(tmp_path):
    root = tmp_path / "VOC2010"
    (root / "Annotations_Part").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    _img(root / "JPEGImages" / "2008_000002.jpg", 40, 30)
    _img(root / "JPEGImages" / "2008_000003.jpg", 40, 30)
    cat = _rect(2, 20, 2, 20)
    car = _rect(10, 28, 15, 38)  # later object: occludes the cat where they overlap
    _write_mat(root / "Annotations_Part" / "2008_000002.mat", "2008_000002", [
        ("cat", 8, cat, [("head", _rect(2, 8, 2, 10)), ("leye", _rect(3, 5, 3, 5)), ("torso", _rect(8, 20, 2, 20))]),
        ("car", 7, car, [("wheel_1", _rect(24, 28, 16, 22)), ("wheel_2", _rect(24, 28, 30, 36)),
                         ("window_3", _rect(12, 16, 20, 30))]),
    ])
    _write_mat(root / "Annotations_Part" / "2008_000003.mat", "2008_000003", [("boat", 4, _rect(5, 25, 5, 35), [])])
    (root / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("2008_000003\n")
    return root


def test_pascal_part_label_map_objects_and_splits(pascal, tmp_path):
    from partkit.datasets.pascal_part import PART_IDS

    got = _pack("pascal-part", pascal, "all", tmp_path)
    assert list(got) == ["2008_000002", "2008_000003"]
    s = got["2008_000002"]
    meta = decode_json(s)
    assert meta["split"] == "train" and meta["classes"] == ["car", "cat"] and "category" not in meta
    names = meta["part_names"]
    lab = decode_label_map(s, "gt_parts.png")
    at = lambda y, x: names[str(lab[y, x])]  # noqa: E731
    assert at(6, 8) == "cat/head" and at(4, 4) == "cat/leye" and at(15, 5) == "cat/torso"
    assert at(26, 18) == at(26, 33) == "car/wheel" and at(14, 25) == "car/window"
    assert lab[18, 18] == 255  # the car's silhouette covers the cat torso there, and no car part does
    assert lab[0, 0] == 0 and lab[29, 39] == 0
    assert len(set(PART_IDS.values())) == len(PART_IDS) == len(names) and max(PART_IDS.values()) < 255
    objs, masks = fields.object_masks(s, (30, 40))
    assert [o["category"] for o in objs] == ["cat", "car"] and masks[0].sum() == 18 * 18
    boat = got["2008_000003"]
    assert decode_json(boat)["category"] == "boat" and decode_json(boat)["split"] == "val"
    blab = decode_label_map(boat, "gt_parts.png")
    assert (blab[5:25, 5:35] == 255).all() and blab.sum() == 255 * 20 * 30  # no parts: the silhouette is ignored
    assert list(_pack("pascal-part", pascal, "train", tmp_path)) == ["2008_000002"]


def test_pascal_part_errors(pascal, tmp_path):
    os.remove(pascal / "ImageSets" / "Main" / "val.txt")
    one_error_line(cli(tmp_path, [ "pascal-part", pascal, "--split", "val"]), "ImageSets/Main/val.txt")
    _write_mat(pascal / "Annotations_Part" / "2008_000003.mat", "2008_000003",
               [("cat", 8, _rect(2, 9, 2, 9), [("tentacle", _rect(2, 4, 2, 4))])])
    one_error_line(cli(tmp_path, [ "pascal-part", pascal]), "'tentacle'", "lfleg")
    (pascal / "Annotations_Part" / "2008_000003.mat").write_bytes(b"not a mat file")
    one_error_line(cli(tmp_path, [ "pascal-part", pascal]), "cannot read Pascal-Part annotation")


# --------------------------------------------------------------------------------------------- ShapeNetPart

SPLIT_LISTS = {"train": ["shape_data/02954340/c7122c44495a5ac6aceb0fa31f18f016",
                         "shape_data/02691156/1a04e3eab45ca15dd86060f189eb133"],
               "val": ["shape_data/02954340/3dec0d851c4a4a5d7ba2ba9d2ff2c2f9"],
               "test": ["shape_data/02691156/1a6ad7a24bb89733f412783097373bdc"]}


def _shapenet_root(tmp_path, normal: bool):
    root = tmp_path / ("v0_normal" if normal else "v0")
    root.mkdir()
    (root / "synsetoffset2category.txt").write_text("Airplane\t02691156\nCap\t02954340\n")
    (root / "train_test_split").mkdir()
    for s, lst in SPLIT_LISTS.items():
        (root / "train_test_split" / f"shuffled_{s}_file_list.json").write_text(json.dumps(lst))
    rng = np.random.default_rng(0)
    truth = {}
    for s, lst in SPLIT_LISTS.items():
        for entry in lst:
            _, synset, sid = entry.split("/")
            n = 50
            pts = rng.normal(size=(n, 3)) * [1, 2, 0.5] + [3, -1, 0]
            local = rng.integers(1, 3 if synset == "02954340" else 5, size=n)  # cap: 2 parts, airplane: 4
            first = 6 if synset == "02954340" else 0
            glob_ = local + first - 1
            truth[sid] = (pts, glob_)
            if normal:
                nrm = rng.normal(size=(n, 3))
                nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
                (root / synset).mkdir(exist_ok=True)
                np.savetxt(root / synset / f"{sid}.txt", np.c_[pts, nrm, glob_], fmt="%.6f")
            else:
                (root / synset / "points").mkdir(parents=True, exist_ok=True)
                (root / synset / "points_label").mkdir(exist_ok=True)
                np.savetxt(root / synset / "points" / f"{sid}.pts", pts, fmt="%.6f")
                np.savetxt(root / synset / "points_label" / f"{sid}.seg", local, fmt="%d")
    return root, truth


@pytest.mark.parametrize("normal", [False, True], ids=["pts_seg", "normal_txt"])
def test_shapenetpart_both_layouts_global_labels(tmp_path, normal):
    root, truth = _shapenet_root(tmp_path, normal)
    got = _pack("shapenetpart", root, "train", tmp_path)
    assert sorted(got) == ["airplane_1a04e3eab45ca15dd86060f189eb133", "cap_c7122c44495a5ac6aceb0fa31f18f016"]
    cap = got["cap_c7122c44495a5ac6aceb0fa31f18f016"]
    meta = decode_json(cap)
    assert meta["category"] == "cap" and meta["parts"] == {"6": "panel", "7": "peak"} and meta["split"] == "train"
    pts, lab = truth["c7122c44495a5ac6aceb0fa31f18f016"]
    shape = decode_shape(cap)
    assert np.array_equal(shape.labels, lab) and set(np.unique(lab)) <= {6, 7}
    raw = shape.points * meta["scale"] + np.array(meta["center"])
    assert np.allclose(raw, pts, atol=1e-4)
    assert ("normals.npy" in cap) == normal
    air = got["airplane_1a04e3eab45ca15dd86060f189eb133"]
    assert np.array_equal(decode_npy(air, "gt_parts.npy"), truth["1a04e3eab45ca15dd86060f189eb133"][1])
    assert set(_pack("shapenetpart", root, "all", tmp_path)) == {
        f"{c}_{e.split('/')[-1]}" for lst in SPLIT_LISTS.values() for e in lst
        for c in ["cap" if "02954340" in e else "airplane"]}


def test_shapenetpart_errors(tmp_path):
    root, _ = _shapenet_root(tmp_path, False)
    os.remove(root / "train_test_split" / "shuffled_test_file_list.json")
    one_error_line(cli(tmp_path, [ "shapenetpart", root, "--split", "test"]),
                   "train_test_split/shuffled_test_file_list.json")
    (root / "02954340" / "points_label" / "3dec0d851c4a4a5d7ba2ba9d2ff2c2f9.seg").write_text("1\n2\n")
    one_error_line(cli(tmp_path, [ "shapenetpart", root, "--split", "val"]), "2 labels but")
    os.remove(root / "synsetoffset2category.txt")
    one_error_line(cli(tmp_path, [ "shapenetpart", root]), "synsetoffset2category.txt")
