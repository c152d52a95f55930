"""partkit pack: real images and labels, COCO instances, bad files."""
import json

import pytest
from PIL import Image

from partkit.errors import BadSample, PartkitError, SkipBad
from partkit.io import Output, decode_json, decode_label_map
from partkit.io.tario import sample_key
from partkit.pack import pack
from conftest import read_shard


def test_pack_cihp_images_and_labels(tmp_path, cihp_dir):
    out = tmp_path / "packed"
    pack([str(cihp_dir / "images")], labels=str(cihp_dir / "labels"), provenance="CIHP", output=Output(str(out)))
    samples = read_shard(out / "000000.tar")
    assert [s["__key__"] for s in samples] == sorted(p.stem for p in (cihp_dir / "images").glob("*.jpg"))
    for s in samples:
        meta = decode_json(s)
        labels = decode_label_map(s, "gt_parts.png")
        assert labels.shape == (meta["height"], meta["width"]) and labels.max() <= 19
        assert s["jpg"] == (cihp_dir / "images" / f"{s['__key__']}.jpg").read_bytes()
        assert meta["provenance"] == "CIHP"


def test_keys_are_dot_free_and_unique(tmp_path):
    assert sample_key("a/b/img.v2.final.jpg") == "img_v2_final"
    for name in ("x.jpg", "x.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(PartkitError, match="same key 'x'"):
        pack([str(tmp_path)], output=Output(str(tmp_path / "o")))


def test_mismatched_label_names_the_file(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "im" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "im" / "b.png")
    Image.new("L", (9, 8)).save(tmp_path / "lab" / "a.png")
    with pytest.raises(BadSample, match=r"lab/a.png is 9x8 but the image is 8x8"):
        pack([str(tmp_path / "im")], labels=str(tmp_path / "lab"), output=Output(str(tmp_path / "o1")))
    summary = pack([str(tmp_path / "im")], labels=str(tmp_path / "lab"), handler=SkipBad(),
                   output=Output(str(tmp_path / "o2")))
    stats = json.loads((tmp_path / "o2" / "000000.stats.json").read_text())
    assert summary["skipped"] == 2 and stats["skipped"] == 2  # a: size mismatch, b: no label map
    assert any("no label map" in s["reason"] for s in stats["skipped_samples"])


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(BadSample, match="bad.jpg is not a readable image"):
        pack([str(tmp_path)], output=Output(str(tmp_path / "o")))


def test_coco_polygons_become_rle_instances_with_keypoints(tmp_path):
    from pycocotools import mask as mask_utils

    Image.new("RGB", (40, 30)).save(tmp_path / "img1.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "img1.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "bird", "keypoints": ["beak", "tail"]}],
        "annotations": [{"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[5, 5, 25, 5, 25, 20, 5, 20]],
                         "keypoints": [10, 10, 2, 20, 15, 1]}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    pack([str(tmp_path / "img1.jpg")], coco=str(tmp_path / "coco.json"), output=Output(str(tmp_path / "o")))
    (s,) = read_shard(tmp_path / "o" / "000000.tar")
    obj = decode_json(s, "gt_objects.json")["objects"][0]
    m = mask_utils.decode({"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()})
    assert obj["category"] == "bird" and m.shape == (30, 40) and m[10, 10] == 1 and m[25, 30] == 0
    assert 250 <= obj["area"] <= 360
    kp = decode_json(s, "gt_kpts.json")
    assert kp["names"] == ["beak", "tail"] and kp["keypoints"][0][1] == [20.0, 15.0, 1]
