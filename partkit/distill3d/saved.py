"""A trained student applied to new shapes: ``distill-3d --student RUN`` (no teacher, no training).

The run folder holds what inference needs: ``last.pt`` (weights, options, ``in_dim``, the epoch
reached) and ``config.json``'s ``student`` record (ids and names of the classes, the categories
and part table of the shapes it learnt from, the input normalisation, whether normals are used).
Labels depend on the shape alone (seeded per shape), so any split of the shapes over processes
gives the same bytes.

>>> saved = SavedStudent.load("runs/caps")  # doctest: +SKIP
>>> ids, confidence = saved.predict(shape)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from .._runtime import resolve_device
from ..errors import PartkitError
from ..pointcloud import Shape
from .config import DistillConfig
from .distiller import predict_points, shape_inputs
from .student import PointStudent

NORMALISATION = "bounding-box centre, scaled into the unit sphere (partkit.pointcloud.normalize)"


def student_record(distiller, shapes) -> dict:
    """config.json's ``student``: what :class:`SavedStudent` needs besides the weights."""
    from .distiller import part_table

    cats = sorted({str(s.meta["category"]) for s in shapes if s.meta.get("category")})
    return {"ids": [int(i) for i in distiller.ids_], "names": list(distiller.classes_), "categories": cats,
            "parts": part_table(shapes), "normalisation": NORMALISATION, "use_normals": bool(distiller.use_normals_),
            "in_dim": int(distiller.data_[0].feats.shape[1]), "points": distiller.config.points,
            "seed": distiller.config.seed}


class SavedStudent:
    """The student of a finished ``distill-3d --out RUN`` run, ready to label new shapes."""

    def __init__(self, path: str, record: dict, config: DistillConfig, state: dict, device: str = "auto"):
        self.path, self.record, self.config = path, record, config
        self.ids = np.asarray(record["ids"], np.int64)
        self.names = list(record["names"])
        self.device = resolve_device(device)
        text = state["student"].get("text")
        self.net = PointStudent(record["in_dim"], len(self.ids), width=config.width, depth=config.depth, k=config.knn,
                                text=text).to(self.device)
        self.net.load_state_dict(state["student"])
        self.net.eval()

    @classmethod
    def load(cls, path: str, device: str = "auto") -> "SavedStudent":
        ckpt, cfg_file = os.path.join(path, "last.pt"), os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise PartkitError(f"--student {path!r} is not a folder; pass the --out folder of a finished distill-3d run")
        if not os.path.isfile(ckpt) or not os.path.isfile(cfg_file):
            raise PartkitError(f"--student {path!r} holds no trained student (last.pt and config.json); train one "
                               f"with `partkit distill-3d SHAPES --out {path}`")
        try:
            doc = json.loads(open(cfg_file).read())
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            raise PartkitError(f"--student {path!r}: cannot read its run files ({e}); train the run again") from None
        record = doc.get("student") if isinstance(doc, dict) else None
        if not isinstance(record, dict) or not isinstance(state, dict) or "student" not in state:
            raise PartkitError(f"--student {path!r} was trained by an older partkit (config.json has no 'student' "
                               "record); train it again with this version")
        options = dict(doc.get("options", {}))
        epochs, step = int(options.get("epochs", 0)), int(state.get("step", 0))
        if step < epochs:
            raise PartkitError(f"--student {path!r} holds no trained student: it stopped at epoch {step} of {epochs}; "
                               f"finish it with `partkit distill-3d ... --out {path} --resume`")
        for key in ("elevations", "azimuths", "layers", "parts"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        options["device"] = device
        return cls(path, record, DistillConfig(**options), state, device)

    def check(self, shape: Shape, key: str) -> None:
        """Refuse a shape the student was not trained for (category, part table, normals)."""
        rec = self.record
        cat = shape.meta.get("category")
        if rec["categories"] and cat is not None and str(cat) not in rec["categories"]:
            raise PartkitError(f"sample {key!r} is a {cat!r} but the student in {self.path!r} learnt "
                               f"{', '.join(rec['categories'])}; apply it to shapes of that category, or train "
                               "a student on these")
        parts = shape.meta.get("parts")
        if rec["parts"] is not None and isinstance(parts, dict) and \
                {str(k): str(v) for k, v in parts.items()} != rec["parts"]:
            raise PartkitError(f"sample {key!r} has parts {parts} but the student in {self.path!r} learnt parts "
                               f"{rec['parts']}; apply it to shapes with that part set, or train a student on these")
        if rec["use_normals"] and shape.normals is None:
            raise PartkitError(f"sample {key!r} has no normals.npy but the student in {self.path!r} was trained with "
                               "normals; pack the shapes with normals (meshes, or .npz/.txt with normals)")

    @torch.no_grad()
    def predict(self, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        """(N,) part ids (the run's ids) and (N,) the student's probability of each."""
        feats = shape_inputs(shape, self.record["use_normals"], self.device)
        prob = predict_points(self.net, feats, self.record["points"], self.record["seed"], len(self.ids)).cpu()
        conf, idx = prob.max(1)
        return self.ids[idx.numpy()], conf.numpy()

    def meta(self) -> dict:
        """``pred_parts.json`` fields shared by every shape."""
        return {"ids": {str(int(i)): n for i, n in zip(self.ids, self.names)}, "student": os.path.abspath(self.path),
                "teacher": self.config.teacher, "seed": self.record["seed"]}


def check_student_alone(student: Optional[str], **given) -> None:
    """``--student`` applies a trained run: refuse the options that train one."""
    if student is None:
        return
    used = [name for name, value in given.items() if value]
    if used:
        raise PartkitError(f"--student applies a trained run and cannot be combined with {', '.join(used)} (teacher "
                           "and training options live in the run's config.json); drop them, or drop --student to "
                           "train")
