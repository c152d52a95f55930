"""Process-wide settings: device, threads, seeding."""
from __future__ import annotations

import os
import random

import numpy as np

from .errors import PartkitError

__all__ = ["resolve_device", "set_threads", "seed_everything"]


def resolve_device(device: str = "auto"):
    """``auto`` -> cuda when available else cpu; ``cuda``/``cuda:N``/``cpu``/``mps`` as given."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PartkitError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PartkitError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto") from None


def set_threads(threads: int | None) -> None:
    """Cap torch, BLAS and OpenMP pools so several runtimes do not oversubscribe the cores."""
    if not threads:
        return
    if threads < 1:
        raise PartkitError(f"--threads must be at least 1, got {threads}")
    import torch
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# The options of the command running now, as ``--config`` reads them back ({option_name: value}); set by the CLI,
# recorded by a training run in its config.json under "options" so `--config RUN/config.json` repeats the run.
_command_options: dict | None = None


def set_command_options(options: dict | None) -> None:
    global _command_options
    _command_options = options


def command_options() -> dict | None:
    return _command_options
