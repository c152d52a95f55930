"""``partkit distill-3d``: multi-view 2D-to-3D part distillation (PartDistill, Umam et al., CVPR 2024).

A 2D teacher labels rendered views of every shape; the labels are back-projected to the visible
points (votes weighted by the teacher's confidence); a point-cloud student learns from all shapes
at once on the labelled points (forward distillation). When its loss plateaus, the student's
predictions score every 2D label region by IoU on the points it covers, the regions are
reweighted by that score, and training goes on with the reweighted labels (backward
distillation). The student then labels every point, seen or not.

Teachers: ``parts`` (partkit's own unsupervised 2D parts: extract + dataset-scope k-means over
the rendered views, so ids agree across views and shapes) and ``clip`` (MaskCLIP-style dense
patch-text similarity for given part names).

The run folder keeps what inference needs, so the student then labels new shapes alone
(:func:`apply_student`, ``--student RUN``: streamed, shardable). ``labeled`` shards with
``gt_parts.npy`` add a supervised loss (PartDistill's few-shot setting).

>>> distill_3d(["caps.tar"], teacher="parts", k=4, out="runs/caps", output=Output("preds/"))  # doctest: +SKIP
>>> distill_3d(["new.tar"], student="runs/caps", output=Output("new_preds/"))  # doctest: +SKIP
"""
from .config import DEFAULT_MODEL, DEFAULT_TEMPERATURE, PROMPTS, TEACHERS, DistillConfig
from .distiller import PartDistiller, StudentTrainer, class_ids, predict_points
from .saved import SavedStudent
from .stage import apply_student, distill_3d
from .student import EdgeConv, PointStudent, knn_graph
from .teachers import ClipTeacher, PartsTeacher, PointLabels, fill_unlabelled, render_shape

__all__ = ["DistillConfig", "PartsTeacher", "ClipTeacher", "PointStudent", "PartDistiller", "StudentTrainer",
           "distill_3d", "apply_student", "SavedStudent", "predict_points", "fill_unlabelled", "TEACHERS", "PROMPTS",
           # the parts behind them
           "DEFAULT_MODEL", "DEFAULT_TEMPERATURE", "PointLabels", "render_shape", "knn_graph", "EdgeConv", "class_ids"]
