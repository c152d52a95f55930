"""``partkit pack --dataset NAME ROOT``: the part benchmarks' official folders to shards.

One module per dataset (``partimagenet``, ``cub``, ``pascal_part``, ``shapenetpart``) registers a
reader in :mod:`._registry`; :func:`pack_dataset` runs it through the same writer as ``pack``,
so the samples carry the fields ``pack`` writes (docs/FORMAT.md) and every stage reads them.

>>> pack_dataset("cub", "CUB_200_2011", split="test", output=Output("cub_test/"))  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

from ..errors import Handler, PartkitError, stop
from ..io import Output, encode_json, run_stage
from . import cub, partimagenet, pascal_part, shapenetpart  # noqa: F401  (they register themselves)
from ._registry import DATASETS, Dataset, Recipe, get_dataset, register_dataset

__all__ = ["pack_dataset", "DATASETS", "Dataset", "Recipe", "get_dataset", "register_dataset"]


def pack_dataset(name: str, root: str, *, split: str = "all", provenance: Optional[str] = None,
                 output: Output = Output(), handler: Handler = stop) -> dict:
    """Pack ``split`` of the dataset ``name`` found at ``root`` (its official layout, README ``pack --dataset``).

    Every sample's ``json`` records ``dataset`` and the sample's own ``split``."""
    ds = get_dataset(name)
    if split not in ds.splits:
        raise PartkitError(f"--split {split!r} is not a split of {ds.title}; choose one of {', '.join(ds.splits)}")
    if not os.path.isdir(root):
        raise PartkitError(f"{ds.title} root {root!r} is not a folder; expected {ds.layout}")
    recipe = ds.read(root, split)
    if not recipe.items:
        raise PartkitError(f"{ds.title} split {split!r} under {root!r} lists no samples; check the split files")
    seen: dict = {}
    for key, _ in recipe.items:
        if key in seen:
            raise PartkitError(f"{ds.title}: two samples give the key {key!r}; the dataset folder holds duplicates")
        seen[key] = True

    def source(rank: int, world: int) -> Iterator[dict]:
        for i, (key, item) in enumerate(recipe.items):
            if i % world == rank:
                yield {"__key__": key, "__item__": item}

    def prepare(rec: dict) -> dict:
        sample = recipe.prepare(rec["__key__"], rec["__item__"])
        meta = {**sample["json"], "dataset": ds.name}
        if provenance:
            meta["provenance"] = provenance
        sample["json"] = encode_json(meta)
        return sample

    config = {"dataset": ds.name, "root": os.path.abspath(root), "split": split, "provenance": provenance,
              **recipe.config}
    return run_stage([root], lambda batch: batch, output=output, name="pack", prepare=prepare, handler=handler,
                     config=config, source=source, input_files=sorted(set(recipe.files)))
