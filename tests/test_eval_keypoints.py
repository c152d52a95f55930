"""nmi/ari per object class and kpt-regression, against hand-made answers and sklearn references."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from partkit.cli.main import app
from partkit.errors import PartkitError
from partkit.evaluate import evaluate
from partkit.io import encode_json, encode_png

runner = CliRunner()
H = W = 40


def _sample(key, pred, kpts=None, box=None, gt=None, category=None, names=None):
    s = {"__key__": key, "parts.png": encode_png(np.asarray(pred, np.uint8)),
         "json": encode_json({"width": pred.shape[1], "height": pred.shape[0],
                              **({"category": category} if category else {})})}
    if kpts is not None:
        s["gt_kpts.json"] = encode_json({"keypoints": [np.asarray(kpts).tolist()],
                                         "names": names or [f"k{i}" for i in range(len(kpts))]})
    if box is not None:
        s["gt_objects.json"] = encode_json({"objects": [{"id": 1, "bbox": list(box), "iscrowd": 0,
                                                         "segmentation": {"size": [H, W], "counts": "0"}}]})
    if gt is not None:
        s["gt_parts.png"] = encode_png(np.asarray(gt, np.uint8))
    return s


def _parts_map(rng, n_parts=3, missing=()):
    """A label map with rectangles of ids 1..n_parts, one per band of columns (0 elsewhere), some left out."""
    pred = np.zeros((H, W), np.uint8)
    band = W // n_parts
    for p in range(1, n_parts + 1):
        if p in missing:
            continue
        h, w = rng.integers(3, 9), rng.integers(3, band)
        y, x = rng.integers(0, H - h), (p - 1) * band + rng.integers(0, band - w)
        pred[y:y + h, x:x + w] = p
    return pred


def _features(pred, box, parts):
    """Independent reference: 1-based pixel-index centroids (missing part: 0, 0), box-normalised."""
    out = []
    for p in parts:
        rows, cols = np.nonzero(pred == p)
        cx, cy = (cols.mean() + 1, rows.mean() + 1) if rows.size else (0.0, 0.0)
        out += [(cx - box[0]) / box[2], (cy - box[1]) / box[3]]
    return np.array(out)


def _affine(seed):
    """Keypoints = features @ A + b that stay inside the box (features lie in about [-0.5, 2])."""
    rng = np.random.default_rng(seed)
    return rng.random((6, 8)) * 0.05, np.full(8, 0.2)


def _images(seed, n, affine=None, vis_rate=1.0):
    """n images of 3 parts with boxes; keypoints an affine map of the features, or random."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pred = _parts_map(rng, missing=(3,) if i % 5 == 4 else ())
        box = [float(rng.integers(0, 10)), float(rng.integers(0, 10)), float(rng.integers(20, 30)),
               float(rng.integers(20, 30))]
        f = _features(pred, box, [1, 2, 3])
        norm = f @ affine[0] + affine[1] if affine is not None else rng.random((4, 2)).ravel()
        xy = norm.reshape(-1, 2) * box[2:] + box[:2]
        vis = np.where(rng.random(len(xy)) < vis_rate, 2, 0)
        vis[0] = 2
        out.append((pred, np.column_stack([xy, vis]), box))
    return out


def _shard(shard_factory, images, prefix="s"):
    return shard_factory([_sample(f"{prefix}{i}", p, k, b) for i, (p, k, b) in enumerate(images)])


def test_keypoints_an_affine_map_of_centroids_are_regressed_exactly(shard_factory):
    affine = _affine(0)
    train, test = _shard(shard_factory, _images(1, 20, affine)), _shard(shard_factory, _images(2, 6, affine))
    r = evaluate([test], ["kpt-regression"], match_on=[train])["metrics"]["kpt-regression"]
    assert r["value"] == pytest.approx(0, abs=1e-9)
    assert r["train_images"] == 20 and r["test_images"] == 6 and r["parts"] == 3 and r["keypoints"] == 24
    assert r["fitted_on"] == "match-on shards" and r["norm"] == "bbox" and set(r["per_keypoint"]) == {"k0", "k1",
                                                                                                        "k2", "k3"}
    both = _shard(shard_factory, _images(1, 20, affine) + _images(2, 6, affine))
    r2 = evaluate([both], ["kpt-regression"], kpt_train=20)["metrics"]["kpt-regression"]
    assert r2["value"] == pytest.approx(0, abs=1e-9) and r2["fitted_on"] == "first 20 images"


def test_a_known_offset_gives_a_known_error(shard_factory):
    rng = np.random.default_rng(3)
    train, test = [], []
    for i in range(16):
        pred = _parts_map(rng)
        c = np.array([[np.nonzero(pred == p)[1].mean() + 0.5, np.nonzero(pred == p)[0].mean() + 0.5] for p in (1, 2)])
        kp = np.column_stack([c, [2, 2]])  # keypoints at the part centroids (pixel centres)
        (train if i < 12 else test).append((pred, kp, None))
    for _, kp, _ in test:
        kp[:, 0] += 3
        kp[:, 1] += 4  # 5 pixels off: 5 / 40 of the image = 12.5 (x100) with --kpt-norm image
    shards = [shard_factory([_sample(f"t{i}", p, k) for i, (p, k, _) in enumerate(train + test)])]
    r = evaluate(shards, ["kpt-regression"], kpt_train=12, kpt_norm="image")["metrics"]["kpt-regression"]
    assert r["value"] == pytest.approx(12.5, abs=1e-9) and r["keypoints"] == 8
    assert all(v["error"] == pytest.approx(12.5, abs=1e-9) for v in r["per_keypoint"].values())


def _sklearn_reference(train, test, parts):
    """Huang & Li's regression, written with sklearn: per keypoint, visible rows only."""
    def design(images):
        x = np.stack([_features(p, b, parts) for p, _, b in images])
        y = np.stack([(k[:, :2] - b[:2]) / b[2:] for _, k, b in images])
        v = np.stack([k[:, 2] >= 1 for _, k, _ in images])
        return x, y, v

    (xf, yf, vf), (xt, yt, vt) = design(train), design(test)
    total, n = 0.0, 0
    for k in range(yf.shape[1]):
        sx, sy = StandardScaler().fit(xf[vf[:, k]]), StandardScaler().fit(yf[vf[:, k], k])
        reg = LinearRegression(fit_intercept=False).fit(sx.transform(xf[vf[:, k]]), sy.transform(yf[vf[:, k], k]))
        pred = sy.inverse_transform(reg.predict(sx.transform(xt[vt[:, k]])))
        err = np.linalg.norm(pred - yt[vt[:, k], k], axis=1)
        total, n = total + err.sum(), n + err.size
    return total * 100 / n


def test_regression_matches_an_sklearn_reference(shard_factory):
    train, test = _images(4, 25, vis_rate=0.7), _images(5, 9, vis_rate=0.7)
    r = evaluate([_shard(shard_factory, test)], ["kpt-regression"],
                 match_on=[_shard(shard_factory, train, "f")])["metrics"]["kpt-regression"]
    assert r["value"] == pytest.approx(_sklearn_reference(train, test, [1, 2, 3]), abs=1e-9)
    assert r["keypoints"] == sum(int((k[:, 2] >= 1).sum()) for _, k, _ in test)


def test_kpt_regression_errors_are_clear(shard_factory):
    shard = _shard(shard_factory, _images(6, 4))
    with pytest.raises(PartkitError, match="give --match-on TRAIN_SHARDS .* or --kpt-train N"):
        evaluate([shard], ["kpt-regression"])
    with pytest.raises(PartkitError, match="not both"):
        evaluate([shard], ["kpt-regression"], kpt_train=2, match_on=[shard])
    with pytest.raises(PartkitError, match="lower --kpt-train or give more images"):
        evaluate([shard], ["kpt-regression"], kpt_train=4)
    with pytest.raises(PartkitError, match="--kpt-norm must be one of bbox, image"):
        evaluate([shard], ["kpt-regression"], kpt_train=2, kpt_norm="iod")
    no_box = shard_factory([_sample(f"n{i}", p, k) for i, (p, k, _) in enumerate(_images(6, 4))])
    with pytest.raises(PartkitError, match="no 'gt_objects.json' .* or use --kpt-norm image"):
        evaluate([no_box], ["kpt-regression"], kpt_train=2)
    assert evaluate([no_box], ["kpt-regression"], kpt_train=2, kpt_norm="image")["metrics"]["kpt-regression"]["value"]
    two = _sample("two", *_images(6, 1)[0])
    two["gt_kpts.json"] = encode_json({"keypoints": [[[1, 1, 2]], [[2, 2, 2]]]})
    with pytest.raises(PartkitError, match="needs exactly one object's keypoints per image"):
        evaluate([shard_factory([two])], ["kpt-regression"], kpt_train=1)


# ------------------------------------------------------------------------------ nmi/ari per object class


def _class_pairs(seed):
    rng = np.random.default_rng(seed)
    out = []
    for i, cat in enumerate(["cow", "cow", "bus", "bus", "bus", "dog"]):
        gt = rng.integers(0, 4, (12, 14)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.05] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt % 3 + (i % 2), rng.integers(0, 5, gt.shape)).astype(np.uint8)
        out.append((f"c{i}", cat, gt, pred))
    return out


@pytest.mark.parametrize("region", ["fg", "full"])
def test_nmi_ari_per_class_equal_sklearn_per_class(shard_factory, region):
    pairs = _class_pairs(7)
    shard = shard_factory([_sample(k, p, gt=g, category=c) for k, c, g, p in pairs])
    pooled = evaluate([shard], ["nmi", "ari"], region=region)["metrics"]
    by_class = evaluate([shard], ["nmi", "ari"], region=region, average="class")["metrics"]

    def keep(g):
        return (g != 255) & ((g != 0) if region == "fg" else True)

    for name, fn in (("nmi", skm.normalized_mutual_info_score), ("ari", skm.adjusted_rand_score)):
        ref = {}
        for cat in ("bus", "cow", "dog"):
            g = np.concatenate([g[keep(g)] for _, c, g, _ in pairs if c == cat])
            p = np.concatenate([p[keep(g)] for _, c, g, p in pairs if c == cat])
            ref[cat] = fn(g, p) * 100
        g_all = np.concatenate([g[keep(g)] for *_, g, _ in pairs])
        p_all = np.concatenate([p[keep(g)] for *_, g, p in pairs])
        assert pooled[name]["value"] == pytest.approx(fn(g_all, p_all) * 100, abs=1e-9)
        assert pooled[name]["average"] == "pooled" and pooled[name]["classes"] == 3
        assert by_class[name]["value"] == pytest.approx(np.mean(list(ref.values())), abs=1e-9)
        assert by_class[name]["pooled"] == pytest.approx(pooled[name]["value"], abs=1e-12)
        for cat, v in ref.items():
            assert by_class[name]["per_class"][cat]["value"] == pytest.approx(v, abs=1e-9)
            assert pooled[name]["per_class"][cat]["value"] == pytest.approx(v, abs=1e-9)


def test_per_class_at_keypoints_and_without_classes(shard_factory):
    rng = np.random.default_rng(8)
    samples, ref = [], {"a": ([], []), "b": ([], [])}
    for i in range(6):
        pred = rng.integers(0, 4, (H, W)).astype(np.uint8)
        kp = np.column_stack([rng.uniform(0, W, 5), rng.uniform(0, H, 5), rng.integers(0, 3, 5)])
        cat = "ab"[i % 2]
        samples.append(_sample(f"k{i}", pred, kp, category=cat))
        vis = kp[:, 2] >= 1
        ref[cat][0].extend(np.arange(5)[vis])
        ref[cat][1].extend(pred[np.floor(kp[vis, 1]).astype(int), np.floor(kp[vis, 0]).astype(int)])
    r = evaluate([shard_factory(samples)], ["nmi"], at="keypoints", average="class")["metrics"]["nmi"]
    want = [skm.normalized_mutual_info_score(*ref[c]) * 100 for c in "ab"]
    assert r["value"] == pytest.approx(np.mean(want), abs=1e-9) and r["at"] == "keypoints"
    plain = shard_factory([_sample("p", np.zeros((4, 4), np.uint8), gt=np.ones((4, 4), np.uint8))])
    assert "per_class" not in evaluate([plain], ["nmi"])["metrics"]["nmi"]
    with pytest.raises(PartkitError, match="--average class needs each sample's object class"):
        evaluate([plain], ["nmi"], average="class")
    with pytest.raises(PartkitError, match="--average must be one of pooled, class"):
        evaluate([plain], ["nmi"], average="mean")


# ------------------------------------------------------------------------------------------- the CLI


def _bird_images(shard_factory):
    """15 train + 5 test images whose keypoints are an affine map of the part centroids, one shard."""
    affine = _affine(9)
    train, test = _images(10, 15, affine), _images(11, 5, affine)
    shard = shard_factory([_sample(f"s{i}", p, k, b, category="bird") for i, (p, k, b) in enumerate(train + test)])
    return train, shard


def test_cli_nmi_ari_kpt_regression_at_keypoints(shard_factory):
    train, shard = _bird_images(shard_factory)
    result = runner.invoke(app, ["eval", "nmi", "ari", "kpt-regression", shard, "--at", "keypoints",
                                 "--kpt-train", "15", "--average", "class"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["metrics"]) == ["nmi", "ari", "kpt-regression"]
    assert report["options"]["kpt_train"] == 15 and report["options"]["average"] == "class"
    k = report["metrics"]["kpt-regression"]
    assert k["value"] == pytest.approx(0, abs=1e-9) and k["test_images"] == 5
    assert report["metrics"]["nmi"]["per_class"]["bird"]["value"] == pytest.approx(report["metrics"]["nmi"]["value"])
    assert "kpt-regression" in result.stderr and "L2 error x100" in result.stderr
    train_shard = shard_factory([_sample(f"f{i}", p, k, b) for i, (p, k, b) in enumerate(train)])
    result = runner.invoke(app, ["eval", "kpt-regression", shard, "--match-on", train_shard, "--kpt-norm", "image"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]["kpt-regression"]["fitted_on"] == "match-on shards"
    result = runner.invoke(app, ["eval", "kpt-regression", shard])
    assert result.exit_code == 2 and "--kpt-train N" in result.stderr and result.stdout == ""


def test_cli_choudhury_protocol_at_keypoints(shard_factory):
    """`eval nmi ari kpt-regression --protocol choudhury --at keypoints`: pooled NMI/ARI, exact regression."""
    _, shard = _bird_images(shard_factory)
    result = runner.invoke(app, ["eval", "nmi", "ari", "kpt-regression", shard, "--protocol", "choudhury",
                                 "--at", "keypoints", "--kpt-train", "15"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["protocol"]["name"] == "choudhury" and report["options"]["average"] == "pooled"
    assert report["metrics"]["nmi"]["value"] == report["metrics"]["nmi"]["pooled"]
    assert report["metrics"]["kpt-regression"]["value"] == pytest.approx(0, abs=1e-9)
    assert "kpt-regression" in report["protocol"]["official"]
