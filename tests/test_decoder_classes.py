"""Class-aware decoder end to end: class lists from targets.json / part_names, C classes + no-part learnt,
predict's category_id and class-id pred_parts.png, self-train --labeled with rank's targets."""
import json

import numpy as np
import pytest
import torch

from partkit.decoder import TrainConfig, predict, train_decoder
from partkit.errors import PartkitError
from partkit.io import Output, decode_json, decode_label_map, encode_json, encode_png
from partkit.selftrain import SelfTrainer
from conftest import read_shard, write_shard
from test_decoder import SMALL, _synthetic

# planted classes: the synthetic layout's ids 1, 2, 3 renamed as rank would number them
RANK_IDS = {1: 9, 2: 17, 3: 26}
RANK_NAMES = {9: "car/0", 17: "car/0b", 26: "car/1"}


def _with_classes(n, seed=0, kind="targets"):
    """_synthetic samples plus a class-naming label map: targets.png + targets.json (rank apply
    --as-targets' format) or gt_parts.png with json part_names."""
    out = []
    for s in _synthetic(n, seed=seed):
        labels = decode_label_map(s, "parts.png")
        if kind == "targets":
            ids = np.vectorize(lambda i: RANK_IDS.get(int(i), 0))(labels).astype(np.uint8)
            s["targets.png"] = encode_png(np.kron(ids, np.ones((8, 8), np.uint8)))
            s["targets.json"] = encode_json({"classes": {str(k): v for k, v in RANK_NAMES.items()}, "background": 0,
                                             "id_scheme": "class_index * k + cluster + 1", "model": "rank.npz"})
        else:
            s["json"] = encode_json({"width": 64, "height": 64, "part_names": {"1": "top", "2": "left",
                                                                                "3": "right"}})
        out.append(s)
    return out


def _tc(steps):
    return TrainConfig(max_steps=steps, batch_size=2, warmup=2, lr=3e-3, crop_grid=8, num_points=64, log_every=10,
                       checkpoint_every=steps)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classes")
    shard = write_shard(tmp / "train.tar", _with_classes(8))
    train_decoder([shard], str(tmp / "run"), field="targets.png", decoder=SMALL, train=_tc(15), seed=0)
    return tmp, shard


def test_targets_json_classes_are_learnt_and_recorded(class_run):
    tmp, shard = class_run
    cfg = json.load(open(tmp / "run" / "config.json"))
    assert cfg["decoder"]["num_classes"] == 3
    assert cfg["decoder"]["classes"] == [[9, "car/0"], [17, "car/0b"], [26, "car/1"]]
    ckpt = torch.load(tmp / "run" / "last.pt", weights_only=False)
    assert ckpt["decoder_config"]["classes"] == cfg["decoder"]["classes"]
    assert ckpt["model"]["class_head.weight"].shape[0] == 4  # 3 classes + no-part


def test_predict_writes_classes_and_class_id_label_maps(class_run):
    tmp, _ = class_run
    held_out = write_shard(tmp / "test.tar", _with_classes(4, seed=5))  # unseen layouts
    predict([held_out], str(tmp / "run"), topk=8, label_map=True, output=Output(str(tmp / "pred")))
    agree, total = 0, 0
    for s in read_shard(tmp / "pred" / "000000.tar"):
        doc = decode_json(s, "proposals.json")
        assert doc["class_aware"] and doc["classes"] == {"9": "car/0", "17": "car/0b", "26": "car/1"}
        for p in doc["proposals"]:
            assert RANK_NAMES[p["category_id"]] == p["category"]
        gt = decode_label_map(s, "targets.png")
        pred = decode_label_map(s, "pred_parts.png")
        assert set(np.unique(pred)) <= {0, 9, 17, 26}  # class ids, the same in every image
        # the best proposal of each planted class carries that class and covers it
        for cid in (9, 17, 26):
            best = max((p for p in doc["proposals"] if p["category_id"] == cid), key=lambda p: p["score"],
                       default=None)
            assert best is not None, f"no proposal of class {cid}"
        on = gt > 0
        agree += int((pred[on] == gt[on]).sum())
        total += int(on.sum())
    assert agree / total > 0.8, agree / total  # pixels labelled with their planted class across images


def test_gt_parts_part_names_make_a_class_aware_decoder(tmp_path):
    shard = write_shard(tmp_path / "train.tar", _with_classes(4, kind="names"))
    train_decoder([shard], str(tmp_path / "run"), field="gt_parts.png", decoder=SMALL, train=_tc(2), seed=0)
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["decoder"]["classes"] == [[1, "top"], [2, "left"], [3, "right"]]
    train_decoder([shard], str(tmp_path / "agn"), field="gt_parts.png", decoder=SMALL, train=_tc(2), seed=0,
                  class_aware=False)
    assert json.load(open(tmp_path / "agn" / "config.json"))["decoder"]["classes"] is None
    with pytest.raises(PartkitError, match="needs a class list"):  # cluster ids name no classes
        train_decoder([shard], str(tmp_path / "x"), field="parts.png", decoder=SMALL, train=_tc(2), class_aware=True)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_class_agnostic_predict_ids_are_proposal_ids(tmp_path):
    shard = write_shard(tmp_path / "train.tar", _synthetic(2))
    train_decoder([shard], str(tmp_path / "run"), decoder=SMALL, train=_tc(2), seed=0)
    predict([shard], str(tmp_path / "run"), topk=5, label_map=True, output=Output(str(tmp_path / "pred")))
    for s in read_shard(tmp_path / "pred" / "000000.tar"):
        doc = decode_json(s, "proposals.json")
        assert not doc["class_aware"] and all("category_id" not in p for p in doc["proposals"])
        assert set(np.unique(decode_label_map(s, "pred_parts.png"))) <= {0} | {p["id"] for p in doc["proposals"]}


def test_self_train_labeled_targets_with_class_agnostic_teacher(class_run, tmp_path):
    _, shard = class_run
    write_shard(tmp_path / "agn.tar", _synthetic(4))
    train_decoder([str(tmp_path / "agn.tar")], str(tmp_path / "teacher"), decoder=SMALL, train=_tc(2), seed=0)
    kw = dict(labeled=[shard], labeled_field="targets.png", train=_tc(2), seed=0)
    with pytest.raises(PartkitError, match="cannot carry the student's classes"):
        SelfTrainer([shard], str(tmp_path / "st0"), str(tmp_path / "teacher"), unsup_weight=2.0, **kw)
    st = SelfTrainer([shard], str(tmp_path / "st"), str(tmp_path / "teacher"), unsup_weight=0.0,
                     student_init="teacher", **kw)
    assert st.dcfg.classes == [[9, "car/0"], [17, "car/0b"], [26, "car/1"]]
    t = torch.load(tmp_path / "teacher" / "last.pt", weights_only=False)["model"]
    s = st.net.state_dict()
    assert torch.equal(s["mask_head.0.weight"], t["mask_head.0.weight"])  # all but the class head copied
    assert s["class_head.weight"].shape[0] == 4 and t["class_head.weight"].shape[0] == 2
    st.fit()
    cfg = json.load(open(tmp_path / "st" / "config.json"))
    assert cfg["decoder"]["num_classes"] == 3


def test_pseudo_labels_keep_the_teachers_class(class_run, tmp_path):
    tmp, shard = class_run
    st = SelfTrainer([shard], str(tmp_path / "st"), str(tmp / "run"), score_threshold=0.0, min_mask_area=0,
                     train=_tc(2), seed=0)
    assert st.dcfg.num_classes == 3  # no --labeled: the teacher's classes
    xw, _, objects = st._views(st.batch(0))
    targets = st.pseudo_labels(xw, objects)
    out = st.teacher(xw)
    probs = out["pred_logits"].softmax(-1)[..., :-1]
    assert torch.equal(targets[0]["labels"], probs[0].argmax(-1))  # every query kept, with its argmax class
    assert set(torch.cat([t["labels"] for t in targets]).tolist()) <= {0, 1, 2}


def test_predict_semantic_label_rule_and_object_masks(class_run, tmp_path):
    """--label-rule semantic is Mask2Former's semantic inference (checked against the sum written out here);
    --objects-from zeroes pred_parts.png outside the objects; a class-agnostic decoder refuses semantic."""
    from partkit import fields
    from partkit.decoder.predict import load_decoder, masks_to_image

    tmp, _ = class_run
    samples = _with_classes(2, seed=7)
    for s in samples:  # the object: the top half of the image only
        obj = np.zeros((64, 64), np.uint8)
        obj[:32] = 1
        s["gt_parts.png"] = encode_png(obj)
    held_out = write_shard(tmp_path / "test.tar", samples)
    predict([held_out], str(tmp / "run"), topk=8, label_map=True, label_rule="semantic",
            output=Output(str(tmp_path / "sem")))
    predict([held_out], str(tmp / "run"), topk=8, label_map=True, label_rule="semantic", objects_from="gt_parts",
            output=Output(str(tmp_path / "semobj")))
    net, _ = load_decoder(str(tmp / "run"), "cpu")
    ids = np.array([i for i, _ in net.cfg.classes])
    for s, o in zip(read_shard(tmp_path / "sem" / "000000.tar"), read_shard(tmp_path / "semobj" / "000000.tar")):
        feat, meta = fields.features(s, require_geometry=True)
        with torch.inference_mode():
            out = net(torch.from_numpy(feat.astype(np.float32))[None])
            p = out["pred_logits"][0].softmax(-1)[:, :-1].numpy()
            m = masks_to_image(out["pred_masks"][0].float(), meta).sigmoid().numpy()
        expected = ids[np.tensordot(p, m, axes=(0, 0)).argmax(0)]
        assert np.array_equal(decode_label_map(s, "pred_parts.png"), expected)
        inside = decode_label_map(o, "pred_parts.png")
        assert np.array_equal(inside[:32], expected[:32]) and not inside[32:].any()
    agn = write_shard(tmp_path / "agn.tar", _synthetic(2))
    train_decoder([agn], str(tmp_path / "agn_run"), decoder=SMALL, train=_tc(1), seed=0)
    with pytest.raises(PartkitError, match="needs a class-aware decoder"):
        predict([agn], str(tmp_path / "agn_run"), label_map=True, label_rule="semantic",
                output=Output(str(tmp_path / "x")))
