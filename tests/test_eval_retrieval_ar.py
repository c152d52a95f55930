"""Protocol-exact retrieval (Zhu et al.) and AR@k (PartDistillation): references, crops, defaults."""
import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from partkit import metrics as M
from partkit._runtime import seed_everything
from partkit.cli.main import app
from partkit.errors import BadSample, PartkitError
from partkit.evaluate import EvalOptions, evaluate, get_metric
from partkit.extract import extract, keypoint_crops
from partkit.io import Output, decode_json, decode_npy, encode_json, encode_npy
from partkit.models import create_backbone
from conftest import read_shard

runner = CliRunner()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _ref_ap(sims: np.ndarray, positives: np.ndarray) -> float:
    """AP of one ranking, written out: mean over positives of the precision at their rank (no ties)."""
    order = np.argsort(-sims)
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions)) if precisions else float("nan")


def _ref_retrieval(x: np.ndarray, names: list, exclude_self: bool) -> np.ndarray:
    out = []
    for q in range(len(x)):
        others = [i for i in range(len(x)) if i != q or not exclude_self]
        sims = np.array([x[q] @ x[i] / np.linalg.norm(x[q]) / np.linalg.norm(x[i]) for i in others])
        out.append(_ref_ap(sims, np.array([names[i] == names[q] for i in others])))
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# retrieval: the query excluded, on random features


def test_retrieval_ap_query_excluded_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 7))
    names = list(rng.choice(["eye", "leg", "wing", "tail"], size=40))
    for exclude in (True, False):
        ours = M.retrieval_ap(x, names, exclude_self=exclude)
        ref = _ref_retrieval(x, names, exclude)
        assert np.allclose(ours, ref, atol=1e-9, rtol=0, equal_nan=True)


def test_eval_retrieval_patches_excludes_the_query_by_default(shard_factory):
    rng = np.random.default_rng(2)
    names = ["eye", "leg", "wing", "tail"]
    samples, feats, labels = [], [], []
    for i in range(5):
        k = rng.integers(2, 5)
        kf = rng.normal(size=(k, 6)).astype(np.float32)
        rows = [{"object": 0, "index": int(j), "name": names[j], "x": 1.0, "y": 1.0, "v": 2} for j in
                rng.choice(4, size=k, replace=False)]
        samples.append({"__key__": f"s{i}", "kpt_feat.npy": encode_npy(kf),
                        "kpt_feat.json": encode_json({"model": "m", "kind": "patch-mean", "layers": [0],
                                                      "keypoints": rows, "skipped": []})})
        feats.extend(kf)
        labels.extend(r["name"] for r in rows)
    shard = shard_factory(samples)
    assert EvalOptions().exclude_self is True
    r = evaluate([shard], ["retrieval"], retrieval_features="patches")["metrics"]["retrieval"]
    ref = _ref_retrieval(np.stack(feats).astype(np.float64), labels, exclude_self=True)
    scored = ~np.isnan(ref)
    assert r["exclude_self"] is True and r["features"] == "patches"
    assert r["queries"] == scored.sum() and r["skipped_queries"] == (~scored).sum()
    assert r["value"] == pytest.approx(100 * ref[scored].mean(), abs=1e-7)
    assert "keypoint crops" in get_metric("retrieval").summary_row(r)[1]
    r_in = evaluate([shard], ["retrieval"], retrieval_features="patches", exclude_self=False)["metrics"]["retrieval"]
    ref_in = _ref_retrieval(np.stack(feats).astype(np.float64), labels, exclude_self=False)
    assert r_in["value"] == pytest.approx(100 * ref_in.mean(), abs=1e-7)
    with pytest.raises(PartkitError, match="--retrieval-features must be one of pooled-cells, patches"):
        evaluate([shard], ["retrieval"], retrieval_features="crops")
    res = runner.invoke(app, ["eval", "retrieval", shard, "--retrieval-features", "patches", "--include-self"])
    assert res.exit_code == 0, res.stderr
    assert '"exclude_self": false' in res.stdout


# ---------------------------------------------------------------------------------------------
# extract --patches-at keypoints: one feature per keypoint, the backbone run on the crop


def _kpt_shard(shard_factory, rgb, kpts, names):
    return shard_factory([{"__key__": "bird", "png": _png(rgb),
                           "gt_kpts.json": encode_json({"keypoints": [kpts], "names": names})}])


def _crop_input(rgb, box, size, bb):
    left, top, right, bottom = box
    crop = Image.fromarray(rgb[top:bottom, left:right]).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(bb.mean).view(3, 1, 1)) / torch.tensor(bb.std).view(3, 1, 1)


def test_patches_at_keypoints_rgb_equals_the_crop(shard_factory, tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    kpts = [[20.0, 20.0, 2], [30.0, 20.0, 2], [40.0, 34.0, 1], [5.0, 5.0, 0]]  # the last is unlabelled
    shard = _kpt_shard(shard_factory, rgb, kpts, ["eye", "leg", "wing", "tail"])
    extract([shard], model="rgb", size=32, patches_at="keypoints", output=Output(str(tmp_path / "o")))
    (s,) = read_shard(tmp_path / "o" / "000000.tar")
    kf, meta = decode_npy(s, "kpt_feat.npy"), decode_json(s, "kpt_feat.json")
    assert "feat.npy" in s and kf.dtype == np.float32 and kf.shape == (3, 3)
    assert [r["name"] for r in meta["keypoints"]] == ["eye", "leg", "wing"] and meta["patch_size"] == "nn"
    # nn: the side is the distance to the nearest other keypoint (10, 10, |(40,34)-(30,20)| = 17.2 -> 17)
    assert [r["box"] for r in meta["keypoints"]] == [[15, 15, 25, 25], [25, 15, 35, 25], [32, 26, 49, 43]]
    bb = create_backbone("rgb")
    for row, box in zip(kf, (r["box"] for r in meta["keypoints"])):
        ref = _crop_input(rgb, box, 32, bb).mean((1, 2)).numpy()
        assert np.allclose(row, ref, atol=1e-5)
    # a fixed --patch-size, and the CLS variant falls back to global average pooling on a non-ViT
    extract([shard], model="rgb", size=32, patches_at="keypoints", patch_size=8, patch_pool="cls",
            output=Output(str(tmp_path / "p")))
    (s,) = read_shard(tmp_path / "p" / "000000.tar")
    meta = decode_json(s, "kpt_feat.json")
    assert meta["pool"] == "gap" and [r["box"] for r in meta["keypoints"]][0] == [16, 16, 24, 24]
    assert np.allclose(decode_npy(s, "kpt_feat.npy")[0], _crop_input(rgb, [16, 16, 24, 24], 32, bb).mean((1, 2)),
                       atol=1e-5)


def test_patches_at_keypoints_vit_mean_and_cls_equal_the_backbone_on_the_crop(shard_factory, tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    kpts = [[12.0, 12.0, 2], [24.0, 12.0, 2], [24.0, 26.0, 2]]
    shard = _kpt_shard(shard_factory, rgb, kpts, ["a", "b", "c"])
    model = "timm:vit_tiny_patch16_224"
    for pool in ("mean", "cls"):
        extract([shard], model=model, weights="none", size=32, seed=5, patches_at="keypoints", patch_pool=pool,
                output=Output(str(tmp_path / pool)))
    seed_everything(5)  # the same random weights as the runs above
    bb = create_backbone(model, "none").eval()
    got = {}
    hook = bb.net.blocks[-1].register_forward_hook(lambda m, i, o: got.__setitem__("tokens", o))
    s_mean = read_shard(tmp_path / "mean" / "000000.tar")[0]
    s_cls = read_shard(tmp_path / "cls" / "000000.tar")[0]
    boxes = [r["box"] for r in decode_json(s_mean, "kpt_feat.json")["keypoints"]]
    assert boxes == [[6, 6, 18, 18], [18, 6, 30, 18], [17, 19, 31, 33]]
    with torch.no_grad():
        x = torch.stack([_crop_input(rgb, b, 32, bb) for b in boxes])
        bb.net.forward_features(x)  # timm's own embedding and blocks
    hook.remove()
    tokens = got["tokens"]
    assert decode_json(s_cls, "kpt_feat.json")["pool"] == "cls"
    assert np.allclose(decode_npy(s_cls, "kpt_feat.npy"), tokens[:, 0].numpy(), atol=1e-4)
    assert np.allclose(decode_npy(s_mean, "kpt_feat.npy"), tokens[:, 1:].mean(1).numpy(), atol=1e-4)


def test_patches_at_keypoints_validation(shard_factory, tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    outside = _kpt_shard(shard_factory, rgb, [[4.0, 4.0, 2], [20.0, 4.0, 2]], ["a", "b"])
    res = runner.invoke(app, ["extract", outside, "--model", "rgb", "--size", "16", "--patches-at", "keypoints"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("partkit: error:") and "lies outside the 16x16 image" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    good = _kpt_shard(shard_factory, rgb, [[4.0, 4.0, 2], [12.0, 4.0, 2]], ["a", "b"])
    for args, msg in ((["--patch-size", "1"], "--patch-size must be at least 2 pixels"),
                      (["--patch-size", "big"], "--patch-size must be 'nn' or a whole number"),
                      (["--patch-size", "40"], "--patch-size 40 is larger than the 16x16 image"),
                      (["--patch-pool", "max"], "--patch-pool must be one of mean, cls"),
                      (["--patches-at", "cells"], "--patches-at must be one of keypoints")):
        opts = ["--patches-at", "keypoints", *args] if "--patches-at" not in args else args
        res = runner.invoke(app, ["extract", good, "--model", "rgb", "--size", "16", *opts])
        assert res.exit_code == 2 and res.stdout == "" and msg in res.stderr, (args, res.stderr)
    # a lone keypoint has no nn size: recorded as skipped, not cropped
    lone = _kpt_shard(shard_factory, rgb, [[4.0, 4.0, 2], [12.0, 4.0, 0]], ["a", "b"])
    extract([lone], model="rgb", size=16, patches_at="keypoints", output=Output(str(tmp_path / "l")))
    (s,) = read_shard(tmp_path / "l" / "000000.tar")
    meta = decode_json(s, "kpt_feat.json")
    assert meta["keypoints"] == [] and meta["skipped"][0]["reason"].startswith("no other keypoint")
    with pytest.raises(BadSample, match="has no 'kpt_feat.npy' field; run `partkit extract --patches-at keypoints`"):
        evaluate([lone], ["retrieval"], retrieval_features="patches")


def test_keypoint_crops_pad_beyond_the_border():
    rgb = np.full((10, 10, 3), 200, np.uint8)
    assert keypoint_crops(rgb, np.array([[0.0, 0.0], [6.0, 8.0]]), "nn") == [(-5, -5, 10), (1, 3, 10)]


# ---------------------------------------------------------------------------------------------
# ar: proposals available per k; the PartDistillation defaults


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_ar_reports_proposals_available_per_k(shard_factory):
    samples = []
    for i, n in enumerate((3, 5)):
        gt = np.zeros((8, 8), np.uint8)
        gt[:4] = 1
        gt[4:] = 2
        props = [{"segmentation": _rle(gt == 1 + j % 2), "score": 1 - j / 10} for j in range(n)]
        samples.append({"__key__": f"a{i}", "gt_parts.png": _png_gray(gt), "proposals.json": encode_json(props)})
    shard = shard_factory(samples)
    r = evaluate([shard], ["ar"], ks=(1, 4, 10))["metrics"]["ar"]
    avail = r["proposals_available"]
    assert avail["ar@1"] == {"mean": 1.0, "min": 1, "images_short": 0}
    assert avail["ar@4"] == {"mean": 3.5, "min": 3, "images_short": 1}
    assert avail["ar@10"] == {"mean": 4.0, "min": 3, "images_short": 2}
    row = get_metric("ar").summary_row(r)[1]
    assert "AR@1 50.00," in row and "AR@10 100.00 (!2 img < 10 proposals; mean 4)" in row


def _png_gray(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _cli_default(module, name):
    for p in inspect.signature(module.main).parameters.values():
        if p.name == name:
            return p.default.default
    raise KeyError(name)


def test_defaults_are_partdistillations():
    """PartDistillation's configs: MASK_FORMER.NUM_OBJECT_QUERIES 200 (Swin-L IN21k base config),
    TEST.DETECTIONS_PER_IMAGE 200, proposal_evaluator.py limits 1, 10, 50, 100, 200."""
    from partkit.cli import predict as predict_cmd, train_decoder as train_cmd
    from partkit.decoder.model import DecoderConfig
    from partkit.decoder.predict import predict
    from partkit.decoder.train import masks_recall

    assert DecoderConfig(in_channels=8).num_queries == 200
    assert inspect.signature(predict).parameters["topk"].default == 200
    assert _cli_default(train_cmd, "queries") == 200 and _cli_default(predict_cmd, "topk") == 200
    assert tuple(EvalOptions().ks) == (1, 10, 50, 100, 200)
    assert inspect.signature(masks_recall).parameters["ks"].default == (1, 10, 50, 100, 200)
    # Zhu et al.: each patch queries all the other patches; crops of side nn around keypoints
    assert EvalOptions().exclude_self is True
    assert inspect.signature(extract).parameters["patch_size"].default == "nn"
