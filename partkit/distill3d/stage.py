"""The ``distill-3d`` stage: read every shape, distil, write ``pred_parts.npy`` and ``pred_parts.json``."""
from __future__ import annotations

import os
from dataclasses import asdict, fields
from typing import Optional, Sequence

import numpy as np

from .._log import log
from .._version import __version__
from ..errors import BadSample, Handler, PartkitError, stop
from ..io import Output, encode_json, encode_npy, iter_samples, run_stage
from ..io.sink import check_output_apart, is_folder_output
from ..io.urls import expand_urls
from ..pointcloud import decode_shape
from ..training import RunDir, check_count
from .config import DistillConfig
from .distiller import PartDistiller
from .saved import SavedStudent, check_student_alone, student_record


def _read_labeled(labeled: Sequence[str], handler: Handler) -> tuple[list, list]:
    shapes, keys = [], []
    for s in iter_samples(labeled, handler=handler):
        if "gt_parts.npy" not in s:
            raise PartkitError(f"--labeled sample {s['__key__']!r} has no gt_parts.npy; few-shot training needs "
                               "part labels on every labelled shape (pack shapes with labels, e.g. ShapeNetPart "
                               ".npz/.txt)")
        shapes.append(decode_shape(s))
        keys.append(s["__key__"])
    if not shapes:
        raise PartkitError("--labeled holds no samples; check the shards")
    return shapes, keys


def apply_student(inputs: Sequence[str], student: str, *, output: Output = Output(), handler: Handler = stop,
                  device: str = "auto") -> dict:
    """Label new shapes with the trained student of run folder ``student``: streaming, one shape at a
    time, shardable (``--num-shards/--shard-index`` or torchrun); adds ``pred_parts.npy`` (the run's
    ids) and ``pred_parts.json`` (their names, the student's mean confidence)."""
    saved = SavedStudent.load(student, device)
    shared = {**saved.meta(), "partkit_version": __version__}

    def prepare(sample: dict):
        shape = decode_shape(sample)
        saved.check(shape, sample["__key__"])
        return sample, shape

    def process(batch: list) -> list:
        out = []
        for sample, shape in batch:
            ids, conf = saved.predict(shape)
            meta = {**shared, "student_confidence": round(float(conf.mean()), 6)}
            out.append({**sample, "pred_parts.npy": encode_npy(ids), "pred_parts.json": encode_json(meta)})
        return out

    return run_stage(inputs, process, output=output, name="distill-3d --student", prepare=prepare, handler=handler,
                     prepare_workers=0, config={"student": os.path.abspath(student)})


def distill_3d(inputs: Sequence[str], config: Optional[DistillConfig] = None, *, output: Output = Output(),
               out: Optional[str] = None, handler: Handler = stop, resume: bool = False,
               stop_at: Optional[int] = None, student: Optional[str] = None, labeled: Optional[Sequence[str]] = None,
               save_views: Optional[str] = None, **kwargs) -> dict:
    """Distil 2D part labels of rendered views into a point-cloud student; add ``pred_parts.npy`` + ``.json``.

    Reads every sample first (training uses all shapes at once; stdin is buffered), then writes
    each sample with the student's labels. ``out`` is a run folder for the student (``last.pt``),
    ``config.json``, ``metrics.jsonl`` and ``loss.png``; ``resume`` continues that run exactly and
    ``stop_at`` stops after that epoch with a checkpoint (no samples are written until the student
    is trained). ``labeled`` shards (with ``gt_parts.npy``) add a supervised loss (few-shot);
    ``save_views`` is a folder for each shape's views, teacher labels and coverage pictures.
    ``student`` (a finished run folder) skips all that and applies its student
    (:func:`apply_student`). Options are :class:`DistillConfig` fields.
    """
    if student is not None:
        named = kwargs.pop("given", None)  # the CLI names the flags it was given
        what = ", ".join(named) if named else ", ".join(f"{k}=" for k in kwargs) or "a DistillConfig"
        check_student_alone(student, **{what: config is not None or bool(kwargs) or bool(named),
                                        "--out": out is not None, "--resume": resume, "--stop-at": stop_at is not None,
                                        "--labeled": bool(labeled), "--save-views": save_views is not None})
        return apply_student(inputs, student, output=output, handler=handler)
    if config is None:
        names = {f.name for f in fields(DistillConfig)}
        bad = sorted(set(kwargs) - names)
        if bad:
            raise PartkitError(f"unknown distill-3d option(s) {', '.join(bad)}; valid: {', '.join(sorted(names))}")
        config = DistillConfig(**kwargs)
    cfg = config.validate()
    if output.num_shards not in (None, 1) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PartkitError("distill-3d trains one student on all shapes at once; run it as a single process "
                           "(no --num-shards or torchrun)")
    check_count("--stop-at", stop_at, fix="pass the epoch to checkpoint and stop at, or drop --stop-at")
    if out is None and (resume or stop_at is not None):
        raise PartkitError("--resume and --stop-at continue or checkpoint a run folder; pass --out RUN_DIR")
    if is_folder_output(output.path):  # refuse before training, not after it
        check_output_apart(output.path, expand_urls(inputs))
    if save_views is not None and os.path.isfile(save_views):
        raise PartkitError(f"--save-views {save_views!r} is a file; pass a folder for the pictures")
    lab_shapes, lab_keys = _read_labeled(labeled, handler) if labeled else ([], [])
    run = RunDir(out, resume=resume) if out is not None else None
    samples = list(iter_samples(inputs, handler=handler))
    if not samples:
        raise PartkitError("distill-3d: the input holds no samples; check the input shards (are they empty?)")
    shapes, keys, bad = [], [], {}
    for s in samples:
        try:
            shapes.append(decode_shape(s))
            keys.append(s["__key__"])
        except BadSample as e:
            bad[s["__key__"]] = e  # run_stage hands it to the handler when it writes
    if bad and handler is stop:
        raise next(iter(bad.values()))  # stop before training, not after
    if not shapes:
        raise PartkitError("distill-3d: no sample holds a readable point cloud ('points.npy'); run `partkit pack` "
                           "on point clouds or meshes first")
    views = None
    if save_views is not None:
        from ..show import save_shape_views

        def views(i, key, rendering, label, conf, point_labels):
            save_shape_views(save_views, key, shapes[i], rendering, label, conf, point_labels)

    distiller = PartDistiller(cfg)
    distiller.fit(shapes, keys, run_dir=run, labeled=lab_shapes, labeled_keys=lab_keys, resume=resume,
                  stop_at=stop_at, views=views)
    ids = np.asarray(distiller.ids_, np.int64)
    meta = {"ids": {str(int(i)): n for i, n in zip(ids, distiller.classes_)}, "teacher": cfg.teacher,
            "model": cfg.model_name, "weights": distiller.teacher_["weights"], "views": cfg.num_views,
            "size": cfg.size, "epochs": cfg.epochs, "backward_epoch": distiller.backward_epoch_, "seed": cfg.seed,
            "labeled": len(lab_shapes), "partkit_version": __version__}
    if run is not None:
        config_doc = {"options": asdict(cfg), "inputs": list(inputs), "shapes": len(shapes), "classes": meta["ids"],
                      "labeled": list(labeled or []), "labeled_shapes": len(lab_shapes),
                      "in_dim": distiller.data_[0].feats.shape[1], "teacher": distiller.teacher_,
                      "student": student_record(distiller, shapes + lab_shapes),
                      "backward_epoch": distiller.backward_epoch_, "partkit_version": __version__,
                      "shapes_digest": distiller.trainer_.config["shapes_digest"]}
        run.write_config(config_doc)
        log(f"distill-3d: student, config.json, metrics.jsonl and loss.png in {out}")
    done = len(distiller.history_)
    if done < cfg.epochs:
        return {"written": 0, "stopped_at": done, "epochs": cfg.epochs, "backward_epoch": distiller.backward_epoch_,
                "final_loss": distiller.history_[-1]["loss"] if distiller.history_ else None}
    probs = distiller.predict_proba(shapes)
    preds = {k: (p.argmax(1), float(p.max(1).mean()), cov) for k, p, cov in zip(keys, probs, distiller.coverage_)}

    def prepare(sample: dict):
        key = sample["__key__"]
        if key in bad:
            raise bad[key]
        pred, conf, cov = preds[key]
        doc = {**meta, **cov, "student_confidence": round(conf, 6)}
        return {**sample, "pred_parts.npy": encode_npy(ids[pred]), "pred_parts.json": encode_json(doc)}

    def source(rank: int, world: int):
        return iter(samples)

    stage_config = {"options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    summary = run_stage(inputs, lambda batch: batch, output=output, name="distill-3d", prepare=prepare,
                        handler=handler, config=stage_config, source=source)
    summary["backward_epoch"] = distiller.backward_epoch_
    summary["final_loss"] = distiller.history_[-1]["loss"] if distiller.history_ else None
    return summary
