#!/usr/bin/env python
"""PartDistillation's stages on real car parts: does each stage beat the one before?

Data: ``../shared/data/carparts`` (400 real cars, 18 annotated parts as COCO part instances).
Packed with ``pack --coco-as parts --category car`` (the object mask is the union of the parts: the
data has no whole-car masks). Fixed split by sample key: the first 300 keys in sorted order learn,
the last 100 are scored. Part labels are never used to learn; they only score.

Rows (all scored on the 100 held-out cars):

1. baseline: one-stage dataset-scope k-means (k = number of parts) fit on the 300 training cars'
   object cells, applied to the held-out cars (``cluster --scope dataset --fit-on``);
2. clusters: per-object k-means (``cluster --scope object``) computed on the held-out cars
   themselves (their AR@k is what the decoder must beat);
3. decoder: ``train-decoder`` on the training cars' object clusters, ``predict`` on the held-out;
4. rank: ``rank fit`` on the decoder's training-set proposals, ``rank apply`` on the held-out
   (``ranked_parts.png``);
5. class-specific self-training: ``rank apply --as-targets`` on the training cars, ``self-train
   --labeled --recipe partdistillation`` from the decoder, ``predict --label-map --label-rule semantic
   --objects-from gt_objects`` on the held-out (``pred_parts.png``, class ids: the same id is the same
   part in every image; Mask2Former's semantic inference inside the object, as rank labels object
   pixels only).

Metrics: PartDistillation's mIoU (``eval --protocol partdistillation``: its official evaluator,
majority matching per object class fitted on the scored data, background counted), pooled NMI and
ARI over object pixels, and AR@k of proposals (``eval ar``; rows 2-5).

The table goes to stderr, the JSON of every row to stdout. ``--tiny`` runs it at toy size (CI).

    python scripts/quality_carparts.py --work /tmp/carparts-quality
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PARTKIT_SHARED", ROOT.parent / "shared")) / "data" / "carparts"

FULL = dict(n_train=300, n_test=100, size=320, k_parts=18, k_object=8, steps=1000, lr=3e-4, queries=50,
            hidden=128, layers=3, crop=20, batch=4, rank_k=18, st_steps=500, topk=50)
TINY = dict(n_train=6, n_test=3, size=96, k_parts=6, k_object=3, steps=4, lr=1e-3, queries=6,
            hidden=16, layers=1, crop=6, batch=2, rank_k=3, st_steps=2, topk=6)


def partkit(*args, quiet: bool = True) -> str:
    cmd = [sys.executable, "-c", "from partkit.cli.main import main; main()", *map(str, args)]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"quality_carparts: `partkit {' '.join(map(str, args))}` failed")
    if not quiet:
        sys.stderr.write(res.stderr)
    print(f"  [{time.time() - t:6.1f} s] partkit {' '.join(map(str, args))[:150]}", file=sys.stderr)
    return res.stdout


def split(work: Path, p: dict) -> None:
    """Pack all cars once, then write the fixed train/test shards (sorted keys)."""
    from partkit.io import TarSampleWriter, iter_tar

    if (work / "test.tar").exists():
        return
    images = sorted((DATA / "images").glob("*.jpg"))
    partkit("pack", *images, "--coco", DATA / "annotations.json", "--coco-as", "parts", "--category", "car",
            "-o", work / "packed")
    samples = [s for t in sorted((work / "packed").glob("*.tar")) for s in iter_tar(open(t, "rb"), str(t))]
    samples.sort(key=lambda s: s["__key__"])
    parts = {"train": samples[:300][:p["n_train"]], "test": samples[300:][:p["n_test"]]}
    for name, chunk in parts.items():
        tmp = work / f"{name}.tar.tmp"
        with open(tmp, "wb") as f:
            w = TarSampleWriter(f)
            for s in chunk:
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
            w.close()
        os.replace(tmp, work / f"{name}.tar")


def scores(folder: Path, pred: str, proposals: str = None) -> dict:
    """mIoU (PartDistillation protocol), NMI, ARI of a label map; AR@k of a proposals field."""
    out = json.loads(partkit("eval", "miou", "nmi", "ari", folder, "--protocol", "partdistillation",
                             "--pred", pred, "--average", "pooled"))["metrics"]
    row = {m: round(out[m]["value"] if isinstance(out[m], dict) else out[m], 2) for m in ("miou", "nmi", "ari")}
    if proposals:
        ar = json.loads(partkit("eval", "ar", folder, "--proposals", proposals))["metrics"]["ar"]
        row.update({k: round(v, 2) for k, v in ar.items() if k in ("ar@1", "ar@10", "ar@50", "ar@200")})
    return row


def with_cluster_proposals(src: Path, dst: Path) -> None:
    """Raw clusters as scored proposals (``proposals_from_labels``), so ``eval ar`` compares them fairly."""
    from partkit.decoder.predict import proposals_from_labels
    from partkit.io import TarSampleWriter, encode_json, iter_tar

    dst.mkdir(exist_ok=True)
    with open(dst / "000000.tar", "wb") as f:
        w = TarSampleWriter(f)
        for t in sorted(src.glob("*.tar")):
            for s in iter_tar(open(t, "rb"), str(t)):
                s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                s["proposals.json"] = encode_json(proposals_from_labels(s, "parts.png"))
                w.write(s)
        w.close()


def run(work: Path, p: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    split(work, p)
    rows = {}
    for name in ("train", "test"):
        if not (work / f"feat_{name}").exists():
            partkit("extract", work / f"{name}.tar", "--model", "efficientnet_lite0", "--size", p["size"],
                    "-o", work / f"feat_{name}")
    # 1. one-stage baseline
    if not (work / "baseline").exists():
        partkit("cluster", work / "feat_test", "--scope", "dataset", "-k", p["k_parts"], "--fg-from", "gt_objects",
                "--fit-on", work / "feat_train", "-o", work / "baseline")
    rows["baseline: dataset k-means"] = scores(work / "baseline", "parts.png")
    # 2. per-object clusters (train: the decoder's targets; test: the AR to beat)
    for name in ("train", "test"):
        if not (work / f"clu_{name}").exists():
            partkit("cluster", work / f"feat_{name}", "--scope", "object", "-k", p["k_object"], "--fg-from",
                    "gt_objects", "-o", work / f"clu_{name}")
    if not (work / "clu_test_props").exists():
        with_cluster_proposals(work / "clu_test", work / "clu_test_props")
    rows["object clusters"] = scores(work / "clu_test_props", "parts.png", "proposals.json")
    # 3. decoder
    dec = ["--queries", p["queries"], "--hidden", p["hidden"], "--dec-layers", p["layers"]]
    if not (work / "dec" / "last.pt").exists():
        partkit("--seed", 0, "train-decoder", work / "clu_train", "--out", work / "dec", *dec, "--max-steps",
                p["steps"], "--lr", p["lr"], "--batch-size", p["batch"], "--crop-grid", p["crop"], "--warmup",
                max(1, p["steps"] // 20), "--checkpoint-every", p["steps"], "--log-every", max(1, p["steps"] // 10))
    for name, src in (("train", "clu_train"), ("test", "feat_test")):
        if not (work / f"pred_{name}").exists():
            partkit("predict", work / src, "--checkpoint", work / "dec", "--topk", p["topk"], "--label-map",
                    "-o", work / f"pred_{name}")
    rows["decoder"] = scores(work / "pred_test", "pred_parts.png", "proposals.json")
    # 4. rank
    if not (work / "rank.npz").exists():
        partkit("--seed", 0, "rank", "fit", work / "pred_train", "--model-out", work / "rank.npz", "-k", p["rank_k"])
    if not (work / "ranked_test").exists():
        partkit("rank", "apply", work / "pred_test", "--model", work / "rank.npz", "-o", work / "ranked_test")
    rows["rank"] = scores(work / "ranked_test", "ranked_parts.png", "ranked.json")
    # 5. class-specific self-training: the ranked clusters of the training cars as classes
    if not (work / "targets_train").exists():
        partkit("rank", "apply", work / "pred_train", "--model", work / "rank.npz", "--as-targets",
                "-o", work / "targets_train")
    if not (work / "final" / "last.pt").exists():
        partkit("--seed", 0, "self-train", work / "targets_train", "--teacher", work / "dec", "--labeled",
                work / "targets_train", "--labeled-field", "targets.png", "--recipe", "partdistillation",
                "--out", work / "final", "--max-steps", p["st_steps"], "--lr", p["lr"], "--batch-size", p["batch"],
                "--crop-grid", p["crop"], "--warmup", max(1, p["st_steps"] // 20), "--checkpoint-every",
                p["st_steps"], "--log-every", max(1, p["st_steps"] // 10))
    if not (work / "final_test").exists():
        partkit("predict", work / "feat_test", "--checkpoint", work / "final", "--topk", p["topk"], "--label-map",
                "--label-rule", "semantic", "--objects-from", "gt_objects", "-o", work / "final_test")
    rows["class-specific self-train"] = scores(work / "final_test", "pred_parts.png", "proposals.json")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="carparts-quality", help="working folder (reruns reuse finished steps)")
    ap.add_argument("--tiny", action="store_true", help="toy size, for CI")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"quality_carparts: {DATA} not found; set PARTKIT_SHARED to the shared folder")
    p = TINY if args.tiny else FULL
    t = time.time()
    rows = run(Path(args.work), p)
    cols = ("miou", "nmi", "ari", "ar@1", "ar@10", "ar@50", "ar@200")
    print(f"car parts, {p['n_train']} cars learn / {p['n_test']} held-out cars scored ({time.time() - t:.0f} s)",
          file=sys.stderr)
    print(f"{'row':32s}" + "".join(f"{c:>8s}" for c in cols), file=sys.stderr)
    for name, r in rows.items():
        print(f"{name:32s}" + "".join(f"{r[c]:8.2f}" if c in r else f"{'-':>8s}" for c in cols), file=sys.stderr)
    print(json.dumps({"params": p, "rows": rows}))


if __name__ == "__main__":
    main()
