#!/usr/bin/env python
"""Does part-contrast fine-tuning help few-shot part segmentation? PARTICLE's question on CCP.

1. Pack Clothing Co-Parsing (``$PARTKIT_SHARED/data/ccp``: street photos, 58 clothing/hair/skin
   names) with its label names; ``scripts/ccp_parts.json`` groups the 58 names into 7 coarse parts
   (background, skin, hair, upper clothes (incl. dresses), lower clothes, shoes, accessories).
2. Fine-tune EfficientNet-Lite0 with ``self-train --objective part-contrast`` on the packed images
   alone (no labels are read).
3. Run ``fewshot-seg`` (the first N images train, the next M are held out in folds) for the
   ImageNet-pretrained and the fine-tuned backbone with the same budget and seed.

The table goes to stderr, the JSON report (both rows and every option) to stdout and OUT/report.json.
``--tiny`` runs it at toy size (CI).

    python scripts/ccp_fewshot.py --out ccp-run --threads 1
    python scripts/ccp_fewshot.py --out ccp-run --threads 1 --lr 1e-3 --repeats 3   # reuses the run's pack + part-contrast
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("PARTKIT_SHARED", ROOT.parent / "shared")) / "data" / "ccp"
PART_MAP = ROOT / "scripts" / "ccp_parts.json"

# (real, tiny) defaults; every one can be set on the command line
DEFAULTS = {
    "images": (110, 9), "train_images": (10, 3), "folds": (5, 3), "size": (128, 64), "epochs": (50, 2),
    "eval_every": (5, 1), "batch_size": (8, 3), "pc_rounds": (2, 1), "pc_epochs": (9, 1), "pc_round_epochs": (9, 1), "pc_batch": (16, 3),
    "pc_size": (128, 64), "pc_lr": (0.005, 0.005), "pc_round_lr": (0.005, 0.005), "pc_k": (25, 8), "repeats": (1, 1), "lr": (1e-4, 1e-4),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Folder for the packed shard, the part-contrast run and report.json.")
    p.add_argument("--data", default=str(DATA), help="The CCP folder (images/, labels/, label_names.json).")
    p.add_argument("--tiny", action="store_true", help="Toy sizes (CI).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a shared 2-core box).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    for name in DEFAULTS:
        kind = float if name in ("pc_lr", "pc_round_lr", "lr") else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args(argv)
    for name, (real, tiny) in DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else real)
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    import torch

    from partkit._log import log
    from partkit.contrast import part_contrast
    from partkit.errors import PartkitError
    from partkit.fewshot import fewshot_seg
    from partkit.io import Output, write_atomic
    from partkit.pack import pack

    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data)
    if not (data / "images").is_dir():
        raise SystemExit(f"ccp_fewshot: no CCP images in {data}/images; pass --data or set PARTKIT_SHARED")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}

    t = time.perf_counter()
    packed = out / "ccp"
    files = sorted((data / "images").glob("*.jpg"))[:a.images]
    if not (packed / "000000.tar").exists():
        pack([str(f) for f in files], labels=str(data / "labels"), label_names=str(data / "label_names.json"),
             output=Output(str(packed), shard_size=10 ** 6))
    shard = str(packed / "000000.tar")
    times["pack"] = time.perf_counter() - t

    t = time.perf_counter()
    run = out / "part-contrast"
    if not (run / "backbone.pt").exists():
        part_contrast([shard], str(run), model="efficientnet_lite0", rounds=a.pc_rounds, epochs=a.pc_epochs,
                      round_epochs=a.pc_round_epochs, batch_size=a.pc_batch, size=a.pc_size, lr=a.pc_lr,
                      round_lr=a.pc_round_lr, k=a.pc_k, device=a.device, seed=a.seed,
                      log_every=10)
    times["part_contrast"] = time.perf_counter() - t

    rows = {}
    common = dict(model="efficientnet_lite0", train_images=a.train_images, eval_images=a.images - a.train_images,
                  folds=a.folds, epochs=a.epochs, eval_every=a.eval_every, batch_size=a.batch_size, size=a.size,
                  part_map=str(PART_MAP), device=a.device, seed=a.seed, repeats=a.repeats, lr=a.lr)
    for name, weights in (("ImageNet (pretrained)", None), ("+ part-contrast on CCP", str(run))):
        t = time.perf_counter()
        try:
            rows[name] = fewshot_seg([shard], weights=weights, **common)
        except PartkitError as e:
            raise SystemExit(f"ccp_fewshot: {e}")
        times[name] = time.perf_counter() - t

    log(f"CCP few-shot part segmentation: EfficientNet-Lite0, {a.train_images} training images, "
        f"{a.images - a.train_images} held out in {a.folds} folds, 7 coarse parts, {a.epochs} epochs at {a.size} px, "
        f"lr {a.lr:g}, {a.repeats} seed(s); "
        f"part-contrast: {a.pc_epochs} + {a.pc_rounds - 1} x {a.pc_round_epochs} epochs, batch {a.pc_batch}, "
        f"{a.pc_size} px, lr {a.pc_lr:g} / rounds {a.pc_round_lr:g}")
    spread = "per seed (mean over folds)" if a.repeats > 1 else "per fold (test)"
    log(f"{'backbone':26s} {'mIoU':>14s}   {spread}")
    for name, r in rows.items():
        parts = [x["value"] for x in r["runs"]] if a.repeats > 1 else [f["test_miou"] for f in r["folds"]]
        log(f"{name:26s} {r['value']:6.2f} ± {r['std']:5.2f}   " + " ".join(f"{v:.1f}" for v in parts))
    report = {"options": vars(a), "seconds": {k: round(v, 1) for k, v in times.items()},
              "rows": {name: {k: r[k] for k in ("value", "std", "folds", "runs", "fold_std", "per_part",
                                                  "last_epoch_miou", "weights", "protocol", "unmapped_pixels")
                              if k in r} for name, r in rows.items()}}
    text = json.dumps(report, indent=1)
    write_atomic(str(out / "report.json"), (text + "\n").encode())
    print(text)
    return report


if __name__ == "__main__":
    main()
