"""The part decoder: matching, losses, learning, exact resume, DDP, predict."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from partkit.decoder import DecoderConfig, PartDecoder, TrainConfig, predict, train_decoder
from partkit.decoder.criterion import HungarianMatcher, SetCriterion, point_sample
from partkit.errors import PartkitError
from partkit.io import Output, decode_json, decode_label_map, decode_npy, encode_json, encode_png
from conftest import ROOT, read_shard, write_shard

SMALL = {"num_queries": 8, "hidden_dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2}


def _synthetic(n, seed=0, grid=8):
    """Features that encode a 3-part layout (blocks), the layout as parts.png at grid resolution."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        labels = np.zeros((grid, grid), np.uint8)
        cut = rng.integers(2, grid - 2)
        labels[1:cut, 1:-1], labels[cut:-1, 1:grid // 2], labels[cut:-1, grid // 2:-1] = 1, 2, 3
        feat = rng.normal(0, 0.1, (16, grid, grid))
        for k in range(4):
            feat[k * 4:(k + 1) * 4] += (labels == k)[None]
        meta = {"grid": [grid, grid], "stride": 8, "image_size": [grid * 8, grid * 8], "resized": [grid * 8, grid * 8],
                "channels": 16, "level_channels": [8, 8]}
        samples.append({"__key__": f"s{i:03d}", "feat.npy": feat.astype(np.float16), "feat.json": encode_json(meta),
                        "parts.png": encode_png(labels), "gt_parts.png": encode_png(np.kron(labels, np.ones((8, 8),
                                                                                                         np.uint8)))})
    return samples


@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path / "train.tar", _synthetic(4))


def test_matcher_assigns_each_target_to_the_query_that_predicts_it():
    torch.manual_seed(0)
    targets = torch.zeros(3, 16, 16, dtype=torch.bool)
    targets[0, :8], targets[1, 8:, :8], targets[2, 8:, 8:] = True, True, True
    masks = torch.randn(1, 5, 16, 16)
    perm = [3, 0, 4]  # queries 3, 0, 4 predict targets 0, 1, 2 confidently
    for q, t in zip(perm, range(3)):
        masks[0, q] = torch.where(targets[t], 8.0, -8.0)
    logits = torch.zeros(1, 5, 2)
    m = HungarianMatcher(num_points=256)
    (q, g), = m(logits, masks, [{"masks": targets, "labels": torch.zeros(3, dtype=torch.long)}])
    assert dict(zip(g.tolist(), q.tolist())) == {0: 3, 1: 0, 2: 4}


def test_point_sample_matches_exact_values_at_cell_centres():
    x = torch.arange(16.0).reshape(1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.875, 0.375]]])  # (x, y) centres of cells (0,0), (1,3)
    assert point_sample(x, coords).tolist() == [[0.0, 7.0]]


def test_loss_falls_when_fitting_synthetic_parts():
    torch.manual_seed(0)
    net = PartDecoder(DecoderConfig(in_channels=16, level_channels=[8, 8], **SMALL))
    crit = SetCriterion(num_points=128)
    sample = _synthetic(1)[0]
    x = torch.tensor(sample["feat.npy"], dtype=torch.float32)[None]
    lab = torch.tensor(np.kron(decode_label_map(sample, "parts.png"), np.ones((2, 2))))
    target = [{"masks": torch.stack([lab == i for i in (1, 2, 3)]), "labels": torch.zeros(3, dtype=torch.long)}]
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    losses = []
    for _ in range(40):
        loss, _ = crit(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def _train(shard, out, steps, resume=False, stop_at=None, workers=2, **kw):
    tc = TrainConfig(max_steps=steps, batch_size=2, warmup=2, checkpoint_every=2, log_every=1, crop_grid=8,
                     num_points=64, stop_at=stop_at, workers=workers)
    return train_decoder([shard], str(out), decoder=SMALL, train=tc, resume=resume, seed=1, **kw)


def test_resume_continues_exactly(tmp_path, shard):
    _train(shard, tmp_path / "full", 6, workers=None)  # the default: on CPU, decoded in the training process
    assert json.load(open(tmp_path / "full" / "config.json"))["train"]["workers"] is None
    _train(shard, tmp_path / "part", 6, stop_at=3, workers=0)  # as if killed after the step-3 checkpoint
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=False)["step"] == 3
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a record written after the checkpoint
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    _train(shard, tmp_path / "part", 6, resume=True, workers=2)  # --workers may change: the order does not
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    full_log = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    for name in ("config.json", "metrics.jsonl", "loss.png", "last.pt"):
        assert (tmp_path / "part" / name).exists()
    with pytest.raises(PartkitError, match="already holds a run"):
        _train(shard, tmp_path / "part", 6)


def test_loader_workers_make_the_training_views(tmp_path, shard):
    """With cached features the stream's workers crop, flip and mask each example (drawn from its stream
    position): a batch holds only the views, the same with 0 or 2 workers, and training uses them."""
    from partkit.decoder.train import DecoderTrainer

    views = {}
    for workers in (0, 2):
        tc = TrainConfig(max_steps=2, batch_size=2, warmup=0, crop_grid=6, num_points=64, workers=workers)
        trainer = DecoderTrainer([shard], str(tmp_path / f"w{workers}"), decoder=SMALL, train=tc, seed=1)
        batch = trainer.loader.next_batch() + trainer.loader.next_batch()
        trainer.loader.close()
        assert all(ex.feat is None and ex.target is None for ex in batch)  # the full grids stay in the worker
        views[workers] = [(ex.key, ex.view[0], ex.view[1]["masks"], ex.view[1]["labels"]) for ex in batch]
        assert all(v[1].shape == (16, 6, 6) and v[2].shape[1:] == (12, 12) and len(v[2]) == len(v[3])
                   for v in views[workers])
        assert any(v[2].shape[0] > 0 for v in views[workers])
    assert [v[0] for v in views[0]] == [v[0] for v in views[2]]
    assert all(torch.equal(a, b) for v, w in zip(views[0], views[2]) for a, b in zip(v[1:], w[1:]))
    loss, _ = trainer.supervised_loss(batch)  # a step from the workers' views
    assert torch.isfinite(loss)


def test_predict_writes_rle_proposals_and_features(tmp_path, shard):
    _train(shard, tmp_path / "run", 2)
    predict([shard], str(tmp_path / "run"), topk=5, label_map=True, output=Output(str(tmp_path / "pred")))
    from pycocotools import mask as mask_utils

    for s in read_shard(tmp_path / "pred" / "000000.tar"):
        doc = decode_json(s, "proposals.json")
        props = doc["proposals"]
        assert len(props) == 5 and [p["score"] for p in props] == sorted((p["score"] for p in props), reverse=True)
        m = mask_utils.decode({"size": props[0]["segmentation"]["size"],
                               "counts": props[0]["segmentation"]["counts"].encode()})
        assert m.shape == (64, 64) and int(m.sum()) == props[0]["area"]
        assert decode_npy(s, "proposals.npy").shape == (5, SMALL["hidden_dim"])
        assert "pred_parts.png" in s and "parts.png" in s
    with pytest.raises(PartkitError, match="not found"):
        predict([shard], str(tmp_path / "nope"), output=Output(str(tmp_path / "p2")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"junk")
    with pytest.raises(PartkitError, match="corrupt"):
        predict([shard], str(tmp_path / "bad"), output=Output(str(tmp_path / "p3")))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun ships with torch")
def test_ddp_two_cpu_processes_over_uneven_shards(tmp_path):
    """2 ranks over 3 shards of 1, 2 and 4 samples: one epoch is ceil(7 / 2) = 4 steps on both ranks."""
    shards = [write_shard(tmp_path / f"in{i}.tar", [{**s, "__key__": f"r{i}{s['__key__']}"}
                                                     for s in _synthetic(n, seed=i)])
              for i, n in enumerate((1, 2, 4))]
    cmd = (f"torchrun --nproc_per_node=2 --master_port=29531 $(which partkit) train-decoder {' '.join(shards)} "
           f"--out {tmp_path}/run --epochs 1 --batch-size 1 --queries 8 --hidden 32 --dec-layers 1 "
           f"--crop-grid 8 --checkpoint-every 4 --log-every 1 --warmup 1 --workers 1 --shuffle-buffer 3")
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["world"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["loader"] == [4, 4]  # each rank consumed 4 samples of the stream: equal step counts
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 4  # only rank 0 logs


def test_objects_from_saliency_keeps_only_proposals_inside_the_salient_object(tmp_path):
    """train-decoder/self-train --objects-from saliency: a proposal outside the salient region is no target."""
    from partkit.decoder.data import example_from_sample
    from partkit.selftrain import SelfTrainer

    s = _synthetic(1)[0]
    sal = np.zeros((8, 8), np.float32)
    sal[:4] = 1.0  # rows 0-3: part 1 (rows 1..cut-1) is salient; parts 2 and 3 (rows cut..6) mostly not
    cut = int(np.argmax(decode_label_map(s, "parts.png")[:, 1] != 1, axis=0))
    assert cut <= 4, "the layout must put parts 2 and 3 below the salient rows"
    s["saliency.npy"] = sal
    salient_shard = write_shard(tmp_path / "sal.tar", [s])
    s = {k: v for k, v in read_shard(salient_shard)[0].items() if k != "__url__"}  # encoded, as training reads it
    plain = example_from_sample(s, field="parts.png", min_part_area=0.0)
    salient = example_from_sample(s, field="parts.png", min_part_area=0.0, objects="saliency", fg_threshold=0.5)
    assert sorted(plain.ids.tolist()) == [1, 2, 3] and salient.ids.tolist() == [1]
    assert salient.target.max() == 1
    # the CLI: one line naming the fix when the shards have no saliency
    shard = write_shard(tmp_path / "plain.tar", _synthetic(2))
    from typer.testing import CliRunner

    from partkit.cli.main import app

    res = CliRunner().invoke(app, ["train-decoder", str(shard), "--out", str(tmp_path / "r"), "--objects-from",
                                   "saliency", "--max-steps", "1"])
    assert res.exit_code != 0 and "extract --saliency" in res.stderr and "Traceback" not in res.stderr
    res = CliRunner().invoke(app, ["train-decoder", str(shard), "--out", str(tmp_path / "r2"), "--objects-from",
                                   "boxes", "--max-steps", "1"])
    assert res.exit_code != 0 and "--objects-from must be one of" in res.stderr
    # self-train: the salient region becomes the object mask its pseudo-labels are filtered with
    train_decoder([str(shard)], str(tmp_path / "dec"), decoder=SMALL, train=TrainConfig(max_steps=1, warmup=0,
                                                                                        crop_grid=8, workers=0))
    st = SelfTrainer([str(salient_shard)], str(tmp_path / "st"), str(tmp_path / "dec"), objects_from="saliency",
                     fg_threshold=0.5, train=TrainConfig(max_steps=1, warmup=0, crop_grid=8, batch_size=1, workers=0))
    from partkit.decoder.features import example_loader

    ex = example_loader(field=None, min_part_area=0.0, prepare=st.prepare_example)(s)
    assert ex.has_objects and ex.target[:8].all() and not ex.target[-8:].any()
    assert st.config["objects_from"] == "saliency" and st.config["fg_threshold"] == 0.5


def _targets_by_definition(target, objs, min_part_area, class_map):
    """The training targets written out id by id: an id is kept when at least half of it lies in one object
    (the one it overlaps most) and it covers at least ``min_part_area`` of that object."""
    keep, classes = [], []
    for i in sorted(set(target[target > 0].tolist())):
        m = target == i
        overlaps = [int((m & o).sum()) for o in objs]
        if not overlaps or max(overlaps) < 0.5 * m.sum():
            continue
        obj = objs[int(np.argmax(overlaps))]
        if m.sum() < min_part_area * max(int(obj.sum()), 1):
            continue
        keep.append(i)
        classes.append(class_map.get(i, 0))
    return np.where(np.isin(target, keep), target, 0), keep, classes


@pytest.mark.parametrize("ids", ["uint8", "uint16", "int32"])
def test_targets_match_their_definition_with_several_objects(monkeypatch, ids):
    """targets_from_sample (vectorised) against the definition, on random maps with ignore ids, several objects
    and, for 32-bit maps, ids above 65535 and negative ones (no part)."""
    from partkit.decoder import data as D

    rng = np.random.default_rng({"uint8": 0, "uint16": 1, "int32": 2}[ids])
    meta = {"grid": [6, 6], "stride": 8, "image_size": [48, 48], "resized": [48, 48]}
    for trial in range(40):
        values = {"uint8": [0, 1, 2, 3, 7, 255], "uint16": [0, 5, 300, 40000, 65535],
                  "int32": [0, 3, 70000, 2 ** 31 - 1, -4]}[ids]
        lab = rng.choice(values, (12, 12)).astype(np.int32)
        masks = rng.random((int(rng.integers(0, 4)), 48, 48)) < 0.5
        monkeypatch.setattr(D, "grid_labels", lambda *a, lab=lab: lab.copy())
        monkeypatch.setattr(D, "objects_from", lambda *a, masks=masks, **k: ([{}] * len(masks), masks))
        cmap = {v: v % 5 for v in values}
        for mpa in (0.0, 0.1, 0.4):
            target, kept, classes = D.targets_from_sample({"__key__": "k"}, meta, min_part_area=mpa, class_map=cmap,
                                                          objects="gt_objects")
            clean = np.where(np.isin(lab, [255, 65535]) | (lab < 0), 0, lab)
            objs = [D.sample_on_grid(m.astype(np.uint8), meta, D.MASK_FACTOR) > 0 for m in masks]
            want, want_kept, want_classes = _targets_by_definition(clean, objs, mpa, cmap)
            assert target.dtype == np.int32 and np.array_equal(target, want)
            assert kept.tolist() == want_kept and classes.tolist() == want_classes
        own = D.targets_from_sample({"__key__": "k"}, meta, min_part_area=0.1)  # no objects: the map's foreground
        clean = np.where(np.isin(lab, [255, 65535]) | (lab < 0), 0, lab)
        assert own[1].tolist() == _targets_by_definition(clean, [clean > 0], 0.1, {})[1]
