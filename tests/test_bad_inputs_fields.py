"""Hostile field contents (issue 14): each is a bad sample, named with its fix, or skipped and recorded.

Impossible grid geometry (parts.json / feat.json), malformed gt_objects.json, NaN keypoints, bad
predictions (proposals.json) and features of different models mixed in one run. Without
``--skip-bad`` the command exits 2 with one ``partkit: error:`` line naming the sample and the fix,
no traceback and nothing under a final output name; with it the sample is left out and recorded.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT, write_shard
from partkit import rle
from partkit.cli.main import app
from partkit.io import encode_json, encode_npy, encode_png

runner = CliRunner()
C, G, S = 6, 4, 8  # channels; a 4x4 feature grid at stride 8 over a 32x32 image
H = W = G * S
GEOMETRY = {"grid": [G, G], "stride": S, "image_size": [H, W], "resized": [H, W]}
DECODER = ["--queries", "4", "--hidden", "16", "--dec-layers", "1", "--batch-size", "2", "--max-steps", "1"]


def _quadrants() -> np.ndarray:
    gt = np.zeros((H, W), np.uint8)
    gt[4:16, 4:16], gt[4:16, 16:28], gt[16:28, 4:16], gt[16:28, 16:28] = 1, 2, 3, 4
    return gt


def _sample(key: str, seed: int, model: str = "m1", channels: int = C, **fields) -> dict:
    rng = np.random.default_rng(seed)
    gt = _quadrants()
    fg = gt > 0
    halves = [np.zeros((H, W), bool), np.zeros((H, W), bool)]
    halves[0][:, :16], halves[1][:, 16:] = fg[:, :16], fg[:, 16:]
    s = {
        "__key__": key,
        "json": encode_json({"width": W, "height": H, "category": "person"}),
        "gt_parts.png": encode_png(gt),
        "gt_objects.json": encode_json({"objects": [{"id": 1, "category_id": 1, "category": "person", "iscrowd": 0,
                                                     "segmentation": rle.encode(fg)}]}),
        "gt_kpts.json": encode_json({"keypoints": [[[8.0, 8.0, 2], [24.0, 24.0, 2]]], "names": ["a", "b"]}),
        "feat.npy": rng.standard_normal((channels, G, G)).astype(np.float16),
        "feat.json": encode_json({"model": model, "kind": "hypercolumn", "layers": [1], "channels": channels,
                                  **GEOMETRY}),
        "parts.png": encode_png(np.kron(np.arange(1, 5).reshape(2, 2), np.ones((2, 2), np.int64))),
        "parts.json": encode_json({"resolution": "grid", **GEOMETRY}),
        "proposals.json": encode_json({"proposals": [{"id": i + 1, "score": 0.9 - 0.1 * i, "segmentation": rle.encode(m)}
                                                     for i, m in enumerate(halves)]}),
        "proposals.npy": rng.standard_normal((2, 8)).astype(np.float16),
    }
    for name, value in fields.items():
        s[name] = value if isinstance(value, bytes) else encode_json(value)
    return s


def _shard(path, bad: dict, name: str = "in.tar", **kw) -> str:
    """Two good samples and ``bad``, the sample 'bad' with fields replaced."""
    return write_shard(path / name, [_sample("good0", 0, **kw), _sample("good1", 1, **kw), _sample("bad", 2, **bad)])


def invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_sample_error(res, key: str, *needles) -> str:
    """Exit 2, exactly one ``partkit: error:`` line naming ``key`` and the needles, no traceback."""
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.stdout, err, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in err.splitlines() if line.startswith("partkit: error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    assert f"'{key}'" in lines[0], lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def assert_nothing_final(out):
    if out.exists():
        left = [p.name for p in out.rglob("*") if p.is_file()]
        assert not left, f"output left behind: {left}"


def stats_skipped(out) -> list:
    return [r["key"] for f in sorted(out.glob("*.stats.json")) for r in json.loads(f.read_text())["skipped_samples"]]


# --------------------------------------------------------------------------- impossible geometry

GEOMETRY_CASES = {
    "stride-zero": {"stride": 0},
    "stride-negative": {"stride": -8},
    "stride-text": {"stride": "8"},
    "resized-zero": {"resized": [0, 0]},
    "resized-huge": {"resized": [100000, 100000]},
    "offset-past-image": {"offset": 1000},
}


@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_impossible_parts_geometry_is_a_bad_sample_in_eval(tmp_path, case):
    shard = _shard(tmp_path, {"parts.json": {"resolution": "grid", **GEOMETRY, **GEOMETRY_CASES[case]}})
    assert_bad_sample_error(invoke(["eval", "nmi", "miou", shard]), "bad", "parts.json", "re-run `partkit cluster`")
    res = invoke(["eval", "nmi", "miou", shard, "--skip-bad"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["samples"] == 2 and [r["key"] for r in report["skipped"]] == ["bad"]


@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_impossible_feat_geometry_is_a_bad_sample_in_cluster(tmp_path, case):
    shard = _shard(tmp_path, {"feat.json": {"model": "m1", "kind": "hypercolumn", "layers": [1], "channels": C,
                                            **GEOMETRY, **GEOMETRY_CASES[case]}})
    out = tmp_path / "out"
    args = ["cluster", shard, "--scope", "object", "--fg-from", "gt_objects", "-k", "2", "-o", out]
    assert_bad_sample_error(invoke(args), "bad", "feat.json", "re-run `partkit extract`")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad", "--overwrite"])
    assert res.exit_code == 0, res.stderr
    assert stats_skipped(out) == ["bad"]


def test_impossible_geometry_error_without_traceback_in_a_real_process(tmp_path):
    shard = _shard(tmp_path, {"parts.json": {"resolution": "grid", **GEOMETRY, "stride": 0}})
    proc = subprocess.run([sys.executable, "-c", "from partkit.cli.main import main; main()", "eval", "nmi", shard],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "partkit: error: sample 'bad': 'parts.json' stride is 0; expected a positive number; "
        "re-run `partkit cluster` to record the grid geometry"]


# --------------------------------------------------------------------------- malformed gt_objects.json

OBJECT_CASES = {
    "objects-not-a-list": {"objects": "person"},
    "objects-not-objects": {"objects": [1, 2]},
    "rle-wrong-size": {"objects": [{"id": 1, "segmentation": rle.encode(np.ones((8, 8), bool))}]},
    "rle-missing-keys": {"objects": [{"id": 1, "segmentation": {"counts": "abc"}}]},
    "rle-garbage-counts": {"objects": [{"id": 1, "segmentation": {"size": [H, W], "counts": "not an rle"}}]},
}


def _objects_command(cmd: str, shard: str, out) -> list:
    return {
        "cluster": ["cluster", shard, "--scope", "object", "--fg-from", "gt_objects", "-k", "2", "-o", out],
        "eval": ["eval", "ar", shard, "--gt", "objects", "--ks", "1"],
        "rank fit": ["rank", "fit", shard, "--model-out", out / "rank.npz", "-k", "1", "--score-threshold", "0",
                     "--min-area", "0"],
        "train-decoder": ["train-decoder", shard, "--out", out, *DECODER],
    }[cmd]


@pytest.mark.parametrize("case", sorted(OBJECT_CASES))
@pytest.mark.parametrize("cmd", ["cluster", "eval", "rank fit"])
def test_malformed_gt_objects_is_a_bad_sample(tmp_path, cmd, case):
    shard = _shard(tmp_path, {"gt_objects.json": OBJECT_CASES[case]})
    out = tmp_path / "out"
    args = _objects_command(cmd, shard, out)
    assert_bad_sample_error(invoke(args), "bad", "gt_objects.json")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    if cmd == "cluster":
        assert stats_skipped(out) == ["bad"]
    elif cmd == "eval":
        assert [r["key"] for r in json.loads(res.stdout)["skipped"]] == ["bad"]
    else:
        assert (out / "rank.npz").exists()


@pytest.mark.parametrize("case", ["objects-not-objects", "rle-wrong-size", "rle-missing-keys"])
def test_malformed_gt_objects_in_training_data_is_a_bad_sample(tmp_path, case):
    shard = _shard(tmp_path, {"gt_objects.json": OBJECT_CASES[case]})
    out = tmp_path / "run"
    args = _objects_command("train-decoder", shard, out)
    assert_bad_sample_error(invoke(args), "bad", "gt_objects.json")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert [r["key"] for r in config["skipped_samples"]] == ["bad"]


def test_nan_keypoints_are_a_bad_sample(tmp_path):
    shard = _shard(tmp_path, {"gt_kpts.json": b'{"keypoints": [[[NaN, 8.0, 2], [24.0, 24.0, 2]]], "names": ["a", "b"]}'})
    args = ["eval", "nmi", shard, "--at", "keypoints"]
    assert_bad_sample_error(invoke(args), "bad", "gt_kpts.json", "NaN", "re-run")
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    assert [r["key"] for r in json.loads(res.stdout)["skipped"]] == ["bad"]


# --------------------------------------------------------------------------- bad predictions

PROPOSAL_CASES = {
    "garbage-counts": {"proposals": [{"id": 1, "score": 0.9, "segmentation": {"size": [H, W], "counts": "??"}}]},
    "score-not-a-number": {"proposals": [{"id": 1, "score": "high", "segmentation": rle.encode(np.ones((H, W)))}]},
    "no-segmentation": {"proposals": [{"id": 1, "score": 0.9}]},
    "not-a-list": {"proposals": {"id": 1}},
}


@pytest.mark.parametrize("case", sorted(PROPOSAL_CASES))
@pytest.mark.parametrize("cmd", ["eval", "rank fit"])
def test_bad_proposals_name_the_sample_and_are_skippable(tmp_path, cmd, case):
    bad = PROPOSAL_CASES[case]
    n = len(bad["proposals"]) if isinstance(bad["proposals"], list) else 1
    shard = _shard(tmp_path, {"proposals.json": bad, "proposals.npy": encode_npy(np.zeros((n, 8), np.float16))})
    out = tmp_path / "out"
    args = (["eval", "ar", "mask-ap", shard, "--ks", "1"] if cmd == "eval" else
            ["rank", "fit", shard, "--model-out", out / "rank.npz", "-k", "1", "--score-threshold", "0",
             "--min-area", "0"])
    assert_bad_sample_error(invoke(args), "bad", "proposals.json")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    if cmd == "eval":
        assert [r["key"] for r in json.loads(res.stdout)["skipped"]] == ["bad"]
    else:
        assert (out / "rank.npz").exists()


# --------------------------------------------------------------------------- mixed feature sources


def _mixed(tmp_path) -> list[str]:
    a = write_shard(tmp_path / "a.tar", [_sample("a0", 0), _sample("a1", 1)])
    b = write_shard(tmp_path / "b.tar", [_sample("b0", 2, model="m2", channels=C + 2), _sample("b1", 3)])
    return [a, b]


def test_mixed_features_refused_by_cluster_dataset(tmp_path):
    a, b = _mixed(tmp_path)
    out = tmp_path / "out"
    args = ["cluster", a, b, "--scope", "dataset", "-k", "2", "-o", out]
    line = assert_bad_sample_error(invoke(args), "b0", "'a0'", "a.tar", "b.tar", "re-extract")
    assert "m1" in line and "m2" in line
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    assert stats_skipped(out) == ["b0"]


def test_mixed_features_refused_by_train_decoder(tmp_path):
    a, b = _mixed(tmp_path)
    out = tmp_path / "run"
    args = ["train-decoder", a, b, "--out", out, *DECODER]
    assert_bad_sample_error(invoke(args), "b0", "'a0'", "a.tar", "b.tar", "re-extract")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert [r["key"] for r in config["skipped_samples"]] == ["b0"]


def test_malformed_gt_objects_in_self_training_data_is_a_bad_sample(tmp_path):
    teacher = tmp_path / "teacher"
    good = _shard(tmp_path, {}, name="good.tar")
    assert invoke(["train-decoder", good, "--out", teacher, *DECODER]).exit_code == 0
    shard = _shard(tmp_path, {"gt_objects.json": OBJECT_CASES["objects-not-objects"]})
    out = tmp_path / "run"
    args = ["self-train", shard, "--teacher", teacher, "--out", out, "--max-steps", "1", "--batch-size", "2"]
    assert_bad_sample_error(invoke(args), "bad", "gt_objects.json")
    assert_nothing_final(out)
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert [r["key"] for r in config["skipped_samples"]] == ["bad"]
