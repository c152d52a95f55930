"""partkit pack --coco-as parts: one COCO instance per part -> gt_parts.png, part_names, object masks."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partkit import rle as R
from partkit.cli.main import app
from partkit.errors import PartkitError
from partkit.io import Output, decode_json, decode_label_map
from partkit.pack import pack
from conftest import read_shard

CARPARTS = Path(os.environ.get("PARTKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "carparts"

BIG = [[2, 2, 30, 2, 30, 20, 2, 20]]       # 28 x 18 box
SMALL = [[20, 10, 36, 10, 36, 26, 20, 26]]  # 16 x 16 box, overlaps BIG on x 20..30, y 10..20


def _coco(tmp_path, annotations, categories=None, name="coco.json", images=None):
    coco = {"images": images or [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "categories": categories or [{"id": 1, "name": "_background_"}, {"id": 7, "name": "body"},
                                         {"id": 3, "name": "wheel"}],
            "annotations": annotations}
    (tmp_path / name).write_text(json.dumps(coco))
    return str(tmp_path / name)


def _ann(i, cat, seg, **kw):
    return {"id": i, "image_id": 1, "category_id": cat, "segmentation": seg, "iscrowd": 0, **kw}


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    return str(tmp_path / "a.jpg")


def _one(out):
    (s,) = read_shard(Path(out) / "000000.tar")
    return s, decode_json(s), decode_label_map(s, "gt_parts.png")


def _raster(seg, h=30, w=40):
    return R.decode([R.to_compressed(seg, h, w)])[0]


@pytest.mark.parametrize("order", ["big_first", "small_first"])
def test_overlap_smaller_part_wins_whatever_the_order(tmp_path, image, order):
    anns = [_ann(1, 7, BIG), _ann(2, 3, SMALL)]
    coco = _coco(tmp_path, anns if order == "big_first" else anns[::-1])
    pack([image], coco=coco, coco_as="parts", category="car", output=Output(str(tmp_path / "o")))
    s, meta, lab = _one(tmp_path / "o")
    # ids: categories with instances, sorted by category id (3 wheel -> 1, 7 body -> 2); _background_ has none
    assert meta["part_names"] == {"1": "wheel", "2": "body"} and meta["part_category_ids"] == {"1": 3, "2": 7}
    big, small = _raster(BIG), _raster(SMALL)
    assert (big & small).sum() > 0
    assert (lab == 1).sum() == small.sum()                       # the small part keeps all its pixels
    assert (lab == 2).sum() == (big & ~small).sum()               # the big one loses the overlap
    assert ((lab == 0) == ~(big | small)).all()
    (obj,) = decode_json(s, "gt_objects.json")["objects"]         # no object annotation: the union of parts
    assert obj["category"] == "car" and obj["area"] == (big | small).sum()
    assert (R.decode([obj["segmentation"]])[0] == (big | small)).all()


def test_equal_areas_later_annotation_wins_and_crowd_is_void(tmp_path, image):
    shifted = [[10, 2, 38, 2, 38, 20, 10, 20]]   # BIG moved right: the same area
    crowd = [[0, 22, 40, 22, 40, 30, 0, 30]]     # below both parts
    crowd_over = [[0, 15, 8, 15, 8, 28, 0, 28]]  # over BIG's lower left corner
    anns = [_ann(1, 7, BIG), _ann(2, 3, shifted), _ann(3, 3, crowd, iscrowd=1), _ann(4, 7, crowd_over, iscrowd=1)]
    pack([image], coco=_coco(tmp_path, anns), coco_as="parts", output=Output(str(tmp_path / "o")))
    _, _, lab = _one(tmp_path / "o")
    big, sh, cr = _raster(BIG), _raster(shifted), _raster(crowd) | _raster(crowd_over)
    assert big.sum() == sh.sum()
    assert (lab == 1).sum() == sh.sum() and (lab == 2).sum() == (big & ~sh).sum()  # later (wheel) wins the tie
    assert ((lab == 255) == (cr & ~big & ~sh)).all()   # crowd: void where no part covers it
    assert lab[big].min() > 0 and lab[big].max() < 255  # parts are never voided by a crowd region


def test_coco_objects_file_gives_the_object_masks(tmp_path, image):
    parts = _coco(tmp_path, [_ann(1, 7, BIG), _ann(2, 3, SMALL)])
    whole = [[1, 1, 39, 1, 39, 29, 1, 29]]
    objs = _coco(tmp_path, [_ann(9, 1, whole)], categories=[{"id": 1, "name": "car"}], name="objects.json")
    pack([image], coco=parts, coco_as="parts", coco_objects=objs, output=Output(str(tmp_path / "o")))
    s, meta, lab = _one(tmp_path / "o")
    (obj,) = decode_json(s, "gt_objects.json")["objects"]
    assert obj["id"] == 9 and obj["category"] == "car" and obj["area"] == _raster(whole).sum()
    assert set(np.unique(lab)) == {0, 1, 2}


def test_objects_is_still_the_default(tmp_path, image):
    pack([image], coco=_coco(tmp_path, [_ann(1, 7, BIG), _ann(2, 3, SMALL)]), output=Output(str(tmp_path / "o")))
    (s,) = read_shard(tmp_path / "o" / "000000.tar")
    assert "gt_parts.png" not in s and "part_names" not in decode_json(s)
    assert [o["category"] for o in decode_json(s, "gt_objects.json")["objects"]] == ["body", "wheel"]


def _cli(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("partkit: error:") and "Traceback" not in res.stderr, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_errors_are_one_line(tmp_path, image):
    out = tmp_path / "o"
    _one_line_error(_cli(["pack", image, "--coco-as", "parts", "-o", out]), "--coco-as parts needs --coco")
    coco = _coco(tmp_path, [_ann(1, 7, BIG), _ann(5, 42, SMALL)])
    _one_line_error(_cli(["pack", image, "--coco", coco, "--coco-as", "parts", "-o", out]),
                    "annotation 5", "category_id 42", "'categories' does not list")
    _one_line_error(_cli(["pack", image, "--coco", coco, "--coco-as", "part", "-o", out]), "objects, parts")
    _one_line_error(_cli(["pack", image, "--coco", coco, "--coco-objects", coco, "-o", out]), "--coco-as parts")
    assert not (out / "000000.tar").exists()
    with pytest.raises(PartkitError, match="gt_parts.png"):
        pack([image], labels=str(tmp_path), coco=coco, coco_as="parts", output=Output(str(out)))


@pytest.mark.skipif(not (CARPARTS / "annotations.json").is_file(), reason="needs ../shared/data/carparts")
def test_real_carparts_three_images(tmp_path):
    names = ["train1.jpg", "train10.jpg", "train100.jpg"]
    coco_path = CARPARTS / "annotations.json"
    pack([str(CARPARTS / "images" / n) for n in names], coco=str(coco_path), coco_as="parts", category="car",
         output=Output(str(tmp_path / "o")))
    coco = json.loads(coco_path.read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    used = sorted({a["category_id"] for a in coco["annotations"]})
    assert len(used) == 18 and 1 not in used  # _background_ (id 1) has no instances: ids 1..18 = cats 2..19
    expect_names = {str(i + 1): cats[c] for i, c in enumerate(used)}
    samples = read_shard(tmp_path / "o" / "000000.tar")
    assert [s["__key__"] for s in samples] == ["train1", "train10", "train100"]
    img_ids = {im["file_name"]: im["id"] for im in coco["images"]}
    overlapping = 0
    for s, name in zip(samples, names):
        meta, lab = decode_json(s), decode_label_map(s, "gt_parts.png")
        assert meta["part_names"] == expect_names and expect_names["18"] == "wheel"
        anns = [a for a in coco["annotations"] if a["image_id"] == img_ids[name]]
        masks = [_raster(a["segmentation"], 512, 512) for a in anns]
        # the rule, written out: paint largest first, so each pixel gets its smallest covering part
        want = np.zeros((512, 512), np.uint8)
        for i in sorted(range(len(anns)), key=lambda i: (-masks[i].sum(), i)):
            want[masks[i]] = used.index(anns[i]["category_id"]) + 1
        np.testing.assert_array_equal(lab, want)
        for i, (a, m) in enumerate(zip(anns, masks)):  # per part: its polygon minus what smaller parts take
            smaller = [masks[j] for j in range(len(anns)) if j != i and
                       (masks[j].sum(), -j) < (m.sum(), -i)]
            taken = np.any(smaller, axis=0) if smaller else np.zeros_like(m)
            overlapping += int((m & taken).sum() > 0)
            assert ((lab == used.index(a["category_id"]) + 1) & m).sum() == (m & ~taken).sum()
        union = np.any(masks, axis=0)
        (obj,) = decode_json(s, "gt_objects.json")["objects"]
        assert obj["area"] == union.sum() and ((lab > 0) == union).all()
    assert overlapping > 0  # the real polygons do overlap
