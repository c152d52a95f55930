"""partkit export coco: COCO results + ground truth that pycocotools reads and scores as eval mask-ap does."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from partkit.cli.main import app
from partkit.io import encode_json, encode_png


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _samples(with_category=False, n=3):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        gt = np.zeros((24, 32), np.uint8)
        for part in (1, 2, 3):
            y, x = rng.integers(0, 18), rng.integers(0, 26)
            gt[y:y + rng.integers(4, 10), x:x + rng.integers(4, 12)] = part
        gt[0, :] = 255  # void: a crowd region
        props = []
        for part in [p for p in np.unique(gt) if p not in (0, 255)]:
            for shift in (0, 2, 5):
                p = {"segmentation": _rle(np.roll(gt == part, shift, axis=1)), "score": float(rng.random())}
                if with_category:
                    p["category_id"] = int(part) if shift < 5 else int(part % 3 + 1)
                props.append(p)
        noise = {"segmentation": _rle(rng.random((24, 32)) < 0.2), "score": 0.5}
        props.append(dict(noise, category_id=1) if with_category else noise)
        out.append({"__key__": f"img{i}", "gt_parts.png": encode_png(gt), "proposals.json": encode_json(props)})
    return out


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _cocoeval(gt_path, res_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ev = COCOeval(coco, coco.loadRes(str(res_path)), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return coco, ev


@pytest.mark.parametrize("with_category", [False, True])
def test_export_coco_matches_eval_mask_ap(shard_factory, tmp_path, with_category):
    shard = shard_factory(_samples(with_category))
    res, gt = tmp_path / "results.json", tmp_path / "gt.json"
    r = _cli("export", "coco", shard, "--pred", "proposals.json", "-o", res, "--gt-out", gt)
    assert r.exit_code == 0, r.output
    results = json.loads(res.read_text())
    assert len(results) == 3 * 10 and all(isinstance(d["segmentation"]["counts"], str) for d in results)
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "score"}
    coco, ev = _cocoeval(gt, res)
    assert [img["file_name"] for img in coco.dataset["images"]] == ["img0", "img1", "img2"]
    assert all((img["height"], img["width"]) == (24, 32) for img in coco.dataset["images"])
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    if with_category:
        assert sorted(c["id"] for c in coco.dataset["categories"]) == [1, 2, 3]
        assert len(crowd) == 3 * 3  # the void region once per category of its image
    else:
        assert coco.dataset["categories"] == [{"id": 1, "name": "part"}]
        assert {d["category_id"] for d in results} == {1} and len(crowd) == 3
    e = _cli("eval", "mask-ap", shard)
    assert e.exit_code == 0, e.output
    ap = json.loads(e.stdout[e.stdout.index("{"):])["metrics"]["mask-ap"]
    assert ap["class_agnostic"] is (not with_category)
    assert [ap["value"], ap["ap50"], ap["ap75"]] == pytest.approx([100 * s for s in ev.stats[:3]], abs=1e-9)
    assert ev.stats[0] > 0


def test_export_coco_without_gt_out_and_ranked_field(shard_factory, tmp_path):
    samples = _samples()
    for s in samples:  # ranked.json: {"proposals": [...]} as rank apply writes it
        s["ranked.json"] = encode_json({"proposals": json.loads(s.pop("proposals.json"))})
    shard = shard_factory(samples)
    res = tmp_path / "r.json"
    r = _cli("export", "coco", shard, "--pred", "ranked.json", "-o", res)
    assert r.exit_code == 0, r.output
    assert len(json.loads(res.read_text())) == 30
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_export_coco_errors(shard_factory, tmp_path):
    shard = shard_factory(_samples(n=1))
    r = _cli("export", "coco", shard, "--pred", "ranked.json", "-o", tmp_path / "r.json")
    assert r.exit_code == 2 and "partkit: error:" in r.output and "ranked.json" in r.output
    assert "partkit rank apply" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    folder = tmp_path / "out"
    folder.mkdir()
    r = _cli("export", "coco", shard, "-o", folder)
    assert r.exit_code == 2 and "is a folder" in r.output and r.output.startswith("partkit: error:")
    r = _cli("export", "coco", shard, "-o", tmp_path / "r.json", "--gt-out", folder)
    assert r.exit_code == 2 and "--gt-out" in r.output and "is a folder" in r.output
    r = _cli("export", "coco", shard, "-o", tmp_path / "r.json", "--gt", "boxes")
    assert r.exit_code == 2 and "--gt must be one of parts, objects" in r.output
    r = _cli("export", "coco", shard, "-o", tmp_path / "same.json", "--gt-out", tmp_path / "same.json")
    assert r.exit_code == 2 and "two different paths" in r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == []
