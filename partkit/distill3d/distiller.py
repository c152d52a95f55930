"""Forward and backward distillation: :class:`PartDistiller` labels the shapes with a teacher and trains
the student on :class:`partkit.training.Trainer` (:class:`StudentTrainer`, one step per epoch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._log import log, progress
from .._runtime import resolve_device, seed_everything
from .._version import __version__
from ..errors import PartkitError
from ..pointcloud import Shape, normalize
from ..render3d import Rendering
from ..training import RunDir, Trainer, digest
from .config import PROMPTS, DistillConfig
from .student import PointStudent
from .teachers import ClipTeacher, PartsTeacher, PointLabels, clip_classes, render_shape


@dataclass
class _ShapeData:
    key: str
    feats: torch.Tensor  # (N, in_dim) network input: xyz (unit sphere) [+ normals]
    labels: PointLabels
    target: torch.Tensor = None  # (N,) pseudo-labels, -1 unlabelled
    weight: torch.Tensor = None  # (N,)
    supervised: bool = False  # a --labeled shape: targets are its gt_parts, never reweighted


@torch.no_grad()
def predict_points(student: PointStudent, feats: torch.Tensor, points: int, seed: int, num_classes: int,
                   passes: int = 3) -> torch.Tensor:
    """(N, C) class probabilities for all points: each pass cuts the points into random disjoint chunks
    of ``points`` points (the training density); the passes' probabilities are averaged. Seeded per
    shape, so a shape's labels do not depend on which other shapes are labelled, or in what order."""
    student.eval()
    n, N = points, len(feats)
    gen = torch.Generator().manual_seed(seed)
    prob = torch.zeros(N, num_classes, device=feats.device)
    for _ in range(passes):
        perm = torch.randperm(N, generator=gen).to(feats.device)
        for i in range(0, N, n):
            own = perm[i:i + n]
            pad = n - len(own)
            idx = own if pad <= 0 or N <= n else torch.cat([own, perm[torch.randint(N, (pad,), generator=gen)]])
            prob[own] += student(feats[idx][None])[0, :len(own)].softmax(-1)
    return prob / passes


def shape_inputs(shape: Shape, use_normals: bool, device) -> torch.Tensor:
    """The student's input for a shape: xyz normalised into the unit sphere (bounding-box centre,
    :func:`partkit.pointcloud.normalize`), then the unit normals when ``use_normals``."""
    xyz = torch.from_numpy(normalize(shape.points)[0])
    if use_normals:
        nrm = torch.as_tensor(np.asarray(shape.normals, np.float32))
        xyz = torch.cat([xyz, F.normalize(nrm, dim=1)], 1)
    return xyz.to(device)


def part_table(shapes: Sequence[Shape]) -> Optional[dict]:
    """The samples' json ``parts`` table ({id: name}) when they all carry the same one, else None."""
    tables = [s.meta.get("parts") for s in shapes]
    first = tables[0] if tables else None
    if not isinstance(first, dict) or any(t != first for t in tables):
        return None
    return {str(k): str(v) for k, v in first.items()}


def labelled_targets(shape: Shape, key: str, ids: Sequence[int]) -> torch.Tensor:
    """A --labeled shape's gt_parts as indices into ``ids`` (-1: an ignore id)."""
    gt = np.asarray(shape.labels).reshape(-1).astype(np.int64)
    lut = {int(i): j for j, i in enumerate(ids)}
    return torch.as_tensor([lut.get(int(g), -1) for g in gt], dtype=torch.long)


class PartDistiller:
    """Fit a point-cloud student on 2D teacher labels of many shapes (scikit-learn style).

    ``fit(shapes)`` renders, labels, back-projects and trains; afterwards ``predict(shapes)``
    labels points with the student. Learned attributes: ``student_``, ``classes_`` (class
    names), ``pseudo_labels_`` (the 2D-only labels per shape before training, -1 unseen),
    ``history_`` (one record per epoch), ``backward_epoch_``.
    """

    def __init__(self, config: Optional[DistillConfig] = None, **kwargs):
        self.config = (config or DistillConfig(**kwargs)).validate()

    # ---- setup
    def _teacher(self, shapes: Sequence[Shape]):
        cfg = self.config
        if cfg.teacher == "parts":
            return PartsTeacher(cfg, self.device_)
        names, category = clip_classes(shapes, cfg)
        return ClipTeacher(cfg, names, category, self.device_)

    def _inputs(self, shape: Shape) -> torch.Tensor:
        return shape_inputs(shape, self.use_normals_, self.device_)

    def fit(self, shapes: Sequence[Shape], keys: Optional[Sequence[str]] = None, run_dir: Optional[RunDir] = None, *,
            labeled: Sequence[Shape] = (), labeled_keys: Optional[Sequence[str]] = None, resume: bool = False,
            stop_at: Optional[int] = None, views: Optional[Callable] = None) -> "PartDistiller":
        """Label the shapes with the teacher and train the student; with ``run_dir``, checkpoint there
        (``resume`` continues its run exactly; ``stop_at`` stops after that epoch with a checkpoint).

        ``labeled`` shapes (with ``labels``, their gt_parts) add a supervised loss (PartDistill's
        few-shot setting): the classes become their part ids, and the teacher's classes are mapped to
        them by majority vote over the labelled shapes' points. ``views(i, key, rendering, label,
        confidence, point_labels)`` is called for every input shape (``--save-views``).
        """
        cfg = self.config
        if not shapes:
            raise PartkitError("distill-3d needs at least one shape")
        seed_everything(cfg.seed)
        self.device_ = resolve_device(cfg.device)
        labeled = list(labeled)
        everything = list(shapes) + labeled
        self.use_normals_ = cfg.use_normals and all(s.normals is not None for s in everything)
        keys = list(keys) if keys is not None else [f"shape{i}" for i in range(len(shapes))]
        labeled_keys = list(labeled_keys) if labeled_keys is not None else [f"labeled{i}" for i in range(len(labeled))]
        teacher = self._teacher(everything)
        self.classes_ = list(teacher.class_names)
        self.text_ = getattr(teacher, "text", None)
        C = teacher.num_classes

        def render(i: int) -> Rendering:
            return render_shape(everything[i], cfg, self.device_)

        teacher.fit(render, len(everything))
        self.teacher_ = {"name": cfg.teacher, "model": cfg.model_name,
                         "weights": getattr(teacher.fx.backbone, "weights", None), "classes": list(self.classes_),
                         "temperature": cfg.tau, "views": {"elevations": list(cfg.elevations),
                                                           "azimuths": list(cfg.azimuths), "size": cfg.size,
                                                           "radius": cfg.radius}}
        if cfg.teacher == "clip":
            self.teacher_.update(prompts=list(PROMPTS), category=teacher.category)
        self.data_, self.coverage_ = [], []
        with progress(f"distill-3d: {cfg.teacher} teacher", total=len(everything)) as bar:
            for i, (key, s) in enumerate(zip(keys + labeled_keys, everything)):
                r = render(i)
                lab, conf = teacher(r, i)
                pl = PointLabels.gather(r.index.to(lab.device), lab, conf, len(s), C)
                d = _ShapeData(key, self._inputs(s), pl)
                d.target, d.weight = pl.targets()
                if i < len(shapes):
                    self.coverage_.append(pl.coverage())
                    if views is not None:
                        views(i, key, r, lab, conf, pl)
                self.data_.append(d)
                bar.update(1)
        del teacher
        self.pseudo_labels_ = [d.target.cpu().numpy() for d in self.data_[:len(shapes)]]
        seen = sum(int((d.target >= 0).sum()) for d in self.data_) / sum(len(d.target) for d in self.data_)
        log(f"distill-3d: {len(everything)} shapes x {cfg.num_views} views labelled by the {cfg.teacher} teacher "
            f"({cfg.model_name}); {100 * seen:.1f}% of points got 2D labels")
        self.ids_ = class_ids(self, shapes)
        if labeled:
            C = self._few_shot(labeled, labeled_keys)
        self.trainer_ = StudentTrainer(self, C, digest(keys + [f"labeled:{k}" for k in labeled_keys]), run_dir,
                                       resume=resume, stop_at=stop_at)
        self.trainer_.fit()
        if self.backward_epoch_ is not None:
            log(f"distill-3d: backward distillation at epoch {self.backward_epoch_} "
                f"(mean region IoU {self.history_[self.backward_epoch_ - 1]['region_iou']:.3f})")
        return self

    def _few_shot(self, labeled: Sequence[Shape], labeled_keys: Sequence[str]) -> int:
        """Switch the classes to the labelled shapes' part ids; map the teacher's classes onto them by
        majority over the labelled points (a teacher class never seen there is dropped); the labelled
        shapes' targets become their gt_parts, weight 1. Returns the new class count."""
        from ..fields import IGNORE_IDS

        ignore = set(IGNORE_IDS.values())
        part_ids = sorted({int(g) for s in labeled for g in np.unique(s.labels) if g >= 0 and int(g) not in ignore})
        if len(part_ids) < 2:
            raise PartkitError(f"the --labeled shapes hold {len(part_ids)} part id(s) in gt_parts.npy; few-shot "
                               "training needs at least two parts")
        P, C = len(part_ids), len(self.classes_)
        sup = self.data_[len(self.data_) - len(labeled):]
        table = np.zeros((C, P))
        for d, s in zip(sup, labeled):
            d.target = labelled_targets(s, d.key, part_ids).to(self.device_)
            d.weight = torch.ones(len(d.target), device=self.device_)
            d.supervised = True
            t = d.labels.targets()[0].cpu().numpy()
            ok = (t >= 0) & (d.target.cpu().numpy() >= 0)
            np.add.at(table, (t[ok], d.target.cpu().numpy()[ok]), 1)
        mapping = np.where(table.sum(1) > 0, table.argmax(1), -1)
        self.teacher_["to_parts"] = {self.classes_[c]: (part_ids[m] if m >= 0 else None) for c, m in enumerate(mapping)}
        lut = torch.as_tensor(mapping, device=self.device_)
        for d in self.data_:
            d.labels = d.labels.remap(lut, P)
            if not d.supervised:
                d.target, d.weight = d.labels.targets()
        self.pseudo_labels_ = [d.target.cpu().numpy() for d in self.data_[:len(self.data_) - len(labeled)]]
        names = part_table(labeled) or {}
        self.classes_ = [names.get(str(i), f"part{i}") for i in part_ids]
        self.ids_ = part_ids
        self.text_ = None  # the student's head is a plain classifier over the labelled parts
        log(f"distill-3d: few-shot, {len(labeled)} labelled shapes with parts {part_ids}; teacher classes -> parts "
            f"{self.teacher_['to_parts']}")
        return P

    def _class_weights(self, C: int) -> torch.Tensor:
        """Inverse-frequency weights (confidence-weighted counts), mean 1 over the classes present."""
        mass = torch.zeros(C, device=self.device_)
        for d in self.data_:
            ok = d.target >= 0
            mass.index_add_(0, d.target[ok], d.weight[ok])
        present = mass > 0
        cw = torch.zeros(C, device=self.device_)
        cw[present] = mass[present].sum() / (present.sum() * mass[present])
        return cw.clamp(max=10.0)

    def _batch(self, idx: Sequence[int], gen: torch.Generator):
        n = self.config.points
        feats, target, weight = [], [], []
        for i in idx:
            d = self.data_[i]
            N = len(d.feats)
            pick = torch.randperm(N, generator=gen)[:n] if N >= n else torch.randint(N, (n,), generator=gen)
            pick = pick.to(self.device_)
            f = d.feats[pick].clone()
            scale = torch.empty(3).uniform_(0.8, 1.25, generator=gen).to(self.device_)
            f[:, :3] = f[:, :3] * scale + 0.01 * torch.randn(n, 3, generator=gen).to(self.device_)
            feats.append(f)
            target.append(d.target[pick])
            weight.append(d.weight[pick])
        return torch.stack(feats), torch.stack(target), torch.stack(weight)

    @torch.no_grad()
    def _backward(self) -> dict:
        """Score each view's label regions by IoU with the student's labels, reweight, re-derive targets."""
        ious, changed, total = [], 0, 0
        self.region_iou_ = []
        for d in self.data_:
            if d.supervised:
                self.region_iou_.append(None)
                continue
            pred = self._predict_feats(d.feats)
            iou = d.labels.region_iou(pred)
            self.region_iou_.append(iou)
            old = d.target
            d.target, d.weight = d.labels.targets(iou)
            present = torch.zeros_like(iou, dtype=torch.bool)
            present[d.labels.view, d.labels.label] = True
            ious.append(iou[present])
            changed += int((old != d.target).sum())
            total += len(old)
        return {"event": "backward", "region_iou": float(torch.cat(ious).mean()), "relabelled": changed / total}

    def _predict_feats(self, feats: torch.Tensor) -> torch.Tensor:
        return predict_points(self.student_, feats, self.config.points, self.config.seed, len(self.classes_)).argmax(1)

    def predict_proba(self, shapes: Sequence[Shape]) -> list[np.ndarray]:
        """(N, C) student probabilities (columns: ``classes_``) for every point of every shape."""
        cfg = self.config
        return [predict_points(self.student_, self._inputs(s), cfg.points, cfg.seed, len(self.classes_)).cpu().numpy()
                for s in shapes]

    def predict(self, shapes: Sequence[Shape]) -> list[np.ndarray]:
        """Student labels (indices into ``classes_``) for every point of every shape."""
        return [p.argmax(1) for p in self.predict_proba(shapes)]

    def state(self) -> dict:
        return {"student": self.student_.state_dict(), "classes": self.classes_, "config": asdict(self.config),
                "in_dim": self.data_[0].feats.shape[1] if getattr(self, "data_", None) else None,
                "use_normals": self.use_normals_,
                "partkit_version": __version__}


class StudentTrainer(Trainer):
    """The student's epochs on :class:`partkit.training.Trainer` (a step is one epoch over all shapes):
    forward distillation on the teacher's labels, then, once the loss plateaus, backward distillation
    (the labels reweighted by the student). Checkpoints hold everything an exact ``--resume`` needs:
    the student, optimizer, scheduler, every RNG, the loss history and the backward-distillation
    region IoUs; config.json's ``shapes_digest`` refuses a resume on other shapes."""

    command = "distill-3d"
    model_key = "student"

    def __init__(self, distiller: "PartDistiller", num_classes: int, shapes_digest: str, run: Optional[RunDir],
                 *, resume: bool = False, stop_at: Optional[int] = None):
        d, cfg = distiller, distiller.config
        if (resume or stop_at is not None) and (run is None or run.path is None):
            raise PartkitError("--resume and --stop-at continue or checkpoint a run folder; pass --out RUN_DIR")
        self.distiller, self.cfg, self.num_classes = d, cfg, num_classes
        self.setup_run(run.path if run else None, device=d.device_, resume=resume, stop_at=stop_at, log_every=1,
                       checkpoint_every=cfg.epochs, run=run if run is not None else RunDir(None))
        in_dim = d.data_[0].feats.shape[1]
        text = d.text_.to(d.device_) if d.text_ is not None else None
        self.net = d.student_ = PointStudent(in_dim, num_classes, width=cfg.width, depth=cfg.depth, k=cfg.knn,
                                             text=text).to(d.device_)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs, eta_min=0.05 * cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.steps = cfg.epochs
        self.cw = d._class_weights(num_classes)
        d.history_, d.backward_epoch_, d.region_iou_ = [], None, None
        self.latest = max(6, (2 * cfg.epochs) // 3)  # backward distillation happens by then at the latest
        self.config = {"options": asdict(cfg), "shapes_digest": shapes_digest}

    # ---- the Trainer's hooks
    def resume_options(self, config: dict) -> dict:
        options = {f"--{k.replace('_', '-')}": v for k, v in config.get("options", {}).items() if k != "device"}
        return {**options, "the shapes (their keys)": config.get("shapes_digest")}

    def saved_config(self, ckpt: dict) -> dict:
        return {"options": ckpt.get("config", {}), "shapes_digest": ckpt.get("shapes_digest")}

    def train_step(self, epoch: int) -> dict:
        d, cfg = self.distiller, self.cfg
        d.student_.train()
        order = torch.randperm(len(d.data_), generator=self.gen).tolist()
        total, count = 0.0, 0
        for b in range(0, len(order), cfg.batch_size):
            x, y, w = d._batch(order[b:b + cfg.batch_size], self.gen)
            ok = y >= 0
            if not ok.any():
                continue
            logits = d.student_(x)
            ce = F.cross_entropy(logits[ok], y[ok], reduction="none")
            wt = w[ok] * self.cw[y[ok]]
            loss = (wt * ce).sum() / wt.sum().clamp_min(1e-9)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        rec = {"step": epoch + 1, "epoch": epoch + 1, "loss": total / max(count, 1)}
        d.history_.append(rec)
        losses = [r["loss"] for r in d.history_]
        if len(losses) >= 5:
            ma = float(np.mean(losses[-5:]))
            rec["loss_ma5"] = ma
            prev_ma = d.history_[-2].get("loss_ma5") if len(d.history_) > 1 else None
            flat = prev_ma is not None and abs(prev_ma - ma) <= cfg.plateau * max(prev_ma, 1e-12)
            if cfg.backward and d.backward_epoch_ is None and (flat or epoch + 1 >= self.latest) \
                    and epoch + 1 < cfg.epochs:
                rec.update(d._backward())
                d.backward_epoch_ = epoch + 1
                self.cw = d._class_weights(self.num_classes)
        rec["lr"] = self.sched.get_last_lr()[0]
        self.sched.step()
        return rec

    def state(self, step: int) -> dict:
        d = self.distiller
        ious = [None if iou is None else iou.cpu() for iou in d.region_iou_] if d.region_iou_ is not None else None
        return {**d.state(), "ids": [int(i) for i in d.ids_], "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng(), "step": step, "history": d.history_,
                "backward_epoch": d.backward_epoch_, "region_iou": ious, "shapes_digest": self.config["shapes_digest"]}

    def load_state(self, ckpt: dict) -> None:
        d = self.distiller
        d.history_, d.backward_epoch_ = ckpt["history"], ckpt["backward_epoch"]
        if ckpt["region_iou"] is not None:
            d.region_iou_ = [None if iou is None else iou.to(d.device_) for iou in ckpt["region_iou"]]
            for data, iou in zip(d.data_, d.region_iou_):
                if not data.supervised:
                    data.target, data.weight = data.labels.targets(iou)
            self.cw = d._class_weights(self.num_classes)


def class_ids(distiller: PartDistiller, shapes: Sequence[Shape]) -> list[int]:
    """Output id of each class: the ``json`` part ids when the clip classes are the samples' parts, else 0..C-1."""
    cfg = distiller.config
    parts = shapes[0].meta.get("parts") if shapes else None
    if cfg.teacher == "clip" and not cfg.parts and isinstance(parts, dict):
        return sorted(int(k) for k in parts)
    return list(range(len(distiller.classes_)))
