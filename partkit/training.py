"""The one training loop: run folder, config check on resume, exact resume, DDP, logging, ``--stop-at``.

:class:`Trainer` owns the loop; a model supplies ``train_step`` (forward, backward, optimizer
step) and its checkpoint contents. Used by ``train-decoder`` (:class:`partkit.decoder.train.DecoderTrainer`),
``self-train`` (both objectives) and ``distill-3d``'s student.
"""
from __future__ import annotations

import io
import json
import os
import math
import numbers
import random
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ._log import log, progress
from .errors import PartkitError
from .io import write_atomic

__all__ = ["Trainer", "Distributed", "RunDir", "rng_state", "set_rng_state", "cosine_warmup", "load_checkpoint",
           "require", "check_count", "check_rate", "epoch_batch_indices", "stream_batch_indices", "digest", "to_device"]


# ---------------------------------------------------------------------------------------------
# Options: validated once, before any work, with a one-line error that names the option and the fix


def require(ok: bool, option: str, value, expected: str, fix: str = "") -> None:
    """Raise ``PartkitError("OPTION must be EXPECTED, got VALUE; FIX")`` unless ``ok``."""
    if not ok:
        raise PartkitError(f"{option} must be {expected}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_count(option: str, value, low: int = 1, fix: str = "") -> None:
    """An integer option of at least ``low`` (steps, epochs, sizes, batch sizes)."""
    if value is not None:
        require(isinstance(value, (int, np.integer)) and value >= low, option, value, f"an integer >= {low}",
                fix or f"pass {option} {max(low, 1)} or more")


def check_rate(option: str, value, *, low: float = 0.0, high: float = math.inf, strict: bool = True,
               fix: str = "") -> None:
    """A finite float option in ``(low, high]`` (``strict``) or ``[low, high]`` (learning rates, decays)."""
    if value is None:
        return
    ok = isinstance(value, (int, float, np.number)) and math.isfinite(value) and (value > low if strict else value >= low) \
        and value <= high
    bound = f"> {low:g}" if strict else f">= {low:g}"
    expected = f"a finite number {bound}" + (f" and <= {high:g}" if math.isfinite(high) else "")
    require(ok, option, value, expected, fix or f"pass {option} with {expected}")


# ---------------------------------------------------------------------------------------------
# Batch order: both orders depend on the step only, so a resumed run reads what a straight run reads


def epoch_batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Epoch-shuffled order: step -> (epoch, slot) -> indices of a seeded permutation (wrapping the last batch)."""
    per_epoch = max(1, math.ceil(n / batch))
    epoch, slot = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    idx = perm[slot * batch:(slot + 1) * batch]
    return idx + perm[: batch - len(idx)] if len(idx) < batch else idx


def stream_batch_indices(step: int, n: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """Streaming order: positions ``step*B*world + rank*B ...`` in a stream of per-epoch seeded permutations."""
    start = (step * world + rank) * batch
    out = []
    for p in range(start, start + batch):
        epoch, i = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


LOGS = ("jsonl", "tensorboard")


def check_log(value: str) -> None:
    """``--log``: ``jsonl`` (metrics.jsonl only, the default) or ``tensorboard`` (also event files), which needs
    the ``tensorboard`` package."""
    if value not in LOGS:
        raise PartkitError(f"--log must be one of {', '.join(LOGS)}, got {value!r}")
    if value == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise PartkitError('--log tensorboard needs the tensorboard package: pip install "partkit[tensorboard]" '
                               "(metrics.jsonl is written either way)") from None


def to_device(x, device: torch.device):
    """Tensors (in dicts, lists, tuples) onto ``device``; on CUDA from pinned memory, without blocking the host."""
    if isinstance(x, torch.Tensor):
        if device.type != "cuda":
            return x.to(device)
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def digest(keys: Sequence[str]) -> str:
    """SHA-1 of a list of sample keys: recorded in a run's config so resuming on other data is refused."""
    import hashlib

    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


class Distributed:
    """torchrun-aware process group: gloo on CPU, nccl on CUDA; a no-op for one process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value):
        """Rank 0's ``value`` (picklable) on every rank; waits for all, like :meth:`barrier`."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear the process group down in step: every rank waits for the others, then the wrappers that
        still hold the group (unreferenced by the caller) are collected before it is destroyed, so its
        C++ threads are joined now rather than while the interpreter shuts down (where a rank exiting
        with gloo work still referenced aborted: "terminate called without an active exception", in one
        CI run and 1 of 36 local runs of a two-rank test under load)."""
        if self.world > 1:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                gc.collect()
                dist.destroy_process_group()


def rng_state(gen: Optional[torch.Generator] = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        state["generator"] = gen.get_state()
    return state


def set_rng_state(state: dict, gen: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None and "generator" in state:
        gen.set_state(state["generator"])


def cosine_warmup(optimizer, warmup: int, total: int):
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _scalars(record: dict, prefix: str = ""):
    """The numbers of a metrics record as (tag, value); nested records give ``val/AR@10``-style tags."""
    for key, value in sorted(record.items()):
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class RunDir:
    """A run folder: config.json, metrics.jsonl (+ TensorBoard events), loss.png, checkpoints (atomic writes).

    Checked when made (a file, or an existing run without ``resume``, is refused) but created only
    by the first write, so a run refused before training leaves no folder. ``path=None``: no folder.
    """

    def __init__(self, path: Optional[str], *, main: bool = True, resume: bool = False):
        self.path = path
        self.main = main and path is not None
        if self.main:
            if os.path.isfile(path):
                raise PartkitError(f"--out {path!r} is a file; pass a folder for the run")
            if not resume and os.path.exists(os.path.join(path, "last.pt")):
                raise PartkitError(f"{path!r} already holds a run; pass --resume to continue it or pick a new --out")
            if resume and not os.path.exists(os.path.join(path, "last.pt")):
                raise PartkitError(f"--resume: no run to continue in {path!r} (last.pt not found); drop --resume "
                                   "to start one")

    def _made(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_config(self, config: dict) -> None:
        if self.main:
            from ._runtime import command_options

            if command_options() is not None and "options" not in config:
                config = {**config, "options": command_options()}  # what `--config RUN/config.json` reads back
            self._made()
            write_atomic(self.file("config.json"), json.dumps(config, indent=1, sort_keys=True).encode())

    events = None  # a TensorBoard SummaryWriter with --log tensorboard (see open_events)

    def open_events(self, purge_step: Optional[int] = None) -> None:
        """``--log tensorboard``: also write every record's numbers as TensorBoard scalars (event files in the run
        folder); on resume, events at or after ``purge_step`` (written after the checkpoint) are hidden."""
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self._made()
            self.events = SummaryWriter(self.path, purge_step=purge_step)

    def close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    def log(self, record: dict) -> None:
        if self.main:
            self._made()
            with open(self.file("metrics.jsonl"), "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            if self.events is not None:
                step = int(record.get("step", 0))
                for tag, value in _scalars({k: v for k, v in record.items() if k != "step"}):
                    self.events.add_scalar(tag, value, step)
                self.events.flush()  # on disk with its metrics.jsonl line, so a killed run keeps both

    def truncate_log(self, step: int) -> None:
        """On resume, drop records written after the checkpoint so the log matches an uninterrupted run."""
        path = self.file("metrics.jsonl")
        if not self.main or not os.path.exists(path):
            return
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("step", 0) <= step]
        write_atomic(path, "".join(keep).encode())

    def save(self, state: dict, name: str = "last.pt") -> None:
        if self.main:
            self._made()
            buf = io.BytesIO()
            torch.save(state, buf)
            write_atomic(self.file(name), buf.getvalue())

    def load(self, name: str = "last.pt") -> dict:
        return load_checkpoint(self.file(name))

    def plot_losses(self, keys=("loss",)) -> None:
        """loss.png from metrics.jsonl (matplotlib, Agg)."""
        if not self.main or not os.path.exists(self.file("metrics.jsonl")):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.file("metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        write_atomic(self.file("loss.png"), buf.getvalue())


def load_checkpoint(path: str) -> dict:
    """Load a partkit checkpoint with a one-line error when it is missing or corrupt."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise PartkitError(f"checkpoint {path!r} not found; pass a run folder written by train-decoder/self-train")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise PartkitError(f"checkpoint {path!r} is corrupt or not a partkit checkpoint ({type(e).__name__}); "
                           "retrain or restore it") from None


# ---------------------------------------------------------------------------------------------
# The loop


def _plain(value):
    """JSON view of a config value (tuples and lists compare equal; numpy scalars as numbers)."""
    return json.loads(json.dumps(value, default=str))


class Trainer:
    """The training loop shared by every partkit model.

    A subclass sets ``net``, ``opt``, ``sched`` (and ``gen``, a ``torch.Generator`` whose state is
    checkpointed, or ``None``), ``steps`` and ``config``, and implements:

    - ``train_step(step) -> dict``: one step (forward, backward, optimizer step); the metrics record,
      with at least ``step`` (the step count after it) and ``loss``;
    - ``state(step) -> dict``: the checkpoint, in the model's own layout, holding at least
      ``model_key`` (the weights), ``optimizer``, ``scheduler``, ``rng`` (:meth:`rng`), ``step``
      and ``config``;
    - ``load_state(ckpt)``: what ``state`` added beyond weights, optimizer, scheduler and RNG;
    - ``resume_options(config) -> dict``: the options that must match to resume, flat
      (``{"--lr": 1e-4, ...}``), read from a run's ``config`` (``saved_config`` finds it in a
      checkpoint); the default checks none.

    Example (a toy model in tests/test_training.py)::

        class Toy(Trainer):
            def __init__(self, out, resume=False, stop_at=None):
                self.setup_run(out, device=torch.device("cpu"), resume=resume, stop_at=stop_at)
                self.net, self.opt, self.sched, self.steps, self.config = ...

    A trainer that streams its data sets ``loader`` (a :class:`partkit.streaming.StreamLoader`);
    its position (per rank) is checkpointed and restored, so a resumed run reads what a straight run reads.

    The base owns the run folder (``RunDir``, made lazily), the config check on ``--resume`` (one
    line naming the options that differ), exact resume (weights, optimizer, scheduler, every RNG,
    the step, the stream position; the log is cut back to the checkpoint), ``--stop-at``, checkpoint and log cadence,
    DDP (``Distributed``: only rank 0 writes and talks), the loss curve and the final log line.
    """

    command = "train"
    model_key = "model"  # the checkpoint key of the network's weights
    loss_keys: tuple = ("loss",)  # the curves of loss.png

    def setup_run(self, out: Optional[str], *, device, resume: bool = False, stop_at: Optional[int] = None,
                  log_every: int = 1, checkpoint_every: int = 100, run: Optional[RunDir] = None,
                  log_to: str = "jsonl") -> None:
        """Process group, run folder (checked, not yet made; or ``run``, checked earlier) and the loop's
        options (``log_to``: ``--log``, :func:`check_log`); call first."""
        check_count("--stop-at", stop_at, fix="pass the step to checkpoint and stop at, or drop --stop-at")
        check_log(log_to)
        self.log_to = log_to
        check_count("--log-every", log_every)
        check_count("--checkpoint-every", checkpoint_every)
        self.out, self.resume, self.stop_at = out, resume, stop_at
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        if not hasattr(self, "dist"):
            self.dist = Distributed(device)
        self.dev = self.dist.device
        self.run = run if run is not None else RunDir(out, main=self.dist.main, resume=resume)
        self.gen: Optional[torch.Generator] = getattr(self, "gen", None)

    def say(self, message: str) -> None:
        if self.dist.main:
            log(message)

    # ---- hooks
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def state(self, step: int) -> dict:
        raise NotImplementedError

    def load_state(self, ckpt: dict) -> None:
        pass

    def resume_options(self, config: dict) -> dict:
        return {}

    def saved_config(self, ckpt: dict) -> dict:
        """The run's config as ``resume_options`` reads it, from its checkpoint."""
        return ckpt.get("config") or {}

    def log_now(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.steps

    def after_log(self, done: int) -> None:
        """After a step's record is logged (validation, round ends)."""

    def summary(self, history: list, end: int) -> dict:
        return {"steps": self.steps, "losses": history, "out": self.out}

    # ---- checkpoints
    def rng(self):
        """Every RNG of this process (and the generator); under DDP the list of every rank's."""
        state = rng_state(self.gen)
        if self.dist.world > 1:
            import torch.distributed as tdist

            gathered = [None] * self.dist.world
            tdist.all_gather_object(gathered, state)
            return gathered
        return state

    def loader_state(self):
        """How many items of its stream each rank consumed (a list under DDP), or None without a stream."""
        if getattr(self, "loader", None) is None:
            return None
        if self.dist.world > 1:
            import torch.distributed as tdist

            gathered = [None] * self.dist.world
            tdist.all_gather_object(gathered, self.loader.position)
            return gathered
        return self.loader.position

    def checkpoint(self, step: int) -> None:
        state = self.state(step)
        loader = self.loader_state()
        if loader is not None:
            state["loader"] = loader
        self.run.save(state)

    def check_resume(self, saved: dict) -> None:
        """Refuse to resume when an option that defines the run differs from the checkpoint's."""
        before, now = self.resume_options(saved), self.resume_options(self.config)
        diff = [k for k in now if k in before and _plain(before[k]) != _plain(now[k])]
        if diff:
            what = "; ".join(f"{k} is {_plain(now[k])!r}, the run's {_plain(before[k])!r}" for k in diff)
            raise PartkitError(f"cannot resume {self.out!r} with other options ({what}); rerun with the run's "
                               f"options, or pick a new --out to start a new run")

    def restore(self) -> int:
        ckpt = self.run.load()
        if "step" not in ckpt or "optimizer" not in ckpt:
            raise PartkitError(f"{self.run.file('last.pt')!r} holds no training state to resume; pick a new --out")
        self.check_resume(self.saved_config(ckpt))
        try:
            self.net.load_state_dict(ckpt[self.model_key])
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PartkitError(f"cannot resume {self.out!r}: its weights do not fit this model ({first}); rerun "
                               "with the run's options, or pick a new --out") from None
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        set_rng_state(rng[self.dist.rank] if isinstance(rng, list) else rng, self.gen)
        self.load_state(ckpt)
        if getattr(self, "loader", None) is not None and "loader" in ckpt:
            pos = ckpt["loader"]
            self.loader.seek(pos[self.dist.rank] if isinstance(pos, list) else pos)
        self.run.truncate_log(ckpt["step"])
        return ckpt["step"]

    # ---- the loop
    def fit(self) -> dict:
        steps = self.steps
        if getattr(self, "loader", None) is not None:
            self.loader.seek(0)  # a straight run reads its stream from the start (restore seeks on)
        start = self.restore() if self.resume else 0
        if self.resume:
            self.say(f"{self.command}: resumed at step {start}")
        self.run.write_config(self.config)
        if getattr(self, "log_to", "jsonl") == "tensorboard":
            self.run.open_events(purge_step=start + 1 if self.resume else None)
        self.net.train()
        end = min(steps, self.stop_at or steps)
        history = []
        t0 = time.perf_counter()
        with progress(self.command, total=steps) as bar:
            bar.update(start)
            for step in range(start, end):
                record = self.train_step(step)
                done = step + 1
                bar.update(1)
                history.append(record["loss"])
                if self.log_now(done):
                    self.run.log(record)
                self.after_log(done)
                if done % self.checkpoint_every == 0 or done == end:
                    self.checkpoint(done)
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        self.run.close_events()
        self.run.plot_losses(self.loss_keys)
        final = f"{history[-1]:.3f}" if history else "n/a"
        where = f" -> {self.out}" if self.out else ""
        self.say(f"{self.command}: {len(history)} steps in {time.perf_counter() - t0:.1f}s, final loss {final}{where}")
        if end < steps:
            self.say(f"{self.command}: stopped at step {end} of {steps} (--stop-at); continue with --resume")
        if isinstance(getattr(self, "ddp", None), torch.nn.parallel.DistributedDataParallel):
            self.ddp = self.ddp.module  # the wrapper holds the process group that close() destroys
        self.dist.close()
        return self.summary(history, end)
