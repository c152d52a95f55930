"""--log tensorboard: TensorBoard event files in the run folder hold the same numbers as metrics.jsonl (which is
always written), also across --stop-at / --resume; a missing tensorboard package is a one-line error."""
import json
import sys

import numpy as np
import pytest

from partkit.errors import PartkitError
from partkit.training import check_log
from conftest import invoke, one_error_line, write_shard
from test_decoder import SMALL, _synthetic
from test_training import Toy

pytest.importorskip("tensorboard", reason='--log tensorboard needs tensorboard: pip install "partkit[tensorboard]"')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class TBToy(Toy):
    """The toy least-squares run of test_training, logging to TensorBoard; ``crash_at`` raises in that step."""

    def __init__(self, out, *, crash_at=None, **kw):
        super().__init__(out, **kw)
        self.log_to, self.crash_at = "tensorboard", crash_at

    def train_step(self, step):
        if step == self.crash_at:
            raise RuntimeError("killed")
        return super().train_step(step)


def _events(folder) -> dict:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(folder) -> list:
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def test_events_hold_the_metrics_of_the_jsonl(tmp_path):
    TBToy(str(tmp_path / "run")).fit()
    rows = _jsonl(tmp_path / "run")
    scalars = _events(tmp_path / "run")
    assert list(scalars) == ["loss"]
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in rows] == list(range(1, 7))
    assert np.allclose([v for _, v in scalars["loss"]], [r["loss"] for r in rows], rtol=1e-6)


def test_resume_after_a_kill_hides_the_events_written_after_the_checkpoint(tmp_path):
    TBToy(str(tmp_path / "full")).fit()
    with pytest.raises(RuntimeError, match="killed"):  # steps 1-3 logged, checkpoint at 2, killed in step 4
        TBToy(str(tmp_path / "part"), crash_at=3).fit()
    assert [s for s, _ in _events(tmp_path / "part")["loss"]] == [1, 2, 3]
    TBToy(str(tmp_path / "part"), resume=True).fit()
    part, full = _events(tmp_path / "part")["loss"], _events(tmp_path / "full")["loss"]
    assert [s for s, _ in part] == list(range(1, 7))  # step 3 of the killed run is purged, not doubled
    assert np.allclose([v for _, v in part], [v for _, v in full], rtol=1e-6)
    assert [r["step"] for r in _jsonl(tmp_path / "part")] == list(range(1, 7))


def test_train_decoder_log_tensorboard_cli(tmp_path):
    shard = write_shard(tmp_path / "train.tar", _synthetic(4))
    res = invoke(["train-decoder", shard, "--out", tmp_path / "run", "--max-steps", 4, "--log-every", 2,
                  "--batch-size", 2, "--queries", SMALL["num_queries"], "--hidden", SMALL["hidden_dim"],
                  "--dec-layers", 1, "--crop-grid", 8, "--log", "tensorboard", "--val", shard, "--val-every", 4])
    assert res.exit_code == 0, res.stderr
    rows = _jsonl(tmp_path / "run")
    train, (val,) = [r for r in rows if "loss" in r], [r for r in rows if "val" in r]
    scalars = _events(tmp_path / "run")
    assert [r["step"] for r in train] == [2, 4] and [s for s, _ in scalars["loss"]] == [2, 4]
    assert np.allclose([v for _, v in scalars["loss"]], [r["loss"] for r in train], rtol=1e-6)
    assert val["step"] == 4 and val["val"]  # the nested AR@k record: one tag per number, "val/AR@k"
    for k, v in val["val"].items():
        assert scalars[f"val/{k}"] == [(4, pytest.approx(v, rel=1e-6))]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["log"] == "tensorboard"


def test_log_choices_and_the_missing_package(tmp_path, monkeypatch):
    for args in (["train-decoder", "x.tar"], ["self-train", "x.tar", "--objective", "part-contrast"]):
        one_error_line(invoke([*args, "--out", tmp_path / "r", "--log", "wandb"]),
                       "--log must be one of jsonl, tensorboard")
    assert not (tmp_path / "r").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(PartkitError, match=r'pip install "partkit\[tensorboard\]"'):
        check_log("tensorboard")
    check_log("jsonl")

