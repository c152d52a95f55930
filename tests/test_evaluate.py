"""partkit.evaluate and `partkit eval`: shards in, metrics out, checked against references."""
import contextlib
import io
import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn import metrics as skm
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import ROOT
from partkit.errors import BadSample, PartkitError
from partkit.evaluate import EvalOptions, SampleView, evaluate
from partkit.grid import grid_to_image
from partkit.io import encode_json, encode_png

runner = CliRunner()


def _jpg(h, w, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _sample(key, gt=None, pred=None, category=None, **fields):
    s = {"__key__": key}
    if gt is not None:
        s["gt_parts.png"] = encode_png(np.asarray(gt))
    if pred is not None:
        s["parts.png"] = encode_png(np.asarray(pred))
    if category is not None:
        s["json"] = encode_json({"category": category})
    for name, value in fields.items():
        s[name.replace("__", ".")] = value if isinstance(value, (bytes, np.ndarray)) else encode_json(value)
    return s


def _random_pairs(seed, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(10, 30, 2)
        gt = rng.integers(0, 6, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.05] = 255  # void
        pred = np.where(rng.random((h, w)) < 0.7, gt % 4, rng.integers(0, 5, (h, w))).astype(np.uint8)
        out.append((f"s{i}", gt, pred))
    return out


@pytest.mark.parametrize("region", ["fg", "full"])
def test_nmi_ari_pooled_over_pixels_match_sklearn(shard_factory, region):
    pairs = _random_pairs(0)
    shard = shard_factory([_sample(k, g, p) for k, g, p in pairs])
    report = evaluate([shard], ["nmi", "ari"], region=region)
    keep = [(g != 255) & ((g != 0) if region == "fg" else True) for _, g, _ in pairs]
    true = np.concatenate([g[m] for (_, g, _), m in zip(pairs, keep)])
    pred = np.concatenate([p[m] for (_, _, p), m in zip(pairs, keep)])
    r = report["metrics"]
    assert r["nmi"]["value"] == pytest.approx(100 * skm.normalized_mutual_info_score(true, pred), abs=1e-9)
    assert r["ari"]["value"] == pytest.approx(100 * skm.adjusted_rand_score(true, pred), abs=1e-9)
    assert r["nmi"]["pairs"] == true.size and r["nmi"]["region"] == region and report["samples"] == 3


def test_uint16_label_maps_use_65535_as_void(shard_factory):
    gt = np.array([[0, 300, 300, 7, 65535, 7]], np.uint16)
    pred = np.array([[0, 1, 1, 2, 2, 1]], np.uint8)
    r = evaluate([shard_factory([_sample("u", gt, pred)])], ["nmi", "miou"], region="full", miou="pooled")["metrics"]
    assert r["nmi"]["pairs"] == 5
    assert r["nmi"]["value"] == pytest.approx(100 * skm.normalized_mutual_info_score([0, 300, 300, 7, 7],
                                                                                     [0, 1, 1, 2, 1]))
    assert set(r["miou"]["iou"]) == {"0", "7", "300"}


def test_prediction_resampling_rules(shard_factory):
    pred_grid = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gt = np.zeros((6, 8), np.uint8)
    geometry = {"resolution": "grid", "grid": [3, 4], "stride": 2, "image_size": [6, 8], "resized": [6, 8]}
    o = EvalOptions()
    with_geometry = SampleView(_sample("a", gt, pred_grid, parts__json=geometry), o)
    assert (with_geometry.pred == np.kron(pred_grid, np.ones((2, 2), np.uint8))).all()
    assert (with_geometry.pred == grid_to_image(pred_grid, geometry, 6, 8)).all()
    no_geometry = SampleView(_sample("b", gt, pred_grid, parts__json={"resolution": "grid"}), o)
    assert (no_geometry.pred == np.kron(pred_grid, np.ones((2, 2), np.uint8))).all()
    with pytest.raises(BadSample, match=r"'parts.png' is 4x3 but the image is 8x6"):
        SampleView(_sample("c", gt, pred_grid), o).pred
    shard = shard_factory([_sample("ok", gt, np.kron(pred_grid, np.ones((2, 2)))), _sample("bad", gt, pred_grid)])
    with pytest.raises(BadSample, match="sample 'bad'"):
        evaluate([shard], ["nmi"], region="full")
    report = evaluate([shard], ["nmi"], region="full", skip_bad=True)
    assert report["samples"] == 1 and report["skipped"][0]["key"] == "bad"


def test_keypoint_protocol_samples_prediction_at_visible_keypoints(shard_factory):
    pred = np.zeros((10, 10), np.uint8)
    pred[:, 5:] = 2
    pred[5:, :5] = 1
    kpts = {"names": ["beak", "tail", "eye"],
            "keypoints": [[[1.5, 1.2, 2], [7.9, 3.0, 2], [2.0, 8.0, 1]],
                          [[9.99, 9.99, 2], [0.0, 9.0, 0], [6.0, 6.0, 2]]]}
    shard = shard_factory([_sample("k", pred=pred, gt_kpts__json=kpts, json={"width": 10, "height": 10})])
    report = evaluate([shard], ["nmi", "ari"], at="keypoints")
    true = [0, 1, 2, 0, 2]   # keypoint index of each keypoint with v >= 1
    sampled = [0, 2, 1, 2, 2]  # pred[floor(y), floor(x)]
    assert report["metrics"]["nmi"]["value"] == pytest.approx(100 * skm.normalized_mutual_info_score(true, sampled))
    assert report["metrics"]["ari"]["value"] == pytest.approx(100 * skm.adjusted_rand_score(true, sampled))
    assert report["metrics"]["nmi"]["pairs"] == 5
    assert evaluate([shard], ["nmi"], at="keypoints", kpt_min_visibility=2)["metrics"]["nmi"]["pairs"] == 4
    bad = shard_factory([_sample("k", pred=pred, gt_kpts__json={"keypoints": [[[12, 3, 2]]]},
                                 json={"width": 10, "height": 10})])
    with pytest.raises(BadSample, match=r"keypoint 0 at \(12, 3\) lies outside the 10x10 image"):
        evaluate([bad], ["nmi"], at="keypoints")


def _class_samples():
    # cat: clusters 3, 4 are parts 1, 2 exactly.  dog: cluster 5 -> part 1; cluster 6 ties parts 1 and 3
    # (1 pixel each) -> part 1 (lowest id); cluster 7 -> part 2.
    return [_sample("a", [[1, 1, 2, 2]], [[3, 3, 4, 4]], category="cat"),
            _sample("b", [[1, 1, 1, 3, 2, 2]], [[5, 5, 6, 6, 7, 7]], category="dog")]


def test_miou_per_class_by_hand(shard_factory):
    r = evaluate([shard_factory(_class_samples())], ["miou"], miou="pooled")["metrics"]["miou"]
    # dog: part 1 I=3 U=4, part 3 I=0, part 2 I=2 U=2 -> (3/4 + 0 + 1) / 3
    assert r["per_class"]["cat"]["miou"] == pytest.approx(100.0)
    assert r["per_class"]["dog"]["miou"] == pytest.approx(100 * 7 / 12, abs=1e-4)
    assert r["c_miou"] == pytest.approx(100 * (1 + 7 / 12) / 2, abs=1e-4)
    assert r["a_miou"] == pytest.approx(100 * (1 + 1 + 3 / 4 + 0 + 1) / 5, abs=1e-4)
    # pooled, one matching: part 1 I=5, true 5, predicted (clusters 3, 5, 6) 6; part 2 exact; part 3 missed
    assert r["value"] == pytest.approx(100 * (5 / 6 + 1 + 0) / 3, abs=1e-4)
    assert r["mapping"] == {"3": 1, "4": 2, "5": 1, "6": 1, "7": 2}


def test_miou_matching_variants(shard_factory):
    gt = np.array([[0, 1, 1, 1, 2, 2]], np.uint8)
    pred = np.array([[1, 1, 1, 2, 3, 3]], np.uint8)
    shard = shard_factory([_sample("a", gt, pred)])
    fg = evaluate([shard], ["miou"], miou="pooled")["metrics"]["miou"]
    # fg: cluster 1 -> part 1 (2 of its fg pixels), 2 -> 1, 3 -> 2: part 1 I=3 U=3, part 2 exact
    assert fg["value"] == 100.0 and fg["region"] == "fg"
    hungarian = evaluate([shard], ["miou"], match="hungarian", miou="pooled")["metrics"]["miou"]
    # one-to-one: cluster 1 -> part 1 (2 px), 3 -> part 2; cluster 2 unmatched: part 1 I=2 U=3
    assert hungarian["value"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-4)
    full = evaluate([shard], ["miou"], region="full", miou="pooled")["metrics"]["miou"]
    # full: background is a part; cluster 1 -> part 1 (2 vs 1): background I=0 -> IoU 0
    assert full["iou"]["0"] == 0.0 and len(full["iou"]) == 3
    # fitted on another split where the clusters meant the opposite parts
    other = shard_factory([_sample("f", [[2, 2, 1, 1]], [[1, 2, 3, 3]])])
    fitted = evaluate([shard], ["miou"], match_on=[other], miou="pooled")["metrics"]["miou"]
    assert fitted["fitted_on"] == "match-on shards" and fitted["value"] == 0.0
    with pytest.raises(PartkitError, match="--match-on only applies to miou"):
        evaluate([shard], ["nmi"], match_on=[other])


def test_empty_predictions_give_honest_zeros(shard_factory):
    gt = np.array([[0, 1, 1, 2, 2]], np.uint8)
    r = evaluate([shard_factory([_sample("a", gt, np.zeros_like(gt))])], ["nmi", "ari", "miou"])["metrics"]
    assert r["nmi"]["value"] == 0.0 and r["ari"]["value"] == 0.0 and r["miou"]["value"] == 0.0
    assert r["nmi"]["pred_background_in_fg"] == 100.0
    with pytest.raises(PartkitError, match="no ground-truth foreground pixels.*--region full"):
        evaluate([shard_factory([_sample("b", np.zeros_like(gt), gt)])], ["nmi"])


def test_clear_errors(shard_factory, tmp_path):
    gt = np.array([[0, 1]], np.uint8)
    with pytest.raises(BadSample, match=r"has no 'gt_parts.png' field; run `partkit pack --labels DIR` first"):
        evaluate([shard_factory([_sample("a", pred=gt)])], ["nmi"])
    with pytest.raises(BadSample, match=r"has no 'parts.png' field; run `partkit cluster` first"):
        evaluate([shard_factory([_sample("a", gt=gt)])], ["miou"])
    with pytest.raises(PartkitError, match="unknown metric 'nmii'; choose from nmi, ari"):
        evaluate(["x.tar"], ["nmii"])
    with pytest.raises(PartkitError, match="--region must be one of fg, full"):
        evaluate(["x.tar"], ["nmi"], region="all")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(PartkitError, match="no samples in the input"):
        evaluate([str(empty)], ["nmi"])


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _blobs(rng, h, w, n):
    gt = np.zeros((h, w), np.uint8)
    for part in range(1, n + 1):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        gt[y:y + rng.integers(4, 10), x:x + rng.integers(4, 12)] = part
    return gt


def test_ar_and_mask_ap_match_cocoeval(shard_factory, tmp_path):
    rng = np.random.default_rng(0)
    samples, images, anns, dets = [], [], [], []
    for i in range(4):
        gt = _blobs(rng, 24, 32, 3)
        gt[0, :] = 255  # a void row: a crowd region for COCOeval
        props = []
        for part in [p for p in np.unique(gt) if p not in (0, 255)]:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": _rle(gt == part), "area": float((gt == part).sum()),
                         "bbox": mask_utils.toBbox(_rle(gt == part)).tolist()})
            for shift in (0, 2, 5):
                props.append({"segmentation": _rle(np.roll(gt == part, shift, axis=1)), "score": float(rng.random())})
        props.append({"segmentation": _rle(rng.random((24, 32)) < 0.2), "score": 0.5})
        void = gt == 255
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                     "segmentation": _rle(void), "area": float(void.sum()), "bbox": mask_utils.toBbox(_rle(void)).tolist()})
        images.append({"id": i + 1, "height": 24, "width": 32})
        dets.extend(dict(p, image_id=i + 1, category_id=1) for p in props)
        samples.append(_sample(f"m{i}", gt, proposals__json=props))
    shard = shard_factory(samples)
    r = evaluate([shard], ["ar", "mask-ap"], ks=(1, 10, 100))["metrics"]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "part"}]}))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [r["mask-ap"]["value"], r["mask-ap"]["ap50"], r["mask-ap"]["ap75"]] == \
        pytest.approx([100 * s for s in ev.stats[:3]], abs=1e-3)
    assert r["mask-ap"]["class_agnostic"] is True
    # AR pools matched / all real masks, like COCOeval's class-agnostic AR at maxDets (no crowd matching
    # needed: void pixels belong to no part mask)
    assert [r["ar"]["ar@1"], r["ar"]["ar@10"], r["ar"]["ar@100"]] == \
        pytest.approx([100 * s for s in ev.stats[6:9]], abs=1e-3)
    assert r["ar"]["value"] == r["ar"]["ar@100"] and r["ar"]["gt_masks"] == sum(not a["iscrowd"] for a in anns)


def test_ar_on_gt_objects_and_bad_proposals(shard_factory):
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    objects = {"objects": [{"id": 1, "category_id": 3, "segmentation": _rle(m), "iscrowd": 0},
                           {"id": 2, "category_id": 3, "segmentation": _rle(~m), "iscrowd": 1}]}
    props = [{"segmentation": _rle(m), "score": 0.9}]
    shard = shard_factory([_sample("o", proposals__json=props, gt_objects__json=objects, json={"width": 8, "height": 8})])
    r = evaluate([shard], ["ar"], gt="objects", ks=(1,))["metrics"]["ar"]
    assert r["ar@1"] == 100.0 and r["gt_masks"] == 1  # the crowd object is no mask to recall
    wrong = shard_factory([_sample("w", np.zeros((4, 4), np.uint8), proposals__json=props)])
    with pytest.raises(BadSample, match="a mask in 'proposals.json' is 8x8 but the image is 4x4"):
        evaluate([wrong], ["ar"])
    no_score = shard_factory([_sample("n", m.astype(np.uint8), proposals__json=[{"segmentation": _rle(m)}])])
    with pytest.raises(BadSample, match="proposal 0 in 'proposals.json' needs a numeric 'score'"):
        evaluate([no_score], ["ar"])


def test_retrieval_matches_sklearn(shard_factory):
    rng = np.random.default_rng(0)
    names = ["head", "wing", "tail"]
    samples, ref_feats, ref_names = [], [], []
    meta = {"grid": [4, 4], "stride": 4, "image_size": [16, 16], "resized": [16, 16]}
    for i in range(4):
        feat = rng.normal(size=(6, 4, 4)).astype(np.float16)
        kp = [[float(rng.uniform(0, 16)), float(rng.uniform(0, 16)), int(v)] for v in rng.integers(1, 3, 3)]
        kp[2][2] = 0 if i == 0 else 2  # one invisible keypoint
        samples.append(_sample(f"r{i}", feat__npy=feat, feat__json=meta, json={"width": 16, "height": 16},
                               gt_kpts__json={"keypoints": [kp], "names": names}))
        for k, (x, y, v) in enumerate(kp):
            if v > 0:
                r, c = int(y) // 4, int(x) // 4
                ref_feats.append(feat[:, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].astype(np.float32).mean((1, 2)))
                ref_names.append(names[k])
    shard = shard_factory(samples)
    for exclude in (False, True):
        r = evaluate([shard], ["retrieval"], exclude_self=exclude)["metrics"]["retrieval"]
        x = np.stack(ref_feats)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims, labels = x @ x.T, np.array(ref_names)
        aps = []
        for q in range(len(labels)):
            keep = np.arange(len(labels)) != q if exclude else np.ones(len(labels), bool)
            aps.append(skm.average_precision_score(labels[keep] == labels[q], sims[q, keep]))
        assert r["queries"] == 11 and r["exclude_self"] is exclude
        assert r["value"] == pytest.approx(100 * np.mean(aps), abs=1e-3)
        per_part = [np.mean([a for a, n in zip(aps, labels) if n == name]) for name in names]
        assert r["map"] == pytest.approx(100 * np.mean(per_part), abs=1e-3)


def test_miou_3d_by_hand(shard_factory):
    def shape(key, gt, pred, cat):
        return _sample(key, category=cat, gt_parts__npy=np.array(gt), pred_parts__npy=np.array(pred))

    shards = shard_factory([shape("a", [6, 6, 7, 7], [6, 6, 6, 7], "cap"),   # IoUs 2/3, 1/2
                            shape("b", [6, 6, 6, 6], [6, 6, 6, 6], "cap"),   # 1, and part 7 absent from both: 1
                            shape("c", [1, 1, 2], [1, 2, 2], "mug")])       # 1/2, 1/2
    r = evaluate([shards], ["miou-3d"], match="none")["metrics"]["miou-3d"]
    assert r["per_class"]["cap"] == pytest.approx(100 * (7 / 12 + 1) / 2, abs=1e-4)
    assert r["value"] == pytest.approx(100 * (7 / 12 + 1 + 1 / 2) / 3, abs=1e-4)
    assert r["class_miou"] == pytest.approx(100 * ((7 / 12 + 1) / 2 + 1 / 2) / 2, abs=1e-4)
    assert r["parts"] == {"cap": [6, 7], "mug": [1, 2]}
    given = evaluate([shards], ["miou-3d"], match="none", category_parts={"cap": [6, 7, 8], "mug": [1, 2]})
    assert given["metrics"]["miou-3d"]["per_class"]["cap"] == pytest.approx(100 * ((2 / 3 + 1 / 2 + 1) / 3 + 1) / 2,
                                                                             abs=1e-4)
    bad = shard_factory([shape("d", [1, 2], [1, 2, 2], "mug")])
    with pytest.raises(BadSample, match="'pred_parts.npy' has 3 points but 'gt_parts.npy' 2"):
        evaluate([bad], ["miou-3d"])


def test_miou_3d_on_shapenet_caps(shard_factory):
    from conftest import SHAPENET

    data = np.load(SHAPENET / "cap_val.npz")
    samples = []
    for i in range(len(data["offsets"]) - 1):
        part = data["part"][data["offsets"][i]:data["offsets"][i + 1]]
        discovered = np.where(part == 6, 1, 0)  # perfect, but with discovered ids 1 and 0
        samples.append(_sample(f"cap{i}", category="Cap", gt_parts__npy=part, pred_parts__npy=discovered))
    shard = shard_factory(samples)
    for match in ("majority", "hungarian"):
        r = evaluate([shard], ["miou-3d"], match=match)["metrics"]["miou-3d"]
        assert r["value"] == 100.0 and r["shapes"] == 5 and r["parts"] == {"Cap": [6, 7]}
    assert evaluate([shard], ["miou-3d"], match="none")["metrics"]["miou-3d"]["value"] == 0.0


def _probe_samples(n, seed=0, categories=None):
    rng = np.random.default_rng(seed)
    meta = {"grid": [4, 4], "stride": 4, "image_size": [16, 16], "resized": [16, 16]}
    out = []
    for i in range(n):
        cells = rng.integers(0, 3, (4, 4))
        gt = np.kron(cells, np.ones((4, 4), np.int64)).astype(np.uint8)
        feat = (np.eye(3)[cells].transpose(2, 0, 1) * 3 + 0.1 * rng.normal(size=(3, 4, 4))).astype(np.float16)
        if categories:
            feat += np.float16(categories[i] == "b")
        out.append(_sample(f"p{i}", gt, feat__npy=feat, feat__json=meta,
                           category=categories[i] if categories else None))
    return out


def test_linear_probes_read_part_labels_from_features(shard_factory):
    shard = shard_factory(_probe_samples(5))
    r = evaluate([shard], ["probe"], probe_train=3, region="full")["metrics"]["probe"]
    assert r["value"] == 100.0 and r["cls_accuracy"] == 100.0 and r["cls_balanced_accuracy"] == 100.0
    assert r["train_images"] == 3 and r["test_images"] == 2 and r["cls_items"] == 32
    assert set(r["seg_iou"]) == {"0", "1", "2"}
    fg = evaluate([shard], ["probe"], probe_train=3)["metrics"]["probe"]
    assert set(fg["seg_iou"]) == {"1", "2"}
    with pytest.raises(PartkitError, match="probe trains on the first 5 images and scores the rest, but the input has 5"):
        evaluate([shard], ["probe"], probe_train=5)
    cats = ["a", "b", "a", "b", "a", "b"]
    r = evaluate([shard_factory(_probe_samples(6, categories=cats))], ["probe"], probe_train=4,
                 probe_target="category")["metrics"]["probe"]
    assert r["cls_items"] == 2 and r["cls_accuracy"] == 100.0


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_prints_table_to_stderr_and_json_to_stdout(shard_factory, tmp_path):
    shard = shard_factory([_sample(k, g, p) for k, g, p in _random_pairs(1)])
    result = runner.invoke(app, ["eval", "nmi", "ari", "miou", shard, "--region", "full"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["metrics"]) == ["nmi", "ari", "miou"] and report["options"]["region"] == "full"
    assert "nmi" in result.stderr and "miou" in result.stderr and "{" not in result.stderr
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "ari", shard, "--json", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())["metrics"]["ari"]["region"] == "fg"
    with open(shard, "rb") as f:  # stdin by default
        result = runner.invoke(app, ["-q", "eval", "ari"], input=f.read())
    assert result.exit_code == 0 and json.loads(result.stdout)["samples"] == 3 and result.stderr == ""


@pytest.mark.parametrize("args,message", [
    (["nmii", "x.tar"], "unknown metric 'nmii'"),
    (["nmi", "x.tar", "ari"], "metric 'ari' comes after the input 'x.tar'"),
    (["nmi", "arii"], "unknown metric 'arii' and no such file"),
    (["nmi", "--match", "best"], "--match must be one of majority, hungarian, none"),
    (["nmi", "--ks", "1,x"], "--ks must be comma-separated integers"),
])
def test_cli_errors_are_one_line(args, message):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _corrupt(labels, rng):
    pred = (labels % 5 + 1).astype(np.uint8)
    pred[labels == 0] = 0
    noise = (rng.random(labels.shape) < 0.1) & (labels > 0)
    pred[noise] = rng.integers(1, 6, noise.sum())
    return pred


def test_cli_on_real_cihp_labels(shard_factory, cihp_dir):
    rng = np.random.default_rng(0)
    samples, trues, preds = [], [], []
    for path in sorted((cihp_dir / "labels").glob("*.png")):
        labels = np.array(Image.open(path))
        pred = _corrupt(labels, rng)
        samples.append(_sample(path.stem, labels, pred, jpg=(cihp_dir / "images" / f"{path.stem}.jpg").read_bytes(),
                               parts__json={"resolution": "image"}))
        trues.append(labels[labels > 0]), preds.append(pred[labels > 0])
    result = runner.invoke(app, ["eval", "nmi", "ari", "miou", shard_factory(samples)])
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["metrics"]
    true, pred = np.concatenate(trues), np.concatenate(preds)
    assert r["nmi"]["value"] == pytest.approx(100 * skm.normalized_mutual_info_score(true, pred), abs=1e-9)
    assert r["ari"]["value"] == pytest.approx(100 * skm.adjusted_rand_score(true, pred), abs=1e-9)
    assert 0 < r["miou"]["value"] < 100 and len(r["miou"]["iou"]) == 17


@pytest.mark.skipif(not (ROOT / "commands" / "cluster.py").exists(), reason="`partkit cluster` is not built yet")
def test_pipeline_pack_extract_cluster_eval(cihp_dir):
    images = " ".join(str(p) for p in sorted((cihp_dir / "images").glob("*.jpg"))[:2])
    cmd = (f"partkit pack {images} --labels {cihp_dir / 'labels'} | partkit extract --size 128 "
           f"| partkit cluster - --scope object --fg-from gt_parts -k 4 | partkit eval nmi ari miou")
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout)["metrics"]
    assert r["nmi"]["region"] == "fg" and 0 < r["nmi"]["value"] < 100 and r["nmi"]["pred_labels"] >= 4
    assert r["miou"]["value"] > 0 and "nmi" in result.stderr


# ------------------------------------------------------------------------------------ metric registry


def test_registry_lists_exactly_the_builtin_metrics():
    from dataclasses import fields

    from partkit.evaluate import METRICS, get_metric, list_metrics

    assert list_metrics() == list(METRICS) == ["nmi", "ari", "miou", "ar", "mask-ap", "retrieval", "miou-3d", "probe",
                                               "part-cls", "linear-seg", "kpt-regression"]
    families = {name: get_metric(name).family for name in METRICS}
    assert families == {"nmi": "pixels", "ari": "pixels", "miou": "pixels", "ar": "masks", "mask-ap": "masks",
                        "retrieval": "retrieval", "miou-3d": "shapes", "probe": "probe", "part-cls": "probe",
                        "linear-seg": "probe", "kpt-regression": "keypoints"}
    known = {f.name for f in fields(EvalOptions)}
    for name in METRICS:  # every option a metric declares is an EvalOptions field
        assert set(get_metric(name).options) <= known, name


def test_unknown_metric_errors_list_the_registry():
    from partkit.evaluate import list_metrics

    names = ", ".join(list_metrics())
    with pytest.raises(PartkitError, match=f"unknown metric 'nmii'; choose from {names}$"):
        evaluate(["x.tar"], ["nmii"])
    result = runner.invoke(app, ["eval", "nmii", "x.tar"])
    assert result.exit_code == 2 and f"choose from {names} (metric names come first)" in result.stderr


def test_a_registered_metric_is_scored_and_summarised(shard_factory, monkeypatch):
    from partkit.evaluate import _registry, list_metrics, register_accumulator, register_metric

    shard = shard_factory([_sample(k, g, p) for k, g, p in _random_pairs(2)])
    with monkeypatch.context() as m:
        m.setattr(_registry, "_METRICS", dict(_registry._METRICS))
        m.setattr(_registry, "_ACCUMULATORS", dict(_registry._ACCUMULATORS))

        class Keys:
            def __init__(self):
                self.keys = []

            def prepare(self, view):
                return view.key

            def commit(self, key):
                self.keys.append(key)

        register_accumulator("keys", lambda o, names: Keys())

        @register_metric("pixel-pairs", accumulator="pixels", summary=lambda r: f"{r['keys']} samples",
                         family="tests", choices={"region": ("fg", "full")})
        def pixel_pairs(p):
            return {"value": float(p.accumulators["pixels"].pooled().sum()),
                    "keys": len(p.accumulators["keys"].keys)}

        @register_metric("keys", accumulator="keys", summary=lambda r: "keys seen")
        def keys(p):
            return {"value": None, "keys": p.accumulators["keys"].keys}

        assert list_metrics()[-2:] == ["pixel-pairs", "keys"]
        r = evaluate([shard], ["keys", "pixel-pairs", "nmi"], region="full")["metrics"]
        assert list(r) == ["keys", "pixel-pairs", "nmi"] and r["keys"]["keys"] == ["s0", "s1", "s2"]
        assert r["pixel-pairs"]["value"] == r["nmi"]["pairs"] and r["pixel-pairs"]["keys"] == 3
        result = runner.invoke(app, ["eval", "pixel-pairs", "keys", shard])
        assert result.exit_code == 0, result.stderr
        assert "3 samples" in result.stderr and "keys seen" in result.stderr
        assert json.loads(result.stdout)["metrics"]["keys"]["value"] is None
        with pytest.raises(ValueError, match="metric 'nmi' is already registered"):
            register_metric("nmi", accumulator="pixels", summary=str)(lambda p: {})
    assert "pixel-pairs" not in list_metrics() and "keys" not in _registry.accumulator_kinds()
    with pytest.raises(PartkitError, match="unknown metric 'pixel-pairs'"):
        evaluate([shard], ["pixel-pairs"])


def _every_metric(shard_factory):
    """(shards, options) that give each built-in metric a result."""
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    masks = shard_factory([_sample("m", m.astype(np.uint8), proposals__json=[{"segmentation": _rle(m), "score": 0.9},
                                                                            {"segmentation": _rle(~m), "score": 0.2}])])
    meta = {"grid": [4, 4], "stride": 4, "image_size": [16, 16], "resized": [16, 16]}
    rng = np.random.default_rng(0)
    kpts = {"keypoints": [[[2, 2, 2], [10, 10, 2]]], "names": ["head", "tail"]}
    retrieval = shard_factory([_sample(f"r{i}", feat__npy=rng.normal(size=(3, 4, 4)).astype(np.float32),
                                       feat__json=meta, json={"width": 16, "height": 16}, gt_kpts__json=kpts)
                               for i in range(2)])
    shapes = shard_factory([_sample("a", category="cap", gt_parts__npy=np.array([6, 6, 7]),
                                    pred_parts__npy=np.array([0, 0, 1]))])
    return {"nmi": ([shard_factory(_class_samples())], {}), "ari": ([shard_factory(_class_samples())], {}),
            "miou": ([shard_factory(_class_samples())], {}), "ar": ([masks], {"ks": (1, 2)}),
            "mask-ap": ([masks], {}), "retrieval": ([retrieval], {}), "miou-3d": ([shapes], {}),
            "probe": ([shard_factory(_probe_samples(4))], {"probe_train": 2}),
            "part-cls": ([shard_factory(_kpt_feat_samples(3))], {"probe_train": 2, "probe_epochs": 5}),
            "linear-seg": ([shard_factory(_probe_samples(4))], {"probe_train": 2, "probe_iters": 5}),
            "kpt-regression": ([shard_factory(_landmark_samples(4))], {"kpt_train": 3, "kpt_norm": "image"})}


def _kpt_feat_samples(n):
    from partkit.io import encode_json, encode_npy

    rows = [{"object": 0, "index": j, "name": name, "x": 1.0, "y": 1.0, "v": 2} for j, name in enumerate(["a", "b"])]
    return [{"__key__": f"k{i}", "kpt_feat.npy": encode_npy(np.eye(2, 3, dtype=np.float32) + 0.1 * i),
             "kpt_feat.json": encode_json({"model": "m", "kind": "patch-mean", "layers": [0], "keypoints": rows,
                                           "skipped": []})} for i in range(n)]


def _landmark_samples(n):
    out = []
    for i in range(n):
        pred = np.zeros((8, 8), np.uint8)
        pred[i % 3:i % 3 + 2, 1:3], pred[4:6, i % 4:i % 4 + 3] = 1, 2
        out.append(_sample(f"l{i}", pred=pred, json={"width": 8, "height": 8},
                           gt_kpts__json={"keypoints": [[[1 + i % 3, 2, 2], [3, 4 + i % 2, 2]]]}))
    return out


def test_every_metric_summary_row_renders(shard_factory):
    from partkit.evaluate import get_metric, list_metrics

    cases = _every_metric(shard_factory)
    assert list(cases) == list_metrics()
    for name, (shards, options) in cases.items():
        r = evaluate(shards, [name], **options)["metrics"][name]
        value, protocol = get_metric(name).summary_row(r)
        assert value == f"{r['value']:.2f}" and protocol and "{" not in protocol, (name, protocol)
    r = evaluate(cases["miou"][0], ["miou"], miou="pooled")["metrics"]["miou"]
    assert get_metric("miou").summary_row(r)[1] == ("majority matching fitted on scored data, fg pixels, 3 parts; "
                                                    "C-mIoU 79.17, A-mIoU 75.00")
    assert get_metric("ar").summary_row({"value": None, "ar@1": None, "ar@10": 50.0, "gt_masks": 4}) == \
        ("-", "AR@1 -, AR@10 50.00 over 4 GT masks")
