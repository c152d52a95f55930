"""The dataset recipes' registry: a name -> how to read that benchmark's official folder.

A reader is a plain function ``read(root, split) -> Recipe`` decorated with
:func:`register_dataset`; it checks the layout up front (a missing file is a one-line error
naming it) and returns the samples to write, each built lazily by ``Recipe.prepare``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import PartkitError

__all__ = ["Dataset", "Recipe", "DATASETS", "register_dataset", "get_dataset", "require", "read_table"]


@dataclass
class Recipe:
    """What one split of a dataset folder packs into.

    ``items``: ``(key, item)`` in output order; ``prepare(key, item)`` -> the sample (may raise
    ``BadSample``); ``files``: the input files a folder output fingerprints; ``config``: what the
    reader adds to the run's recorded config.
    """

    items: list
    prepare: Callable[[str, object], dict]
    files: list = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    splits: tuple
    layout: str  # the expected layout, in one line (errors and the README table)
    read: Callable[[str, str], Recipe]


DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, *, title: str, splits: Sequence[str], layout: str):
    """Register ``read(root, split) -> Recipe`` under ``name``; ``all`` is always a split."""
    def wrap(read: Callable[[str, str], Recipe]):
        DATASETS[name] = Dataset(name, title, tuple(splits) + ("all",), layout, read)
        return read
    return wrap


def get_dataset(name: str) -> Dataset:
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise PartkitError(f"unknown --dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def require(dataset: Dataset | str, root: str, *relative: str, kind: str = "file") -> str:
    """``root/relative...`` when it exists (a file, or a folder with ``kind="folder"``), else a one-line error
    naming what is missing and the layout expected."""
    path = os.path.join(root, *relative)
    ok = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
    if not ok:
        ds = dataset if isinstance(dataset, Dataset) else DATASETS[dataset]
        raise PartkitError(f"{ds.title} root {root!r} lacks the {kind} {os.path.join(*relative)!r}; expected "
                           f"{ds.layout}")
    return path


def read_table(path: str, columns: int, *, text_last: bool = False) -> list[list[str]]:
    """A whitespace-separated text file (CUB's ``images.txt`` style): rows of ``columns`` fields; with
    ``text_last`` the last field takes the rest of the line (names with spaces). A malformed line is a
    one-line error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(None, columns - 1) if text_last else line.split()
            if len(parts) != columns:
                raise PartkitError(f"{path} line {n} has {len(parts)} fields, expected {columns}: "
                                   f"{line.strip()[:60]!r}")
            rows.append([p.strip() for p in parts])
    return rows
