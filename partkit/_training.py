"""Machinery shared by the training commands: run folders, checkpoints, exact resume, DDP, logs."""
from __future__ import annotations

import io
import json
import os
import random
from typing import Optional

import numpy as np
import torch

from .errors import PartkitError
from .io import write_atomic

__all__ = ["Distributed", "RunDir", "rng_state", "set_rng_state", "cosine_warmup"]


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

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
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


class RunDir:
    """A training run folder: config.json, metrics.jsonl, loss.png, checkpoints (atomic writes)."""

    def __init__(self, path: str, *, main: bool = True, resume: bool = False):
        self.path = path
        self.main = main
        if main:
            if os.path.isfile(path):
                raise PartkitError(f"--out {path!r} is a file; pass a folder for the run")
            if not resume and os.path.exists(os.path.join(path, "last.pt")):
                raise PartkitError(f"{path!r} already holds a run; pass --resume to continue it or pick a new --out")
            os.makedirs(path, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_config(self, config: dict) -> None:
        if self.main:
            write_atomic(self.file("config.json"), json.dumps(config, indent=1, sort_keys=True).encode())

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.file("metrics.jsonl"), "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

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
