"""PARTICLE part-contrastive fine-tuning (``partkit.contrast``).

Measured on the shared CIHP images (5 images; EfficientNet-Lite0 package weights; one round of
8 epochs = 16 steps, batch 4, 128 px views, k = 25, the contrast on the 1280-channel head map;
one CPU thread, ~10 s on a shared machine): the loss on the fixed probe views falls from 2.982 to
2.085. Mean per-image NMI of k-means (k = 20, 128 px) against the CIHP part labels: 0.387 with the
initial backbone, 0.366 fine-tuned -- 5 images and 16 steps are far too few for a real gain, so the
test reports both and checks only that the run learns and is reproducible.
"""
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import ROOT, read_shard
from partkit import contrast
from partkit.contrast import make_views, mask_pool, part_contrast, part_contrast_loss, part_masks
from partkit.errors import PartkitError
from partkit.models import create_backbone
from partkit.models import load_state_dict

# 5 images, batch 3: 2 steps per epoch; round 1 = 2 epochs (4 steps), rounds 2 and 3 = 1 epoch (2 steps)
TINY = dict(rounds=3, epochs=2, round_epochs=1, batch_size=3, size=64, k=8, lr=0.01, round_lr=0.03, min_lr=0.001,
            warmup=1, device="cpu", log_every=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # on a shared 2-core machine, two OpenMP threads contend with other processes: one is ~5x faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cihp_shard(cihp_dir, tmp_path_factory):
    from partkit.io import Output
    from partkit.pack import pack

    out = tmp_path_factory.mktemp("cihp")
    pack([str(cihp_dir / "images")], labels=str(cihp_dir / "labels"), output=Output(str(out)))
    return str(out / "000000.tar")


@pytest.fixture(scope="module")
def full_run(cihp_shard, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    part_contrast([cihp_shard], out, **TINY)
    return out


@pytest.fixture(scope="module")
def one_step(cihp_shard, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "stopped")
    part_contrast([cihp_shard], out, stop_at=1, **TINY)
    return out


def _backbone_sd(run):
    return load_state_dict(f"{run}/backbone.pt")


def _metrics(run):
    with open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- the loss, mask pooling and views


def test_loss_matches_eq3_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    q1, t1, q2, t2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    tau = 0.1

    def eq3(q, t):  # PARTICLE Eq. 3, one term per part, latents scaled to norm 1/sqrt(tau)
        v = [row / row.norm() / math.sqrt(tau) for row in q]
        w = [row / row.norm() / math.sqrt(tau) for row in t]
        total = 0.0
        for m in range(len(v)):
            pos = math.exp(float(v[m] @ w[m]))
            neg = sum(math.exp(float(v[m] @ w[n])) for n in range(len(w)) if n != m)
            total += -math.log(pos / (pos + neg))
        return total / len(v)

    expected = 0.5 * (eq3(q1, t2) + eq3(q2, t1))
    got = float(part_contrast_loss(q1, t1, q2, t2, tau))
    assert got == pytest.approx(expected, abs=1e-5)
    # aligned, well-separated latents give a loss near 0
    eye = torch.eye(5, 8)
    assert float(part_contrast_loss(eye, eye, eye, eye, tau)) < 1e-3


def test_mask_pool_is_the_average_under_each_mask():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    masks = part_masks(labels, 3, cell=2)  # 8x8 pixels -> 4x4 cells, fractions per cell
    assert torch.allclose(masks.sum(1), torch.ones(2, 4, 4))
    pooled = mask_pool(feats, masks)
    b, kk = 1, 2
    w = masks[b, kk]
    assert torch.allclose(pooled[b, kk], (feats[b] * w).sum((1, 2)) / w.sum(), atol=1e-6)


def test_views_carry_the_part_map_through_crop_and_flip(monkeypatch):
    # an image whose red channel encodes the part id of its feature cell: after the view the
    # labels must still name the colour under each pixel (colour augmentations switched off)
    monkeypatch.setattr(contrast, "_colour", lambda img, gen, blur, sol: img)
    cell, h, w = 8, 48, 64
    grid = torch.arange((h // cell) * (w // cell)).view(h // cell, w // cell)
    red = grid.repeat_interleave(cell, 0).repeat_interleave(cell, 1) * 5
    rgb = torch.stack([red, torch.zeros_like(red), torch.zeros_like(red)]).to(torch.uint8)
    x1, x2, l1, l2 = make_views([rgb] * 4, [grid] * 4, cell=cell, size=32, mean=(0, 0, 0), std=(1, 1, 1),
                                gen=torch.Generator().manual_seed(3))
    assert x1.shape == (4, 3, 32, 32) and l1.shape == (4, 32, 32)
    for x, lab in ((x1, l1), (x2, l2)):
        wrong = torch.round(x[:, 0] * 255 / 5) != lab
        # resampling blurs colours only next to part borders (a 5x5 window holding two ids)
        lf = lab[:, None].float()
        border = (F.max_pool2d(lf, 5, 1, 2) != -F.max_pool2d(-lf, 5, 1, 2))[:, 0]
        assert not (wrong & ~border).any() and wrong.float().mean() < 0.2
    assert not torch.equal(l1, l2)  # the two views differ


# ---- training runs


def test_run_writes_outputs_and_two_runs_are_identical(full_run, cihp_shard, tmp_path):
    for name in ("backbone.pt", "config.json", "metrics.jsonl", "loss.png", "last.pt"):
        assert os.path.isfile(f"{full_run}/{name}"), name
    rows = _metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 9)) and [r["round"] for r in rows] == [1] * 4 + [2, 2, 3, 3]
    assert all(math.isfinite(r["loss"]) and r["parts"] > 0 for r in rows)
    assert [i for i, r in enumerate(rows) if "probe" in r] == [3, 5, 7]  # the end of each round
    config = json.load(open(f"{full_run}/config.json"))
    assert config["objective"] == "part-contrast" and config["k"] == 8 and config["layers"] == [2, 3, 4]
    assert config["contrast_channels"] == 1280 and config["optimizer"] == "sgd"  # EfficientNet's head, SGD
    again = str(tmp_path / "again")
    part_contrast([cihp_shard], again, **TINY)
    _assert_same_weights(_backbone_sd(full_run), _backbone_sd(again))
    assert _metrics(again) == rows


def test_momentum_encoder_is_the_ema_after_one_step(one_step):
    m = 0.996
    state = torch.load(f"{one_step}/last.pt", map_location="cpu", weights_only=False)["model"]
    start = create_backbone("efficientnet_lite0").net.state_dict()  # online = target before the step
    moved = 0
    for key, theta0 in start.items():
        if not theta0.is_floating_point() or "running" in key:
            continue
        online, target = state[f"backbone.net.{key}"], state[f"target.backbone.net.{key}"]
        assert torch.allclose(target, m * theta0 + (1 - m) * online, atol=1e-6, rtol=1e-5), key
        moved += int(not torch.equal(online, theta0))
    assert moved > 10  # the step changed the online weights, so the check is not vacuous


def test_resume_continues_exactly(one_step, full_run, cihp_shard, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(one_step, resumed)
    with pytest.raises(PartkitError, match="--resume"):
        part_contrast([cihp_shard], resumed, **TINY)  # an existing run needs --resume
    with pytest.raises(PartkitError, match="--lr"):
        part_contrast([cihp_shard], resumed, resume=True, **{**TINY, "lr": 0.1})
    state = torch.load(f"{resumed}/last.pt", map_location="cpu", weights_only=False)
    # the checkpoint holds the round and the stream position (one batch of 3 read), not the part maps:
    # those are the round's shard in the run folder
    assert state["step"] == 1 and state["round"] == 1 and state["loader"] == 3 and "labels" not in state
    assert sorted(p.name for p in (tmp_path / "resumed").glob("parts-round*.tar")) == ["parts-round1.tar"]
    with pytest.raises(PartkitError, match="--round-lr"):
        part_contrast([cihp_shard], resumed, resume=True, **{**TINY, "round_lr": 0.1})
    part_contrast([cihp_shard], resumed, resume=True, **TINY)
    _assert_same_weights(_backbone_sd(full_run), _backbone_sd(resumed))
    assert _metrics(resumed) == _metrics(full_run)
    a = torch.load(f"{full_run}/last.pt", map_location="cpu", weights_only=False)
    b = torch.load(f"{resumed}/last.pt", map_location="cpu", weights_only=False)
    _assert_same_weights(a["model"], b["model"])  # projector, predictor and momentum encoder too
    assert a["loader"] == b["loader"] == 6  # rounds 2 and 3: 2 steps x 3 images of the round's stream
    for run in (full_run, resumed):  # only the last round's part maps are kept
        assert sorted(p.name for p in __import__("pathlib").Path(run).glob("parts-round*.tar")) == ["parts-round3.tar"]
    assert read_shard(f"{full_run}/parts-round3.tar") == read_shard(f"{resumed}/parts-round3.tar")


def test_weights_load_back_through_the_registry_and_extract(full_run, cihp_shard, tmp_path):
    saved = _backbone_sd(full_run)
    package = create_backbone("efficientnet_lite0").net.state_dict()
    assert any(not torch.equal(saved[k], package[k]) for k in saved)
    for weights in (full_run, f"{full_run}/backbone.pt"):
        net = create_backbone("efficientnet_lite0", weights)
        assert net.weights == f"file:{full_run}/backbone.pt"
        _assert_same_weights({k: v for k, v in net.net.state_dict().items()}, saved)
    runner = CliRunner()
    feats = {}
    for name, extra in (("tuned", ["--weights", f"{full_run}/backbone.pt"]), ("package", [])):
        result = runner.invoke(app, ["extract", cihp_shard, "--model", "efficientnet_lite0", "--size", "64",
                                     "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.stderr
        samples = read_shard(str(tmp_path / name / "000000.tar"))
        assert len(samples) == 5
        feats[name] = samples[0]["feat.npy"]
    assert b"backbone.pt" in read_shard(str(tmp_path / "tuned" / "000000.tar"))[0]["feat.json"]
    assert feats["tuned"] != feats["package"]


def _nmi(backbone, shard, size=128, k=20) -> float:
    """Mean per-image NMI of k-means on the backbone's features against the CIHP part labels."""
    from partkit.kmeans import batched_kmeans
    from partkit.extract import FeatureExtractor
    from partkit.grid import sample_on_grid
    from partkit.io import decode_image, decode_label_map, iter_samples
    from partkit.metrics import nmi_score

    fx = FeatureExtractor(backbone, size=size, device="cpu")
    problems, truth = [], []
    for sample in iter_samples([shard]):
        x, geom = fx.preprocess(decode_image(sample))
        with torch.inference_mode():
            f = fx.forward(x[None])[0][0]
        gh, gw = fx.valid_grid(geom, f.shape[-2:])
        problems.append(f[:, :gh, :gw].reshape(f.shape[0], -1).T.numpy())
        meta = {**geom, "grid": [gh, gw], "stride": fx.cell}
        truth.append(sample_on_grid(decode_label_map(sample, "gt_parts.png"), meta).ravel())
    results = batched_kmeans(problems, k, metric="cosine", random_state=0)
    return float(np.mean([nmi_score(t, r.labels) for t, r in zip(truth, results)]))


def test_one_round_on_cihp_lowers_the_loss_and_reports_nmi(cihp_shard, tmp_path, capsys):
    out = str(tmp_path / "quality")
    result = part_contrast([cihp_shard], out, rounds=1, epochs=8, warmup=1, batch_size=4, size=128,
                           device="cpu")  # 2 steps per epoch
    losses = result["losses"]
    assert result["k"] == 25 and len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    start, end = _metrics(out)[-1]["probe"]
    assert end < start  # the loss on fixed views fell during the round
    backbone = create_backbone("efficientnet_lite0")
    before = _nmi(backbone, cihp_shard)
    backbone.net.load_state_dict(_backbone_sd(out))  # keep the package's preprocessing
    after = _nmi(backbone, cihp_shard)
    with capsys.disabled():
        print(f"\npart-contrast on CIHP: probe loss {start:.3f} -> {end:.3f}; "
              f"NMI initial {before:.3f}, fine-tuned {after:.3f}")
    assert 0.2 < before < 0.7 and 0.2 < after < 0.7


def test_tiny_vit_discovers_on_keys_and_adds_the_dino_loss(cihp_shard, tmp_path):
    out = str(tmp_path / "vit")
    name = "timm:vit_tiny_patch16_224"
    opts = dict(model=name, weights="none", rounds=1, epochs=1, batch_size=2, size=64, proj_hidden=64, dino_out_dim=32,
                device="cpu", log_every=1)
    result = part_contrast([cihp_shard], out, **opts)
    assert result["k"] == 6 and all(math.isfinite(v) for v in result["losses"])
    config = json.load(open(f"{out}/config.json"))
    # the paper's ViT setting: parts from last-layer keys, AdamW, wd 0.4, DINO with equal weight
    assert config["facet"] == "key" and config["cell"] == 16 and config["optimizer"] == "adamw"
    assert config["weight_decay"] == 0.4 and config["dino_weight"] == 1.0 and config["clip_grad"] == 3.0
    rows = _metrics(out)
    assert len(rows) == 3  # 5 images, batch 2
    for r in rows:  # the total is contrast + 1 x DINO; DINO's teacher temperature starts at 0.04
        assert r["loss"] == pytest.approx(r["contrast"] + r["dino"], rel=1e-5) and r["dino"] > 0
        assert r["teacher_temp"] == pytest.approx(0.04)
    assert rows[0]["momentum"] == pytest.approx(0.996) and rows[0]["momentum"] < rows[-1]["momentum"] < 1.0
    net = create_backbone(name, out)
    _assert_same_weights(dict(net.net.state_dict()), _backbone_sd(out))
    state = torch.load(f"{out}/last.pt", map_location="cpu", weights_only=False)["model"]
    assert state["center"].abs().sum() > 0  # DINO's centre moved
    assert torch.equal(state["head.last_g"], torch.ones(32, 1))  # last layer frozen in the first epoch
    resumed = str(tmp_path / "vit_resumed")  # exact resume with AdamW, the DINO head, centre and temperatures
    part_contrast([cihp_shard], resumed, stop_at=2, **opts)
    part_contrast([cihp_shard], resumed, resume=True, **opts)
    again = torch.load(f"{resumed}/last.pt", map_location="cpu", weights_only=False)["model"]
    _assert_same_weights(state, again)
    assert _metrics(resumed) == rows


# ---- what is contrasted, the schedule, the warm start


def _pooled_features(net, x1, x2, l1, l2, monkeypatch):
    seen = []
    real = contrast.mask_pool
    monkeypatch.setattr(contrast, "mask_pool", lambda f, m: seen.append(f.detach().clone()) or real(f, m))
    net(x1, x2, l1, l2)
    return seen


@pytest.mark.parametrize("name,last", [("efficientnet_lite0", "bn2"), ("timm:vit_tiny_patch16_224", "norm")])
def test_contrast_pools_the_last_feature_map(name, last, monkeypatch):
    """Parts are pooled on the map before global pooling (EfficientNet: the head's conv + BN + act, 1280
    channels at stride 32) or on a ViT's output patch tokens after the final norm -- not on the
    hypercolumn / keys that discover the parts."""
    from partkit.contrast import PartContrastNet

    backbone = create_backbone(name, None if name == "efficientnet_lite0" else "none").eval()
    net = PartContrastNet(backbone, 4, proj_hidden=32, proj_dim=16).eval()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    l1 = torch.randint(0, 4, (2, 64, 64), generator=g)
    l2 = torch.randint(0, 4, (2, 64, 64), generator=g)
    hooked = []
    module = getattr(backbone.net, last)
    handle = module.register_forward_hook(lambda m, i, o: hooked.append(o.detach().clone()))
    try:
        seen = _pooled_features(net, x1, x2, l1, l2, monkeypatch)
    finally:
        handle.remove()
    online = seen[0]  # the online branch pools first, on both views
    assert online.shape[0] == 4
    expected = hooked[0]
    if name == "efficientnet_lite0":
        assert online.shape == (4, 1280, 2, 2)  # timm's bn2 is BatchNormAct2d: the activated head output
        assert torch.allclose(online, expected, atol=1e-5)
    else:
        tokens = expected[:, backbone.prefix:]  # B x N x C after the final norm
        assert online.shape == (4, 192, 4, 4)
        assert torch.allclose(online, tokens.transpose(1, 2).reshape(4, 192, 4, 4), atol=1e-5)


def test_cell_masks_take_the_majority_part_of_each_cell():
    from partkit.contrast import cell_masks

    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = torch.tensor([[1, 1], [1, 2]])  # top-left cell: 3 of 4 pixels are part 1
    labels[0, 2:, 2:] = 3
    m = cell_masks(labels, 4, (2, 2))
    assert m.shape == (1, 4, 2, 2) and torch.equal(m.sum(1), torch.ones(1, 2, 2))
    assert m[0, 1, 0, 0] == 1 and m[0, 2].sum() == 0 and m[0, 3, 1, 1] == 1 and m[0, 0, 0, 1] == 1


def test_schedule_first_stage_then_rounds_with_their_own_learning_rates(full_run):
    """The lr of every step, from metrics.jsonl, against the schedule written out by hand: round 1
    (2 epochs x 2 steps) warms up over 1 epoch to --lr 0.01 then decays along a cosine to --min-lr;
    rounds 2 and 3 (1 epoch each) do the same with --round-lr 0.03."""
    rows = _metrics(full_run)
    lr, round_lr, low = 0.01, 0.03, 0.001

    def cos(peak, t):
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * t))

    expected = [lr * 1 / 2, lr * 2 / 2, cos(lr, 0 / 2), cos(lr, 1 / 2),  # round 1: warm-up 2 steps, then 2 steps
                round_lr, cos(round_lr, 0.0), round_lr, cos(round_lr, 0.0)]  # rounds 2, 3: warm-up 1 step, then 1
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-9)
    config = json.load(open(f"{full_run}/config.json"))
    assert [(p["round"], p["start"], p["steps"], p["lr"], p["warmup"]) for p in config["phases"]] == \
        [(1, 0, 4, 0.01, 2), (2, 4, 2, 0.03, 1), (3, 6, 2, 0.03, 1)]
    assert all(r["momentum"] == 0.996 for r in rows)  # CNN: a constant EMA decay, as PARTICLE's code


def test_cnn_defaults_are_the_papers():
    from partkit.contrast import FAMILY_DEFAULTS

    cnn, vit = FAMILY_DEFAULTS["cnn"], FAMILY_DEFAULTS["vit"]
    assert (cnn["optimizer"], cnn["lr"], cnn["weight_decay"], cnn["batch_size"], cnn["epochs"]) == \
        ("sgd", 0.005, 1.5e-6, 320, 600)
    assert (cnn["round_epochs"], cnn["round_lr"], cnn["momentum"], cnn["tau"], cnn["k"]) == (20, 0.05, 0.996, 0.1, 25)
    assert (vit["optimizer"], vit["lr"], vit["weight_decay"], vit["batch_size"], vit["epochs"]) == \
        ("adamw", 1e-7, 0.4, 64, 100)
    assert (vit["round_epochs"], vit["round_lr"], vit["dino_weight"], vit["facet"]) == (60, 1e-8, 1.0, "key")


def test_later_rounds_continue_the_previous_partition(cihp_shard):
    """Warm start from the partition (Sec. 6.3): with unchanged features, k-means started from a
    converged partition stays there, ids included; from a shuffled partition it moves back to
    a k-means fixed point while keeping ids (each new part overlaps its old id most)."""
    from partkit.contrast import _resized, discover_parts
    from partkit.extract import FeatureExtractor
    from partkit.io import decode_image, iter_samples

    fx = FeatureExtractor(create_backbone("efficientnet_lite0"), size=64, device="cpu")
    images = [_resized(fx, decode_image(s)) for s in iter_samples([cihp_shard])]
    first, inertia = discover_parts(fx, images, 6, seed=0)
    again, inertia2 = discover_parts(fx, images, 6, prev=first, seed=123)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and sum(inertia2) == pytest.approx(sum(inertia),
                                                                                                     rel=1e-6)
    fresh, _ = discover_parts(fx, images, 6, seed=123)  # k-means++ with another seed: other ids
    assert not all(np.array_equal(a, b) for a, b in zip(first, fresh))
    # image i of the round is seeded (seed, i) whatever the batches: two batches give the one-batch result
    halves = discover_parts(fx, images[:2], 6, seed=0)[0] + discover_parts(fx, images[2:], 6, seed=0, first=2)[0]
    assert all(np.array_equal(a, b) for a, b in zip(first, halves))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun ships with torch")
def test_ddp_two_cpu_processes(cihp_shard, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text("import sys, torch\ntorch.set_num_threads(1)\nfrom partkit.contrast import part_contrast\n"
                      "part_contrast([sys.argv[1]], sys.argv[2], model='timm:test_efficientnet', weights='none', "
                      "rounds=1, epochs=1, batch_size=2, size=64, k=6, device='cpu', log_every=1)\n"
                      # the process group is gone before exit, and no DDP wrapper still holds it (a group
                      # destroyed while the interpreter shuts down can abort the process)
                      "import gc\nfrom torch.nn.parallel import DistributedDataParallel as DDP\n"
                      "assert not torch.distributed.is_initialized()\n"
                      "assert not any(isinstance(o, DDP) for o in gc.get_objects()), 'a DDP wrapper outlived the run'\n")
    cmd = f"torchrun --nproc_per_node=2 --master_port=29547 {script} {cihp_shard} {tmp_path}/run"
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["config"]["world"] == 2
    assert len(read_shard(str(tmp_path / "run" / "parts-round1.tar"))) == 5  # rank 0 wrote it, both ranks read it
    assert ckpt["loader"] == [4, 4]  # each rank's stream position: 2 steps of a batch of 2, the same on both
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]  # only rank 0 logs
    assert res.stderr.count("steps in") == 1  # and only rank 0 talks


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun ships with torch")
def test_ddp_ranks_stop_with_rank_0s_discovery_error(cihp_shard, tmp_path):
    """Only rank 0 discovers parts; when that fails, the other rank stops with its error instead of waiting
    at the barrier forever (gloo's default timeout is 30 minutes: a hang fails this test's timeout)."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\ntorch.set_num_threads(1)\nimport partkit.contrast as pc\n"
        "from partkit.errors import PartkitError\n"
        "def broken(*a, **kw):\n    raise PartkitError('part-contrast: disk full while writing the round shard')\n"
        "pc.discovery_pass = broken\n"
        "try:\n    pc.part_contrast([sys.argv[1]], sys.argv[2], model='timm:test_efficientnet', weights='none', "
        "rounds=1, epochs=1, batch_size=2, size=64, k=6, device='cpu')\n"
        "except PartkitError as e:\n    print('rank error:', e, file=sys.stderr)\n    sys.exit(3)\n")
    cmd = f"torchrun --nproc_per_node=2 --master_port=29548 {script} {cihp_shard} {tmp_path}/run"
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0
    assert res.stderr.count("rank error: part-contrast: disk full while writing the round shard") == 2, \
        res.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_options_fail_before_any_work(cihp_shard, tmp_path):
    with pytest.raises(PartkitError, match="--rounds"):
        part_contrast([cihp_shard], str(tmp_path / "a"), rounds=0)
    with pytest.raises(PartkitError, match="--momentum"):
        part_contrast([cihp_shard], str(tmp_path / "b"), momentum=1.5)
    with pytest.raises(PartkitError, match="no weights to fine-tune"):
        part_contrast([cihp_shard], str(tmp_path / "c"), model="rgb", device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_moco_checkpoint_is_the_starting_point(cihp_shard, tmp_path):
    """--weights with a MoCo v2 file (module.encoder_q.* / encoder_k.*, an MLP head): the run starts from
    the query encoder -- after one step the momentum encoder is 0.996 x query + 0.004 x online."""
    base = create_backbone("timm:test_resnet", "none").net.state_dict()
    g = torch.Generator().manual_seed(5)
    query = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    sd = {f"module.encoder_q.{k}": v for k, v in query.items() if not k.startswith("fc.")}
    sd.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in base.items() if not k.startswith("fc.")})
    sd["module.encoder_q.fc.0.weight"] = torch.randn(8, base["fc.weight"].shape[1])
    path = tmp_path / "moco.pth.tar"
    torch.save({"arch": "resnet50", "state_dict": sd}, path)
    out = str(tmp_path / "run")
    part_contrast([cihp_shard], out, model="timm:test_resnet", weights=str(path), rounds=1, epochs=1, batch_size=5,
                  size=64, k=4, proj_hidden=32, proj_dim=16, device="cpu", stop_at=1)
    config = json.load(open(f"{out}/config.json"))
    assert config["backbone_weights"] == f"file:{path}"
    state = torch.load(f"{out}/last.pt", map_location="cpu", weights_only=False)["model"]
    checked = 0
    for key, start in query.items():
        if key.startswith("fc.") or not start.is_floating_point() or "running" in key:
            continue
        online, target = state[f"backbone.net.{key}"], state[f"target.backbone.net.{key}"]
        assert torch.allclose(target, 0.996 * start + 0.004 * online, atol=1e-6), key
        checked += 1
    assert checked > 10


# ---- streaming: nothing holds every image; the part shards; --workers does not change results

N_SYNTH = 12
SMALL = dict(model="timm:test_efficientnet", weights="none", rounds=2, epochs=2, round_epochs=1, batch_size=3,
             size=32, k=3, proj_hidden=32, proj_dim=16, lr=0.01, round_lr=0.01, warmup=1, kmeans_iters=20,
             device="cpu", log_every=1)


@pytest.fixture(scope="module")
def synth_shard(tmp_path_factory):
    """12 small images (two colour blobs on a gradient, varied sizes) and one corrupt one."""
    from conftest import write_shard
    from partkit.io.codecs import encode_image_png

    rng = np.random.default_rng(0)
    samples = []
    for i in range(N_SYNTH):
        h, w = 24 + 4 * (i % 3), 32 + 4 * (i % 2)
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 60)], -1).astype(np.uint8)
        cy, cx = rng.integers(6, h - 6), rng.integers(6, w - 6)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = rng.integers(0, 255, 3)
        samples.append({"__key__": f"img{i:02d}", "png": encode_image_png(img)})
        if i == 4:
            samples.append({"__key__": "broken", "png": b"not an image"})
    return write_shard(tmp_path_factory.mktemp("synth") / "000000.tar", samples)


def test_part_shards_hold_every_image_and_old_rounds_go(synth_shard, tmp_path):
    from partkit.errors import SkipBad
    from partkit.io import decode_label_map

    out = tmp_path / "run"
    keys = [f"img{i:02d}" for i in range(N_SYNTH)]
    handler = SkipBad()
    # 12 images, batch 3: 4 steps per epoch; round 1 = 8 steps, round 2 = 4; stop at round 1's end
    part_contrast([synth_shard], str(out), stop_at=8, handler=handler, workers=0, **SMALL)
    assert [r["key"] for r in handler.records] == ["broken"]  # reported once, by the scan
    assert json.load(open(out / "config.json"))["skipped_samples"] == handler.records
    assert sorted(p.name for p in out.glob("parts-round*")) == ["parts-round1.tar"]
    first = read_shard(str(out / "parts-round1.tar"))
    assert [s["__key__"] for s in first] == keys  # the input's order, the bad sample left out
    for s in first:
        grid = decode_label_map(s, "parts.png")
        h, w = decode_image_shape(s)
        assert max(h, w) == 32 and grid.shape == (math.ceil(h / 8), math.ceil(w / 8))  # one id per 8-px cell
        assert grid.max() < 3 and len(np.unique(grid)) >= 2
    handler = SkipBad()
    part_contrast([synth_shard], str(out), resume=True, handler=handler, workers=0, **SMALL)
    # round 2 continued round 1's maps; once its checkpoint names round 2, round 1's shard is gone
    assert sorted(p.name for p in out.glob("parts-round*")) == ["parts-round2.tar"]
    second = read_shard(str(out / "parts-round2.tar"))
    assert [s["__key__"] for s in second] == keys
    assert all(s["png"] == f["png"] for s, f in zip(second, first))  # the same resized images
    assert not list(out.glob(".*tmp*"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 12 and state["round"] == 2 and state["loader"] == 12


def decode_image_shape(sample):
    from partkit.io import decode_image

    return decode_image(sample).shape[:2]


def test_trainer_holds_no_list_of_the_images(synth_shard, tmp_path):
    """Structural: after discovery and a step, nothing the trainer holds has one entry per image; the
    images it keeps are the probe set (one batch)."""
    from partkit.contrast import PartContrastTrainer
    from partkit.errors import SkipBad

    trainer = PartContrastTrainer([synth_shard], str(tmp_path / "run"), stop_at=1, handler=SkipBad(), workers=0,
                                  **SMALL)
    trainer.fit()
    assert trainer.n_images == N_SYNTH and len(trainer.probe_set) == trainer.batch_size == 3

    def sized(value, where, depth=0):
        if isinstance(value, (list, tuple)):
            assert len(value) < N_SYNTH, where
        if isinstance(value, torch.Tensor):
            assert value.dim() == 0 or value.shape[0] < N_SYNTH or value.dtype.is_floating_point, where
        if depth < 3 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                sized(v, f"{where}[{i}]", depth + 1)
        if depth < 3 and isinstance(value, dict):
            for k, v in value.items():
                sized(v, f"{where}.{k}", depth + 1)

    for name, value in vars(trainer).items():
        if not isinstance(value, torch.nn.Module):
            sized(value, name)


def test_workers_do_not_change_the_weights(synth_shard, tmp_path):
    """Views are drawn per sample from (seed, round, stream position): decoding and augmenting in 2 loader
    processes gives the weights of decoding in the training process."""
    from partkit.errors import SkipBad

    runs = {}
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        part_contrast([synth_shard], out, stop_at=3, handler=SkipBad(), workers=workers, **SMALL)
        runs[workers] = out
    _assert_same_weights(_backbone_sd(runs[0]), _backbone_sd(runs[2]))
    assert _metrics(runs[0]) == _metrics(runs[2])
    assert json.load(open(f"{runs[2]}/config.json"))["workers"] == 2
