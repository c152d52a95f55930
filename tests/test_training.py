"""partkit.training: the one loop (lazy run folder, stop-at + resume == a straight run, the config check),
the option checks and both batch orders, on a toy model."""
import json
import math

import pytest
import torch

from partkit.errors import PartkitError
from partkit.training import (RunDir, Trainer, check_count, check_rate, cosine_warmup, epoch_batch_indices,
                              stream_batch_indices)


class Toy(Trainer):
    """Least squares with a noisy batch of 4 of 10 points per step (an RNG the checkpoint must carry)."""

    command = "toy"

    def __init__(self, out, *, lr=0.1, steps=6, resume=False, stop_at=None):
        check_rate("--lr", lr)
        self.setup_run(out, device=torch.device("cpu"), resume=resume, stop_at=stop_at, checkpoint_every=2)
        torch.manual_seed(0)
        self.x, self.y = torch.randn(10, 3), torch.randn(10)
        self.net = torch.nn.Linear(3, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=0.9)
        self.steps = steps
        self.sched = cosine_warmup(self.opt, 1, steps)
        self.gen = torch.Generator().manual_seed(1)
        self.config = {"lr": lr, "steps": steps}

    def resume_options(self, config):
        return {"--lr": config.get("lr"), "--steps": config.get("steps")}

    def train_step(self, step):
        idx = epoch_batch_indices(step, 10, 4, seed=0)
        noise = torch.randn(4, generator=self.gen) * 0.01 + torch.randn(4) * 0.01
        loss = ((self.net(self.x[idx])[:, 0] - self.y[idx] - noise) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"step": step + 1, "loss": float(loss.detach())}

    def state(self, step):
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng(), "step": step, "config": self.config}


def test_stop_at_then_resume_is_a_straight_run(tmp_path):
    Toy(str(tmp_path / "full")).fit()
    Toy(str(tmp_path / "part"), stop_at=3).fit()
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=False)["step"] == 3
    with pytest.raises(PartkitError, match="already holds a run"):
        Toy(str(tmp_path / "part"))
    with pytest.raises(PartkitError, match=r"--lr is 0\.5, the run's 0\.1"):
        Toy(str(tmp_path / "part"), lr=0.5, resume=True).fit()
    Toy(str(tmp_path / "part"), resume=True).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "part" / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "part" / "config.json").read_text()) == {"lr": 0.1, "steps": 6}


def test_the_run_folder_is_made_only_when_training_starts(tmp_path):
    with pytest.raises(PartkitError, match="--lr"):
        Toy(str(tmp_path / "bad"), lr=float("nan"))
    with pytest.raises(PartkitError, match="--stop-at"):
        Toy(str(tmp_path / "bad"), stop_at=0)
    run = RunDir(str(tmp_path / "lazy"))
    assert not (tmp_path / "lazy").exists()
    run.write_config({"a": 1})
    assert (tmp_path / "lazy" / "config.json").exists()
    with pytest.raises(PartkitError, match="not found"):
        RunDir(str(tmp_path / "none"), resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PartkitError, match="is a file"):
        RunDir(str(tmp_path / "file"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0])
def test_check_rate_names_the_option_and_the_fix(value):
    with pytest.raises(PartkitError, match=r"^--lr must be a finite number > 0, got .*; pass"):
        check_rate("--lr", value)
    check_rate("--lr", 1e-4)
    check_rate("--decay", 0.0, strict=False, high=1.0)
    with pytest.raises(PartkitError, match="<= 1"):
        check_rate("--decay", 1.5, strict=False, high=1.0)


def test_check_count():
    check_count("--epochs", None)
    check_count("--warmup", 0, 0)
    for bad in (0, -3, 1.5):
        with pytest.raises(PartkitError, match=r"--epochs must be an integer >= 1, got .*; pass --epochs 1 or more"):
            check_count("--epochs", bad)


def test_batch_orders_visit_every_sample_once_per_epoch():
    n, b = 10, 4
    first = sum((epoch_batch_indices(s, n, b, seed=3) for s in range(math.ceil(n / b))), [])
    assert sorted(set(first)) == list(range(n)) and len(first) == 12  # the last batch wraps around
    assert epoch_batch_indices(0, n, b, 3) != epoch_batch_indices(3, n, b, 3)  # another epoch, another order
    stream = sum((stream_batch_indices(s, n, 5, rank=0, world=1, seed=0) for s in range(2)), [])
    assert sorted(stream) == list(range(n))
    ranks = [stream_batch_indices(0, n, 5, rank=r, world=2, seed=0) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(n))  # two ranks split one step's samples


def test_to_device_and_full_precision_keep_structure():
    from partkit.decoder.train import full_precision
    from partkit.training import to_device

    batch = {"x": torch.ones(2, dtype=torch.float16), "t": [{"m": torch.zeros(1, dtype=torch.bool)}], "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["x"].dtype == torch.float16 and moved["t"][0]["m"].dtype == torch.bool and moved["n"] == 3
    full = full_precision({"a": torch.ones(1, dtype=torch.float16), "aux": [{"b": torch.ones(1, dtype=torch.bfloat16)}],
                           "i": torch.ones(1, dtype=torch.long)})
    assert full["a"].dtype == full["aux"][0]["b"].dtype == torch.float32 and full["i"].dtype == torch.long
