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

>>> distill_3d(["caps.tar"], teacher="parts", k=4, out="runs/caps", output=Output("preds/"))  # doctest: +SKIP
"""
from .config import DEFAULT_MODEL, DEFAULT_TEMPERATURE, PROMPTS, TEACHERS, DistillConfig
from .distiller import PartDistiller, StudentTrainer, class_ids
from .stage import distill_3d
from .student import EdgeConv, PointStudent, knn_graph
from .teachers import ClipTeacher, PartsTeacher, PointLabels, fill_unlabelled, render_shape

__all__ = ["DistillConfig", "PartsTeacher", "ClipTeacher", "PointStudent", "PartDistiller", "StudentTrainer",
           "distill_3d", "fill_unlabelled", "TEACHERS", "PROMPTS",
           # the parts behind them
           "DEFAULT_MODEL", "DEFAULT_TEMPERATURE", "PointLabels", "render_shape", "knn_graph", "EdgeConv", "class_ids"]
