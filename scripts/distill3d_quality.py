#!/usr/bin/env python
"""distill-3d beyond one transductive run: a saved student on unseen shapes, and few-shot.

Learn on ShapeNetPart ``cap_test.npz`` (11 caps) without labels, then segment the 5 caps of
``cap_val.npz`` with the saved student (``distill-3d --student``). 3D mIoU as ``partkit eval
miou-3d`` (ShapeNetPart per-shape mIoU); discovered ids are matched to parts on the *training*
shapes (``--match-on``), never on the shapes scored. Rows:

- xyz k-means (k-means fit on the training shapes' xyz, applied to the new shapes);
- the 2D teacher back-projected on the new shapes (its k-means fit on the training shapes' views;
  unseen points take the nearest labelled point's id);
- the saved student on the new shapes;
- a student trained transductively on the new shapes (its own ids: matched on the new shapes, the
  only shapes it has; this is the old single-run protocol, for reference), with its epochs scaled so
  it takes as many optimizer steps as the saved student (5 shapes make one batch an epoch, 11 two);
- the saved (unsupervised) student again, its ids matched on the 2 labelled caps only: what the
  2 labels buy without training on them;
- few-shot: 2 labelled caps (``--labeled``) + the other 9 unlabelled, the student then applied to
  the new shapes; its ids are part ids (``--match none``).

The table goes to stderr, one JSON line per seed to stdout. ``--tiny`` runs it at toy size (CI).

    python scripts/distill3d_quality.py --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("PARTKIT_SHARED", ROOT.parent / "shared")) / "data" / "shapenetpart"
if not DATA.exists():
    DATA = ROOT / "examples" / "data" / "shapenetpart"

FULL = dict(teacher="parts", k=8, size=160, epochs=30, points=1024, width=32, depth=3)
TINY = dict(teacher="parts", k=4, size=64, epochs=2, points=128, width=8, depth=1, knn=4, elevations=(30,),
            azimuths=(0, 180))
ROWS = ("xyz k-means", "2D teacher, back-projected", "saved student", "transductive student (reference)",
        "saved student, matched on the 2 labelled caps only", "few-shot student (2 labelled)")


def _write(path: Path, samples: list) -> str:
    from partkit.io import TarSampleWriter

    with open(path, "wb") as f:
        w = TarSampleWriter(f)
        for s in samples:
            w.write({k: v for k, v in s.items() if k != "__url__"})
        w.close()
    return str(path)


def _with_pred(samples: list, preds: list) -> list:
    from partkit.io import encode_npy

    return [{**s, "pred_parts.npy": encode_npy(np.asarray(p, np.int64))} for s, p in zip(samples, preds)]


def _miou(shards, match_on=None, match="majority") -> float:
    from partkit.evaluate import evaluate

    kw = {"match_on": [match_on]} if match_on else {}
    return evaluate([shards] if isinstance(shards, str) else shards, ["miou-3d"], match=match,
                    **kw)["metrics"]["miou-3d"]["value"]


def _teacher_labels(cfg, train, new):
    """The parts teacher fit on the training shapes' views, then labelling train and new shapes."""
    from partkit._runtime import resolve_device, seed_everything
    from partkit.distill3d import PartsTeacher, PointLabels, fill_unlabelled, render_shape
    from partkit.pointcloud import normalize

    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    teacher = PartsTeacher(cfg, dev).fit(lambda i: render_shape(train[i], cfg, dev), len(train))
    out = []
    for offset, shapes in ((0, train), (10_000, new)):
        labels = []
        for j, s in enumerate(shapes):
            r = render_shape(s, cfg, dev)
            lab, conf = teacher(r, offset + j)
            target = PointLabels.gather(r.index, lab, conf, len(s), cfg.k).targets()[0].cpu().numpy()
            labels.append(fill_unlabelled(normalize(s.points)[0], target))
        out.append(labels)
    return out


def run(seed: int, tiny: bool, work: Path) -> dict:
    from partkit.distill3d import DistillConfig, distill_3d
    from partkit.io import Output, iter_samples
    from partkit.kmeans import KMeans
    from partkit.pack import pack
    from partkit.pointcloud import decode_shape, normalize

    opts = dict(TINY if tiny else FULL, seed=seed)
    w = work / f"seed{seed}"
    w.mkdir(parents=True, exist_ok=True)
    pack([str(DATA / "cap_test.npz")], output=Output(str(w / "train")))
    pack([str(DATA / "cap_val.npz")], output=Output(str(w / "new")))
    train_s, new_s = list(iter_samples([str(w / "train")])), list(iter_samples([str(w / "new")]))
    train, new = [decode_shape(s) for s in train_s], [decode_shape(s) for s in new_s]
    scores, t0 = {}, time.time()

    # xyz k-means, fit on the training shapes
    xyz_train, xyz_new = [normalize(s.points)[0] for s in train], [normalize(s.points)[0] for s in new]
    km = KMeans(opts["k"], metric="l2", random_state=seed).fit(np.concatenate(xyz_train))
    fit = _write(w / "xyz_train.tar", _with_pred(train_s, [km.predict(x) for x in xyz_train]))
    scores[ROWS[0]] = _miou(_write(w / "xyz_new.tar", _with_pred(new_s, [km.predict(x) for x in xyz_new])), fit)

    # the 2D teacher, fit on the training shapes' views
    cfg = DistillConfig(**opts).validate()
    lab_train, lab_new = _teacher_labels(cfg, train, new)
    fit = _write(w / "teacher_train.tar", _with_pred(train_s, lab_train))
    scores[ROWS[1]] = _miou(_write(w / "teacher_new.tar", _with_pred(new_s, lab_new)), fit)

    # learn on the training shapes, save the student, apply it to the new shapes
    distill_3d([str(w / "train")], out=str(w / "run"), output=Output(str(w / "train_pred")), **opts)
    distill_3d([str(w / "new")], student=str(w / "run"), output=Output(str(w / "new_pred")))
    scores[ROWS[2]] = _miou(str(w / "new_pred"), str(w / "train_pred"))

    # reference: a student trained on the new shapes themselves
    bs = DistillConfig().batch_size
    steps = opts["epochs"] * -(-len(train) // bs)
    distill_3d([str(w / "new")], output=Output(str(w / "new_trans")),
               **{**opts, "epochs": steps // -(-len(new) // bs)})
    scores[ROWS[3]] = _miou(str(w / "new_trans"))

    # few-shot: 2 labelled caps + the other 9 unlabelled, then the new shapes
    two = _write(w / "train_pred_2.tar", list(iter_samples([str(w / "train_pred")]))[:2])
    scores[ROWS[4]] = _miou(str(w / "new_pred"), two)
    _write(w / "labeled.tar", train_s[:2])
    _write(w / "unlabeled.tar", train_s[2:])
    distill_3d([str(w / "unlabeled.tar")], labeled=[str(w / "labeled.tar")], out=str(w / "run_fs"),
               output=Output(str(w / "unl_pred")), **opts)
    distill_3d([str(w / "new")], student=str(w / "run_fs"), output=Output(str(w / "new_fs")))
    scores[ROWS[5]] = _miou(str(w / "new_fs"), match="none")
    return {"seed": seed, "tiny": tiny, "scores": scores, "seconds": round(time.time() - t0, 1), "options": opts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, a few seconds (CI)")
    ap.add_argument("--work", default=None, help="folder for the shards and runs (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = []
        for seed in seeds:
            r = run(seed, args.tiny, work)
            results.append(r)
            print(json.dumps(r, sort_keys=True), flush=True)
    head = "| labels on the 5 unseen cap_val shapes | " + " / ".join(f"seed {s}" for s in seeds) + " |"
    lines = [head, "|---|---|"]
    for row in ROWS:
        lines.append(f"| {row} | " + " / ".join(f"{r['scores'][row]:.1f}" for r in results) + " |")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
