"""The backbone registry: presets, timm/open_clip sources, weight resolution, offline errors."""
import os

import pytest
import torch

from partkit.errors import PartkitError
from partkit.models import create_backbone, describe, list_backbones

PAPER_PRESETS = ["dino_vits8", "dino_vits16", "dino_vitb8", "dinov2_vits14", "deit_small", "mae_vitb16",
                 "resnet50", "clip_vitb16", "efficientnet_lite0"]


def test_registry_lists_paper_presets():
    assert set(PAPER_PRESETS) <= set(list_backbones())
    assert list_backbones("dino_*") == ["dino_vitb8", "dino_vits16", "dino_vits8"]


@pytest.mark.parametrize("name", sorted(set(PAPER_PRESETS) | {"rgb"}))
def test_every_preset_describes_without_weights(name):
    info = describe(name)
    assert info["num_layers"] >= 1 and info["family"] in ("cnn", "vit", "pixels")
    if name == "efficientnet_lite0":
        assert info["local_weights"].startswith("package:")


def test_efficientnet_lite0_package_weights_match_timm_layout():
    import timm

    bb = create_backbone("efficientnet_lite0")
    assert bb.weights.startswith("package:") and bb.mean == (0.485, 0.456, 0.406)
    # the remapped weights are real: BN statistics are not the init values
    assert not torch.allclose(bb.net.bn1.running_var, torch.ones_like(bb.net.bn1.running_var))
    ref = timm.create_model("tf_efficientnet_lite0")
    assert set(ref.state_dict()) == set(bb.net.state_dict())


def test_offline_hub_error_is_one_line_with_three_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PARTKIT_WEIGHTS_DIR", raising=False)
    with pytest.raises(PartkitError) as e:
        create_backbone("dino_vits16")
    msg = str(e.value)
    assert "\n" not in msg and "dino_vits16" in msg
    assert "--weights FILE" in msg and "PARTKIT_WEIGHTS_DIR" in msg and "online" in msg


def test_unknown_names_suggest_close_matches():
    with pytest.raises(PartkitError, match="did you mean efficientnet_lite0"):
        create_backbone("efficientnet_lite")
    with pytest.raises(PartkitError, match="timm has no model"):
        create_backbone("timm:vit_smoll_patch16_224")


def test_weights_from_file_dir_and_env(tmp_path, monkeypatch):
    bb = create_backbone("timm:vit_tiny_patch16_224", "none")
    torch.nn.init.constant_(bb.net.cls_token, 0.25)
    path = tmp_path / "vit_tiny.pth"
    torch.save({"state_dict": bb.net.state_dict()}, path)
    loaded = create_backbone("timm:vit_tiny_patch16_224", str(path))
    assert loaded.weights == f"file:{path}" and torch.all(loaded.net.cls_token == 0.25)
    monkeypatch.setenv("PARTKIT_WEIGHTS_DIR", str(tmp_path))
    os.rename(path, tmp_path / "timm_vit_tiny_patch16_224.pth")
    assert create_backbone("timm:vit_tiny_patch16_224").weights.startswith("file:")
    with pytest.raises(PartkitError, match="does not exist"):
        create_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(PartkitError, match="cannot read weights file"):
        create_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "bad.pth"))
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(PartkitError, match="does not fit"):
        create_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "other.pth"))


def test_vit_facets_stride_and_saliency_shapes():
    bb = create_backbone("timm:vit_tiny_patch16_224", "none")
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        tok, sal = bb.forward_features(x, [11], facet="token", saliency=True)
        key, _ = bb.forward_features(x, [3, 11], facet="key", stride=8)
    assert tok[0].shape == (2, 192, 4, 6) and sal.shape == (2, 4, 6)
    assert torch.allclose(sal.amax(dim=(1, 2)), torch.ones(2))
    assert [k.shape for k in key] == [(2, 192, 7, 11)] * 2
    # the token facet equals timm's own forward_intermediates at the native stride
    ref = bb.net.forward_intermediates(x, indices=[11], output_fmt="NCHW", intermediates_only=True, norm=False)[0]
    assert torch.allclose(tok[0], ref, atol=1e-5)


def test_open_clip_tower_gives_dense_tokens():
    import open_clip

    open_clip.factory._MODEL_CONFIGS["partkit-test-tiny"] = {
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    bb = create_backbone("open_clip:partkit-test-tiny", "none")
    with torch.inference_mode():
        feats, sal = bb.forward_features(torch.randn(1, 3, 64, 64), [1], facet="value", saliency=True)
    assert feats[0].shape == (1, 64, 4, 4) and sal.shape == (1, 4, 4)


def test_weights_file_carries_its_preprocessing(tmp_path):
    bb = create_backbone("efficientnet_lite0")
    path = tmp_path / "ft.pt"
    torch.save({"backbone": bb.net.state_dict(), "mean": list(bb.mean), "std": list(bb.std)}, path)
    again = create_backbone("efficientnet_lite0", str(path))
    assert again.mean == bb.mean and again.std == bb.std  # not timm's 0.5/0.5 for tf_efficientnet_lite0


# ---- self-supervised checkpoints (MoCo, DetCon) as --weights


def _resnet_sd():
    return {k: v.clone() for k, v in create_backbone("timm:test_resnet", "none").net.state_dict().items()}


def _perturbed(sd, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in sd.items()}


def test_moco_checkpoint_loads_its_query_encoder(tmp_path):
    """MoCo v2: {"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}} with a
    2-layer MLP head in place of fc; the query encoder is loaded, the key encoder and head are not."""
    base = _resnet_sd()
    q, k = _perturbed(base, 1), _perturbed(base, 2)
    sd = {f"module.encoder_q.{n}": v for n, v in q.items() if not n.startswith("fc.")}
    sd.update({f"module.encoder_k.{n}": v for n, v in k.items() if not n.startswith("fc.")})
    width = base["fc.weight"].shape[1]
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(width, width),
               "module.encoder_q.fc.0.bias": torch.zeros(width),
               "module.encoder_q.fc.2.weight": torch.randn(128, width), "module.queue": torch.randn(128, 65536 // 64),
               "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd}, path)
    net = create_backbone("timm:test_resnet", str(path)).net.state_dict()
    for n, v in q.items():
        if not n.startswith("fc."):
            assert torch.equal(net[n], v), n
    first = next(iter(q))
    assert not torch.equal(net[first], k[first])


def test_detcon_checkpoint_loads_its_backbone(tmp_path):
    """DetCon/BYOL-style: {"model": {"backbone.*", "projector.*", "predictor.*"}}."""
    w = _perturbed(_resnet_sd(), 3)
    sd = {f"backbone.{n}": v for n, v in w.items() if not n.startswith("fc.")}
    sd.update({"projector.0.weight": torch.randn(16, 8), "predictor.0.weight": torch.randn(16, 8)})
    path = tmp_path / "detcon.pth"
    torch.save({"model": sd}, path)
    net = create_backbone("timm:test_resnet", str(path)).net.state_dict()
    assert all(torch.equal(net[n], v) for n, v in w.items() if not n.startswith("fc."))


def test_checkpoint_of_another_network_is_refused_with_one_line(tmp_path):
    w = _resnet_sd()
    torch.save({"state_dict": {f"module.encoder_q.{n}": v for n, v in w.items()}}, tmp_path / "resnet.pth")
    with pytest.raises(PartkitError, match="does not fit timm:test_efficientnet") as e:
        create_backbone("timm:test_efficientnet", str(tmp_path / "resnet.pth"))
    assert "\n" not in str(e.value) and "architecture" in str(e.value)
    bad = dict(w)
    bad[next(iter(bad))] = torch.randn(3, 3, 3, 3)  # same name, another shape
    torch.save(bad, tmp_path / "shapes.pth")
    with pytest.raises(PartkitError, match="does not fit timm:test_resnet") as e:
        create_backbone("timm:test_resnet", str(tmp_path / "shapes.pth"))
    assert "\n" not in str(e.value)
