"""partkit detect: a registry detector (torchvision COCO Mask R-CNN) to gt_objects.json instances.

Offline, the model runs with random weights (``--weights none``) on tiny images: the checks are on
the conversion (order, mask threshold, RLE, boxes, the gt_objects format other stages read), made
against torchvision's own output for the same seed; without weights the error is the registry's.
"""
import numpy as np
import pytest

from conftest import invoke, one_error_line, read_shard
from partkit import fields
from partkit.detect import _objects
from partkit.errors import PartkitError
from partkit.io import decode_json, encode_json
from partkit.io.codecs import encode_image_png
from partkit.models import create_backbone, list_backbones, list_detectors
from partkit.models.detector import Detections

TINY = ["--weights", "none", "--size", "64", "--max-size", "64", "--max-detections", "4", "--rpn-proposals", "50",
        "--score-threshold", "0"]


def _images():
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(((48, 64), (40, 40))):
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        rgb[h // 4:3 * h // 4, w // 4:3 * w // 4] = (200, 30, 30)  # a red block
        out.append({"__key__": f"im{i}", "png": encode_image_png(rgb),
                    "json": encode_json({"height": h, "width": w}),
                    "gt_objects.json": encode_json({"objects": []})})
    return out, rng


def test_registry_knows_the_detectors_apart_from_backbones():
    assert list_detectors() == ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
    assert not set(list_detectors()) & set(list_backbones())
    with pytest.raises(PartkitError, match="instance-segmentation detector, not a feature backbone.*partkit detect"):
        create_backbone("maskrcnn_resnet50_fpn_v2")


def test_detect_random_weights_writes_the_gt_objects_format(tmp_path, shard_factory):
    import torch
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2

    samples, _ = _images()
    shard = shard_factory(samples)
    # The field exists already (pack --coco): refused, naming the way out, nothing written.
    res = invoke(["--device", "cpu", "detect", shard, *TINY, "-o", tmp_path / "refused"])
    one_error_line(res, "already has 'gt_objects.json'", "--field det_objects.json")
    assert not (tmp_path / "refused" / "000000.tar").exists()

    res = invoke(["--device", "cpu", "--seed", "0", "detect", shard, *TINY, "--field", "det_objects.json",
                  "-o", tmp_path / "det"])
    assert res.exit_code == 0, res.stderr
    out = read_shard(tmp_path / "det" / "000000.tar")
    assert [s["__key__"] for s in out] == ["im0", "im1"]

    # The same network and seed straight from torchvision: the reference for every instance.
    torch.manual_seed(0)
    ref_net = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, box_score_thresh=0.0, min_size=64,
                                       max_size=64, box_detections_per_img=4, rpn_pre_nms_top_n_test=50,
                                       rpn_post_nms_top_n_test=50).eval()
    cats = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
    for s, src in zip(out, samples):
        assert s["gt_objects.json"] == src["gt_objects.json"] and s["png"] == src["png"]  # passed through
        rgb = fields.image(s)
        H, W = rgb.shape[:2]
        doc = decode_json(s, "det_objects.json")
        assert doc["model"] == "maskrcnn_resnet50_fpn_v2" and doc["weights"] == "none"
        objs, masks = fields.objects_from(s, "gt_objects", (H, W), field="det_objects.json")  # as rank/cluster read
        with torch.inference_mode():
            ref = ref_net([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])[0]
        order = torch.argsort(ref["scores"], descending=True, stable=True)
        ref_masks = (ref["masks"][order, 0] > 0.5).numpy()
        nonempty = ref_masks.reshape(len(ref_masks), -1).any(1)
        assert len(objs) == int(nonempty.sum()) >= 1 and doc["empty_masks"] == int((~nonempty).sum())
        np.testing.assert_array_equal(masks, ref_masks[nonempty])
        labels = ref["labels"][order].numpy()[nonempty]
        scores = ref["scores"][order].numpy()[nonempty]
        boxes = ref["boxes"][order].numpy()[nonempty]
        assert [o["id"] for o in objs] == list(range(1, len(objs) + 1))
        assert [o["category_id"] for o in objs] == labels.tolist()
        assert [o["category"] for o in objs] == [cats[i] for i in labels]
        np.testing.assert_allclose([o["score"] for o in objs], scores, rtol=1e-5)
        assert [o["score"] for o in objs] == sorted((o["score"] for o in objs), reverse=True)
        for o, m, b in zip(objs, masks, boxes):
            assert o["area"] == int(m.sum()) and o["iscrowd"] == 0
            np.testing.assert_allclose(o["bbox"], [b[0], b[1], b[2] - b[0], b[3] - b[1]], rtol=1e-5, atol=1e-4)


def test_class_filter_and_empty_masks():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True
    masks[2, 2:] = True  # masks[1] is empty
    found = Detections(masks, np.array([[0, 0, 4, 2], [0, 0, 1, 1], [0, 2, 4, 4]], float), np.array([3, 3, 1]),
                       ["car", "car", "person"], np.array([0.9, 0.8, 0.7]))
    objs, empty = _objects(found, None)
    assert [o["category"] for o in objs] == ["car", "person"] and empty == 1 and objs[1]["id"] == 2
    objs, empty = _objects(found, {1})
    assert [(o["id"], o["category"], o["area"]) for o in objs] == [(1, "person", 8)] and empty == 0
    assert objs[0]["bbox"] == [0.0, 2.0, 4.0, 2.0]


def test_user_errors_are_one_line(tmp_path, shard_factory, monkeypatch):
    samples, _ = _images()
    shard = shard_factory([{k: v for k, v in s.items() if k != "gt_objects.json"} for s in samples])
    # No weights here (empty torch hub cache, no $PARTKIT_WEIGHTS_DIR) and no network: the registry's error.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("PARTKIT_WEIGHTS_DIR", raising=False)
    res = invoke(["--device", "cpu", "detect", shard, "-o", tmp_path / "o"])
    one_error_line(res, "no weights for 'maskrcnn_resnet50_fpn_v2'", "torchvision", "--weights none")
    assert not (tmp_path / "o").exists()
    res = invoke(["detect", shard, "--weights", "COCO_V9"])
    one_error_line(res, "no torchvision weights 'COCO_V9'", "COCO_V1")
    res = invoke(["detect", shard, "--model", "efficientnet_lite0"])
    one_error_line(res, "feature backbone, not a detector", "maskrcnn_resnet50_fpn_v2")
    res = invoke(["--device", "cpu", "detect", shard, *TINY, "--classes", "cars"])
    one_error_line(res, "no category 'cars'", "did you mean car")
    res = invoke(["detect", shard, "--score-threshold", "1.5"])
    one_error_line(res, "--score-threshold must be in [0, 1)")
