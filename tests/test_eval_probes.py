"""Zhu et al.'s probes: ``eval part-cls`` (linear part classification) and ``eval linear-seg``."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import jaccard_score

from conftest import invoke, one_error_line
from partkit.errors import PartkitError
from partkit.evaluate import EvalOptions, evaluate
from partkit.io import encode_json, encode_npy
from test_evaluate import _probe_samples, _sample

NAMES = ["eye", "leg", "wing", "tail"]


def _kpt_samples(n_images, centres, spread, seed=0):
    rng = np.random.default_rng(seed)
    out, feats, names = [], [], []
    for i in range(n_images):
        parts = rng.choice(len(NAMES), size=3, replace=False)
        kf = np.stack([centres[p] + spread * rng.normal(size=centres.shape[1]) for p in parts]).astype(np.float32)
        rows = [{"object": 0, "index": int(p), "name": NAMES[p], "x": 1.0, "y": 1.0, "v": 2} for p in parts]
        out.append({"__key__": f"k{i:03d}", "kpt_feat.npy": encode_npy(kf),
                    "kpt_feat.json": encode_json({"model": "m", "kind": "patch-mean", "layers": [0],
                                                  "keypoints": rows, "skipped": []})})
        feats.extend(kf)
        names.extend(NAMES[p] for p in parts)
    return out, np.stack(feats), np.asarray(names)


def test_part_cls_matches_sklearn_logistic_regression(shard_factory):
    centres = np.random.default_rng(9).normal(size=(4, 16)) * 0.35
    samples, x, y = _kpt_samples(40, centres, 1.0)
    r = evaluate([shard_factory(samples)], ["part-cls"], probe_train=20, probe_epochs=30)["metrics"]["part-cls"]
    train = 20 * 3
    ref = LogisticRegression(max_iter=2000).fit(x[:train], y[:train])
    ref_acc = 100 * np.mean(ref.predict(x[train:]) == y[train:])
    assert r["train_keypoints"] == 60 and r["test_keypoints"] == 60 and r["train_images"] == 20
    assert 40 < ref_acc < 100  # overlapping clusters: a real test, not a saturated one
    assert abs(r["value"] - ref_acc) <= 10, (r["value"], ref_acc)
    assert r["lr"] == 0.4 and r["batch_size"] == 60 and r["paper"]["epochs"] == 90
    assert r["balanced_accuracy"] == pytest.approx(np.mean(list(r["per_part"].values())))
    easy, _, _ = _kpt_samples(10, centres * 10, 0.1)
    assert evaluate([shard_factory(easy)], ["part-cls"], probe_train=5)["metrics"]["part-cls"]["value"] == 100.0


def test_linear_seg_learns_parts_from_features(shard_factory):
    shard = shard_factory(_probe_samples(5))
    r = evaluate([shard], ["linear-seg"], probe_train=3, region="full", probe_iters=150,
                 probe_lr=0.05)["metrics"]["linear-seg"]
    assert r["train_images"] == 3 and r["test_images"] == 2 and set(r["iou"]) == {"0", "1", "2"}
    assert r["value"] > 90, r
    assert r["paper"]["lr"] == 4e-4 and r["lr"] == 0.05 and r["batch_size"] == 3
    fg = evaluate([shard], ["linear-seg"], probe_train=3, probe_iters=150, probe_lr=0.05)["metrics"]["linear-seg"]
    assert set(fg["iou"]) == {"1", "2"}
    with pytest.raises(PartkitError, match="linear-seg trains on the first 5 images"):
        evaluate([shard], ["linear-seg"], probe_train=5, probe_iters=1)


def test_linear_seg_without_information_predicts_the_majority_part(shard_factory):
    """Constant features: only the bias learns, so every pixel gets the most frequent training part;
    the score must equal sklearn's Jaccard of that constant prediction."""
    rng = np.random.default_rng(4)
    meta = {"grid": [4, 4], "stride": 4, "image_size": [16, 16], "resized": [16, 16]}
    gts = [rng.choice(3, size=(16, 16), p=[0.2, 0.6, 0.2]).astype(np.uint8) for _ in range(5)]
    samples = [_sample(f"c{i}", gt, feat__npy=np.ones((2, 4, 4), np.float16), feat__json=meta)
               for i, gt in enumerate(gts)]
    r = evaluate([shard_factory(samples)], ["linear-seg"], probe_train=3, region="full", probe_iters=200,
                 probe_lr=0.05)["metrics"]["linear-seg"]
    test = np.concatenate([g.ravel() for g in gts[3:]])
    ref = jaccard_score(test, np.ones_like(test), average=None, labels=[0, 1, 2])
    assert r["value"] == pytest.approx(100 * ref.mean())  # parts 0 and 2 are never predicted: IoU 0
    assert r["iou"] == {"0": 0.0, "1": pytest.approx(100 * ref[1]), "2": 0.0}


def test_probe_options_are_checked_and_zhu_sets_the_paper_iterations(shard_factory):
    shard = shard_factory(_probe_samples(3))
    one_error_line(invoke(["eval", "linear-seg", shard, "--probe-lr", "0"]), "--probe-lr", "positive")
    one_error_line(invoke(["eval", "part-cls", shard, "--probe-batch", "0"]), "--probe-batch")
    one_error_line(invoke(["eval", "part-cls", shard, "--probe-epochs", "0"]), "--probe-epochs")
    o = EvalOptions(protocol="zhu", given=[])
    o.validate(["linear-seg"])
    assert o.probe_iters == 160_000 and EvalOptions().probe_iters == 2000
