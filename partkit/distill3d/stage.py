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
from ..io.sink import check_output_apart
from ..io.urls import expand_urls
from ..pointcloud import decode_shape
from ..training import RunDir, check_count
from .config import DistillConfig
from .distiller import PartDistiller


def distill_3d(inputs: Sequence[str], config: Optional[DistillConfig] = None, *, output: Output = Output(),
               out: Optional[str] = None, handler: Handler = stop, resume: bool = False,
               stop_at: Optional[int] = None, **kwargs) -> dict:
    """Distil 2D part labels of rendered views into a point-cloud student; add ``pred_parts.npy`` + ``.json``.

    Reads every sample first (training uses all shapes at once; stdin is buffered), then writes
    each sample with the student's labels. ``out`` is a run folder for the student (``last.pt``),
    ``config.json``, ``metrics.jsonl`` and ``loss.png``; ``resume`` continues that run exactly and
    ``stop_at`` stops after that epoch with a checkpoint (no samples are written until the student
    is trained). Options are :class:`DistillConfig` fields.
    """
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
    if output.path not in (None, "-"):  # refuse before training, not after it
        check_output_apart(output.path, expand_urls(inputs))
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
    distiller = PartDistiller(cfg)
    distiller.fit(shapes, keys, run_dir=run, resume=resume, stop_at=stop_at)
    ids = np.asarray(distiller.ids_, np.int64)
    meta = {"ids": {str(int(i)): n for i, n in zip(ids, distiller.classes_)}, "teacher": cfg.teacher,
            "model": cfg.model_name, "weights": distiller.teacher_["weights"], "views": cfg.num_views,
            "size": cfg.size, "epochs": cfg.epochs, "backward_epoch": distiller.backward_epoch_, "seed": cfg.seed,
            "partkit_version": __version__}
    if run is not None:
        config_doc = {"options": asdict(cfg), "inputs": list(inputs), "shapes": len(shapes), "classes": meta["ids"],
                      "in_dim": distiller.data_[0].feats.shape[1], "teacher": distiller.teacher_,
                      "backward_epoch": distiller.backward_epoch_, "partkit_version": __version__,
                      "shapes_digest": distiller.trainer_.config["shapes_digest"]}
        run.write_config(config_doc)
        log(f"distill-3d: student, config.json, metrics.jsonl and loss.png in {out}")
    done = len(distiller.history_)
    if done < cfg.epochs:
        return {"written": 0, "stopped_at": done, "epochs": cfg.epochs, "backward_epoch": distiller.backward_epoch_,
                "final_loss": distiller.history_[-1]["loss"] if distiller.history_ else None}
    preds = dict(zip(keys, distiller.predict(shapes)))

    def prepare(sample: dict):
        key = sample["__key__"]
        if key in bad:
            raise bad[key]
        return {**sample, "pred_parts.npy": encode_npy(ids[preds[key]]), "pred_parts.json": encode_json(meta)}

    def source(rank: int, world: int):
        return iter(samples)

    stage_config = {"options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    summary = run_stage(inputs, lambda batch: batch, output=output, name="distill-3d", prepare=prepare,
                        handler=handler, config=stage_config, source=source)
    summary["backward_epoch"] = distiller.backward_epoch_
    summary["final_loss"] = distiller.history_[-1]["loss"] if distiller.history_ else None
    return summary
