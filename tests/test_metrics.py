"""partkit.metrics against independent references (sklearn, scipy, pycocotools) and hand-worked cases."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from partkit import metrics as M
from partkit.errors import PartkitError


def _labels(rng, n, k_true, k_pred, agree=0.6):
    true = rng.integers(0, k_true, n)
    pred = np.where(rng.random(n) < agree, true % k_pred, rng.integers(0, k_pred, n))
    return true, pred


@pytest.mark.parametrize("seed,n,kt,kp", [(0, 1000, 5, 3), (1, 5000, 20, 40), (2, 37, 2, 7), (3, 20000, 3, 3)])
def test_nmi_ari_match_sklearn(seed, n, kt, kp):
    rng = np.random.default_rng(seed)
    true, pred = _labels(rng, n, kt, kp)
    pred = pred * 7 + 3  # sparse, non-consecutive ids
    table = M.Contingency().update(true.astype(np.uint16), pred).table_
    assert M.nmi_score(contingency=table) == pytest.approx(skm.normalized_mutual_info_score(true, pred), abs=1e-12)
    assert M.ari_score(contingency=table) == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-12)
    assert M.nmi_score(true, pred) == pytest.approx(skm.normalized_mutual_info_score(true, pred), abs=1e-12)


@pytest.mark.parametrize("true,pred", [([1, 1, 1], [4, 4, 4]), ([0, 1, 2], [3, 3, 3]), ([5, 5, 5], [0, 1, 2]),
                                       ([0, 0, 1, 1], [0, 1, 0, 1]), ([2], [9])])
def test_degenerate_labelings_match_sklearn(true, pred):
    assert M.nmi_score(true, pred) == pytest.approx(skm.normalized_mutual_info_score(true, pred), abs=1e-12)
    assert M.ari_score(true, pred) == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-12)


def test_contingency_accumulates_in_chunks_and_batches(monkeypatch):
    rng = np.random.default_rng(0)
    true, pred = _labels(rng, 10_000, 9, 6)
    whole = M.Contingency().update(true, pred).table_
    monkeypatch.setattr(M, "_CHUNK", 333)
    parts = M.Contingency()
    for a, b in zip(np.array_split(true, 7), np.array_split(pred, 7)):
        parts.update(a.astype(np.uint8), b.astype(np.uint8))  # uint8 tables are 256 wide: shapes differ
    assert parts.table_[:whole.shape[0], :whole.shape[1]].tolist() == whole.tolist()
    assert parts.total == 10_000 and parts.table_[whole.shape[0]:].sum() == 0
    assert (M.Contingency().update([[True, False]], [[1, 1]]).table_[:2, :2] == [[0, 1], [0, 1]]).all()


def test_contingency_rejects_bad_ids():
    with pytest.raises(PartkitError, match="negative id -1"):
        M.Contingency().update([0, -1], [0, 0])
    with pytest.raises(PartkitError, match="must be integers"):
        M.Contingency().update([0.5, 1.0], [0, 0])
    with pytest.raises(PartkitError, match=r"shape \(2,\) but predicted labels \(3,\)"):
        M.Contingency().update([0, 1], [0, 1, 2])
    with pytest.raises(PartkitError, match="relabel them to consecutive ids"):
        M.Contingency().update(np.array([1 << 20]), np.array([1 << 20]))
    with pytest.raises(PartkitError, match="empty input"):
        M.nmi_score([], [])


def test_hungarian_matches_scipy_total_overlap():
    rng = np.random.default_rng(3)
    table = rng.integers(0, 50, (6, 9))
    mapping = M.match_clusters(table, "hungarian")
    rows, cols = linear_sum_assignment(table, maximize=True)
    assert sum(table[mapping[c], c] for c in range(9) if mapping[c] >= 0) == table[rows, cols].sum()
    assert (mapping >= 0).sum() == 6 and len(set(mapping[mapping >= 0])) == 6  # one-to-one


def test_majority_mapping_and_miou_by_hand():
    # rows: true parts 0 (background), 1, 2; columns: clusters 0..3
    table = np.array([[9, 1, 0, 0],
                      [0, 6, 2, 0],
                      [0, 1, 3, 4]])
    mapping = M.match_clusters(table, "majority")
    assert mapping.tolist() == [0, 1, 2, 2]
    iou, _ = M.matched_iou(table, "majority")
    # part 1: I=6, true 8, predicted (cluster 1) 8 -> 6/10; part 2: I=7, true 8, predicted 2+3+4=9 -> 7/10
    assert iou.tolist() == pytest.approx([9 / 10, 6 / 10, 7 / 10])
    # foreground protocol: background row dropped, cluster 0 never mapped (a miss)
    iou_fg, mapping_fg = M.matched_iou(table, "majority", ignore_true=[0], ignore_pred=[0])
    assert mapping_fg.tolist() == [-1, 1, 2, 2]
    # part 1: I=6, true 8, predicted 7 (cluster 1 on the foreground) -> 6/9; part 2 as before
    assert np.isnan(iou_fg[0]) and iou_fg[1:].tolist() == pytest.approx([6 / 9, 7 / 10])
    # hungarian: one-to-one, cluster 3 -> part 2, cluster 2 -> unmatched on the foreground
    iou_h, mapping_h = M.matched_iou(table, "hungarian", ignore_true=[0], ignore_pred=[0])
    assert mapping_h.tolist() == [-1, 1, -1, 2]
    assert iou_h[1:].tolist() == pytest.approx([6 / 9, 4 / 8])


def test_matching_fitted_on_another_split():
    fit = np.array([[0, 0, 0], [0, 5, 0], [0, 0, 5]])
    table = np.array([[0, 0, 0], [0, 0, 4], [0, 4, 0]])  # the clusters swapped meaning
    iou, mapping = M.matched_iou(table, "majority", fit_table=fit, ignore_true=[0], ignore_pred=[0])
    assert mapping.tolist() == [-1, 1, 2] and iou[1:].tolist() == [0.0, 0.0]
    # a cluster never seen while fitting maps to nothing: its pixels are misses
    iou, mapping = M.matched_iou(np.array([[0, 0, 0, 0], [0, 3, 0, 3]]), "majority", fit_table=fit[:2, :3],
                                 ignore_true=[0], ignore_pred=[0])
    assert mapping.tolist() == [-1, 1, -1, -1] and iou[1] == pytest.approx(0.5)


def test_identity_matching_counts_ids_absent_from_truth():
    iou, _ = M.matched_iou(np.array([[0, 0, 0, 0], [0, 2, 0, 2]]), "none", ignore_true=[0], ignore_pred=[0])
    assert iou[1] == pytest.approx(0.5) and iou[3] == 0.0 and np.isnan(iou[2])


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _random_masks(rng, n, h=24, w=32):
    out = []
    for _ in range(n):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m = np.zeros((h, w), bool)
        m[y:y + rng.integers(3, 12), x:x + rng.integers(3, 14)] = True
        out.append(m)
    return out


def test_mask_iou_matches_dense_and_pycocotools():
    rng = np.random.default_rng(0)
    dt, gt = _random_masks(rng, 5), _random_masks(rng, 4)
    iou = M.mask_iou([_rle(m) for m in dt], [_rle(m) for m in gt])
    dense = np.array([[(a & b).sum() / (a | b).sum() for b in gt] for a in dt])
    assert iou == pytest.approx(dense)
    assert iou == pytest.approx(mask_utils.iou([_rle(m) for m in dt], [_rle(m) for m in gt], [0] * 4))
    assert M.mask_iou([], [_rle(gt[0])]).shape == (0, 1)


def test_average_recall_by_hand():
    # 2 GT masks. Proposal A (best score) overlaps GT0 at 0.72 and GT1 at 0.82; proposal B overlaps GT1 at 0.57.
    iou = np.array([[0.72, 0.82], [0.0, 0.57]])
    acc = M.RecallAccumulator(ks=(1, 2)).update(iou)
    # k=1: A takes GT1 (its highest IoU) at the 7 thresholds 0.5..0.8 -> recall 1/2 there, 0 above.
    # k=2: B could only take GT1, which A holds: no change.
    assert acc.result() == pytest.approx({1: 7 * 0.5 / 10, 2: 7 * 0.5 / 10})
    # B first: B takes GT1 at 0.5 and 0.55; A then takes GT0 there (both found), and GT1 at 0.6..0.8.
    acc = M.RecallAccumulator(ks=(1, 2)).update(iou[::-1])
    assert acc.result()[1] == pytest.approx(2 * 0.5 / 10)
    assert acc.result()[2] == pytest.approx((2 * 1 + 5 * 0.5) / 10)
    with pytest.raises(PartkitError, match="no ground-truth masks"):
        M.RecallAccumulator().result()


def _coco_files(tmp_path, images, dets, agnostic=True):
    anns = []
    for img in images:
        for a in img["annotations"]:
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": 1 if agnostic else a["category_id"],
                         "segmentation": a["segmentation"], "area": float(mask_utils.area(a["segmentation"])),
                         "bbox": mask_utils.toBbox(a["segmentation"]).tolist(), "iscrowd": a.get("iscrowd", 0)})
    cats = sorted({a["category_id"] for a in anns})
    gt = {"images": [{"id": i["id"], "height": i["height"], "width": i["width"]} for i in images],
          "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dt = [dict(d, category_id=1 if agnostic else d["category_id"]) for d in dets]
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    return str(tmp_path / "gt.json"), str(tmp_path / "dt.json")


def _cocoeval(gt_file, dt_file, max_dets=(1, 10, 100)):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ev = COCOeval(gt, gt.loadRes(dt_file), "segm")
        ev.params.maxDets = list(max_dets)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats


def _mask_problem(seed, n_images=4):
    rng = np.random.default_rng(seed)
    images, dets = [], []
    for i in range(n_images):
        gts = _random_masks(rng, 3)
        images.append({"id": i + 1, "height": 24, "width": 32,
                       "annotations": [{"segmentation": _rle(m), "category_id": int(c % 2) + 1, "iscrowd": 0}
                                       for c, m in enumerate(gts)]})
        for m in gts + _random_masks(rng, 4):
            jitter = np.roll(m, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
            dets.append({"image_id": i + 1, "segmentation": _rle(jitter), "score": float(rng.random()),
                         "category_id": int(rng.integers(1, 3))})
    return images, dets


def test_coco_mask_ap_matches_cocoeval(tmp_path):
    images, dets = _mask_problem(0)
    for agnostic in (True, False):
        ours = M.coco_mask_ap(images, dets, class_agnostic=agnostic)
        stats = _cocoeval(*_coco_files(tmp_path, images, dets, agnostic))
        assert [ours["ap"], ours["ap50"], ours["ap75"]] == pytest.approx(list(stats[:3]), abs=1e-12)
    assert M.coco_mask_ap(images, [])["ap"] == 0.0


def test_average_recall_matches_cocoeval_class_agnostic(tmp_path):
    images, dets = _mask_problem(1, n_images=5)
    acc = M.RecallAccumulator(ks=(1, 10, 100))
    for img in images:
        mine = sorted([d for d in dets if d["image_id"] == img["id"]], key=lambda d: -d["score"])
        acc.update(M.mask_iou([d["segmentation"] for d in mine], [a["segmentation"] for a in img["annotations"]]))
    stats = _cocoeval(*_coco_files(tmp_path, images, dets, agnostic=True))
    assert list(acc.result().values()) == pytest.approx(list(stats[6:9]), abs=1e-12)  # AR@1, AR@10, AR@100


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(60) < 0.3
    y[0] = True
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    assert M.average_precision(y, scores) == pytest.approx(skm.average_precision_score(y, scores), abs=1e-12)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_retrieval_ap_matches_sklearn_per_query(exclude_self):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 40)
    feats = rng.normal(size=(40, 8)) + 2 * np.eye(8)[labels]
    ap = M.retrieval_ap(feats, labels, exclude_self=exclude_self)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = unit @ unit.T
    for q in range(40):
        keep = np.arange(40) != q if exclude_self else np.ones(40, bool)
        ref = skm.average_precision_score(labels[keep] == labels[q], sims[q, keep])
        assert ap[q] == pytest.approx(ref, abs=1e-9)


def test_retrieval_query_without_positive_is_nan():
    ap = M.retrieval_ap([[1, 0], [0, 1], [0.2, 1]], ["a", "b", "b"], exclude_self=True)
    assert np.isnan(ap[0]) and ap[1] == ap[2] == 1.0


def test_shape_miou_by_hand_with_empty_part_convention():
    table = M.Contingency().update([1, 1, 1, 2, 2], [1, 1, 2, 2, 2]).table_
    # part 1: I=2, U=3; part 2: I=2, U=3; part 3 absent from both -> 1
    assert M.shape_miou(table, [1, 2, 3]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # part 3 predicted but absent from truth -> 0
    table = M.Contingency().update([1, 1, 2, 2], [1, 1, 3, 3]).table_
    assert M.shape_miou(table, [1, 2, 3]) == pytest.approx((1 + 0 + 0) / 3)
    # discovered ids 7, 9 mapped onto parts 2, 1
    table = M.Contingency().update([1, 1, 2, 2], [9, 9, 7, 7]).table_
    mapping = np.full(10, -1)
    mapping[[7, 9]] = [2, 1]
    assert M.shape_miou(table, [1, 2], mapping) == 1.0


def test_linear_probe_needs_two_classes():
    with pytest.raises(PartkitError, match="single class"):
        M.fit_linear_probe(np.zeros((4, 2)), np.zeros(4))
    model = M.fit_linear_probe(np.array([[0.0], [0.1], [1.0], [1.1]]), [0, 0, 1, 1])
    assert model.predict(np.array([[0.05], [1.05]])).tolist() == [0, 1]
