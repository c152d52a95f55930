"""self-train --objective masks: burn-in -> copy -> EMA, pseudo-labels, semi-supervised, resume, DDP."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from partkit.decoder import TrainConfig, train_decoder
from partkit.errors import PartkitError
from partkit.selftrain import SelfTrainer, ema_update, strong_photometric
from conftest import ROOT, write_shard
from test_decoder import SMALL, _synthetic


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    shard = write_shard(tmp / "train.tar", _synthetic(4))
    tc = TrainConfig(max_steps=30, batch_size=2, warmup=2, crop_grid=8, num_points=64, log_every=10,
                     checkpoint_every=30)
    train_decoder([shard], str(tmp / "run"), decoder=SMALL, train=tc, seed=0)
    return shard, str(tmp / "run")


def _tc(steps, **kw):
    return TrainConfig(max_steps=steps, batch_size=2, warmup=1, crop_grid=8, num_points=64, log_every=1,
                       checkpoint_every=2, **kw)


def test_ema_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * wa + 0.1 * wb)


def test_burn_in_then_copy_then_ema(teacher, tmp_path):
    shard, run = teacher
    st = SelfTrainer([shard], str(tmp_path / "st"), run, student_init="scratch", burn_in=2, ema_decay=0.5,
                     score_threshold=0.0, train=_tc(4), seed=0)
    t0 = {k: v.clone() for k, v in st.teacher.state_dict().items()}
    snapshots = _spy_teacher(st)
    st.fit()
    (d1, _, t1, s1), (d2, _, t2, s2), (d3, before3, t3, s3), _ = snapshots
    assert all(torch.equal(t1[k], t0[k]) for k in t0)  # frozen during burn-in
    assert not all(torch.equal(s1[k], t0[k]) for k in t0)  # while the student moves
    assert all(torch.equal(t2[k], s2[k]) for k in t0)  # teacher := student when burn-in ends
    for k in t0:  # then EMA
        if t0[k].is_floating_point():
            assert torch.allclose(t3[k], 0.5 * before3[k] + 0.5 * s3[k], atol=1e-6)


def test_fixed_teacher_and_pseudo_label_filters(teacher, tmp_path):
    shard, run = teacher
    st = SelfTrainer([shard], str(tmp_path / "st"), run, burn_in=0, ema_decay=1.0, score_threshold=0.0,
                     min_mask_area=1, train=_tc(2), seed=0)
    t0 = {k: v.clone() for k, v in st.teacher.state_dict().items()}
    xw, _, objects = st._views(st.batch(0))
    everything = st.pseudo_labels(xw, objects)
    st.score_threshold = 1.01
    assert all(t["masks"].shape[0] == 0 for t in st.pseudo_labels(xw, objects))
    st.score_threshold, st.min_mask_area = 0.0, 10 ** 6
    assert all(t["masks"].shape[0] == 0 for t in st.pseudo_labels(xw, objects))
    assert sum(t["masks"].shape[0] for t in everything) > 0
    st.min_mask_area = 1
    st.fit()
    assert all(torch.equal(st.teacher.state_dict()[k], t0[k]) for k in t0)  # --ema-decay 1: never moves


def test_semi_supervised_resume_and_records(teacher, tmp_path):
    shard, run = teacher
    kw = dict(labeled=[shard], labeled_field="parts.png", score_threshold=0.0, burn_in=1, ema_decay=0.9, seed=0,
              val=[shard])
    SelfTrainer([shard], str(tmp_path / "full"), run, train=_tc(4, val_every=2), **kw).fit()
    SelfTrainer([shard], str(tmp_path / "part"), run, train=_tc(4, val_every=2, stop_at=2), **kw).fit()
    SelfTrainer([shard], str(tmp_path / "part"), run, train=_tc(4, val_every=2), resume=True, **kw).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    for key in ("model", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert any("loss_sup_dice" in r for r in rows)
    vals = [r["val"] for r in rows if "val" in r]
    assert vals and "teacher AR@10" in vals[-1] and "student AR@10" in vals[-1]


def test_strong_augment_keeps_shape_and_changes_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 16)
    outs = [strong_photometric(x, (0.5,) * 3, (0.25,) * 3, g) for _ in range(5)]
    assert all(o.shape == x.shape for o in outs) and any(not torch.allclose(o, x) for o in outs)


def test_bad_options(teacher, tmp_path):
    shard, run = teacher
    with pytest.raises(PartkitError, match="student-init"):
        SelfTrainer([shard], str(tmp_path / "x"), run, student_init="nope")
    with pytest.raises(PartkitError, match="not found"):
        SelfTrainer([shard], str(tmp_path / "x"), str(tmp_path / "missing"))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun ships with torch")
def test_self_train_ddp_two_processes(teacher, tmp_path):
    shard, run = teacher
    shards = [write_shard(tmp_path / f"in{i}.tar", [{**s, "__key__": f"r{i}{s['__key__']}"}
                                                     for s in _synthetic(2, seed=10 + i)]) for i in range(2)]
    cmd = (f"torchrun --nproc_per_node=2 --master_port=29533 $(which partkit) self-train {' '.join(shards)} "
           f"--teacher {run} --out {tmp_path}/st --max-steps 2 --batch-size 1 --crop-grid 8 --score-threshold 0 "
           f"--checkpoint-every 2 --log-every 1 --warmup 1")
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "st" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["config"]["world"] == 2 and "teacher" in ckpt


def test_cli_objectives_and_option_errors(tmp_path, cihp_dir):
    from typer.testing import CliRunner

    from partkit.cli.main import app
    from partkit.io import Output
    from partkit.pack import pack

    runner = CliRunner()
    pack([str(cihp_dir / "images")], output=Output(str(tmp_path / "imgs")))
    res = runner.invoke(app, ["self-train", str(tmp_path / "imgs"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs --teacher" in res.stderr
    res = runner.invoke(app, ["self-train", str(tmp_path / "imgs"), "--out", str(tmp_path / "x"), "--objective", "nope"])
    assert res.exit_code == 2 and "unknown --objective" in res.stderr
    res = runner.invoke(app, ["--seed", "1", "self-train", str(tmp_path / "imgs"), "--objective", "part-contrast",
                              "--out", str(tmp_path / "pc"), "--model", "timm:vit_tiny_patch16_224", "--weights", "none",
                              "--size", "32", "-k", "3", "--epochs", "1", "--rounds", "1", "--batch-size", "5",
                              "--proj-hidden", "32", "--proj-dim", "16"])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "pc" / "backbone.pt").exists()


def _spy_teacher(st):
    snapshots = []
    original = st.after_step

    def spy(done):
        before = {k: v.clone() for k, v in st.teacher.state_dict().items()}
        original(done)
        snapshots.append((done, before, {k: v.clone() for k, v in st.teacher.state_dict().items()},
                          {k: v.clone() for k, v in st.net.state_dict().items()}))

    st.after_step = spy
    return snapshots


def test_guided_distillation_recipe_is_the_papers_schedule(teacher, tmp_path):
    """Default recipe: random-init student, teacher frozen for the burn-in (15/90 of the steps, Tab. 2's
    Cityscapes 5% setting), teacher := student at its end, then EMA with alpha = 0.9996."""
    shard, run = teacher
    st = SelfTrainer([shard], str(tmp_path / "st"), run, score_threshold=0.0, train=_tc(12, stop_at=4), seed=0)
    assert (st.recipe, st.student_init, st.burn_in, st.ema_decay, st.score_threshold, st.min_mask_area,
            st.unsup_weight) == ("guided-distillation", "scratch", 2, 0.9996, 0.0, 5.0, 2.0)
    t0 = {k: v.clone() for k, v in st.teacher.state_dict().items()}
    assert not all(torch.equal(st.net.state_dict()[k], t0[k]) for k in t0)  # the student is not the teacher
    snapshots = _spy_teacher(st)
    st.fit()
    (d1, _, t1, s1), (d2, _, t2, s2), (d3, before3, t3, s3), (d4, before4, t4, s4) = snapshots
    assert all(torch.equal(t1[k], t0[k]) for k in t0)  # frozen during burn-in
    assert all(torch.equal(t2[k], s2[k]) for k in t0)  # teacher := student at its end
    assert not all(torch.equal(t2[k], t0[k]) for k in t0)
    for before, after, student in ((before3, t3, s3), (before4, t4, s4)):  # then EMA
        for k in t0:
            if t0[k].is_floating_point():
                assert torch.allclose(after[k], 0.9996 * before[k] + 0.0004 * student[k], atol=1e-6)
    cfg = json.load(open(tmp_path / "st" / "config.json"))
    assert cfg["recipe"] == "guided-distillation" and cfg["recipe_overrides"] == ["score_threshold"]
    assert (cfg["burn_in"], cfg["burn_in_fraction"], cfg["ema_decay"], cfg["unsup_weight"],
            cfg["student_init"]) == (2, 15 / 90, 0.9996, 2.0, "scratch")


def test_partdistillation_recipe_and_overrides(teacher, tmp_path):
    shard, run = teacher
    st = SelfTrainer([shard], str(tmp_path / "pd"), run, recipe="partdistillation", labeled=[shard],
                     labeled_field="parts.png", train=_tc(2), seed=0)
    assert (st.student_init, st.burn_in, st.ema_decay, st.score_threshold, st.unsup_weight) == (
        "teacher", 0, 1.0, 0.3, 0.0)
    t = torch.load(os.path.join(run, "last.pt"), weights_only=False)["model"]
    assert all(torch.equal(st.net.state_dict()[k], t[k]) for k in t)  # the student starts as the teacher
    st = SelfTrainer([shard], str(tmp_path / "pd2"), run, recipe="partdistillation", burn_in=1, ema_decay=0.5,
                     train=_tc(2), seed=0)
    assert (st.burn_in, st.ema_decay, st.score_threshold) == (1, 0.5, 0.3)  # explicit options win
    assert st.config["recipe_overrides"] == ["burn_in", "ema_decay"] and st.config["burn_in_fraction"] is None
    with pytest.raises(PartkitError, match="--recipe must be one of guided-distillation, partdistillation"):
        SelfTrainer([shard], str(tmp_path / "x"), run, recipe="mean-teacher")
