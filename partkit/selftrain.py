"""``partkit self-train --objective masks``: EMA teacher-student self-training with guided burn-in.

PartDistillation's self-training and Guided Distillation (Berrada et al.): a teacher (a
``train-decoder`` checkpoint) labels weakly augmented views; the student learns from strongly
augmented views of the same images with the geometry shared; after ``burn_in`` steps with the
teacher frozen, the teacher takes the student's weights, then follows it by EMA. ``rounds``
repeats the schedule with the round's result as the next teacher. ``labeled`` shards add a
supervised loss (total = supervised + ``unsup_weight`` x pseudo-label loss).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .decoder.data import MASK_FACTOR, Example, assign_classes, augment, class_list, object_source
from .decoder.model import PartDecoder
from .decoder.predict import load_decoder
from .decoder.features import OnlineFeatures, batch_features, load_examples
from .decoder.train import DecoderTrainer, TrainConfig, full_precision, masks_recall
from ._log import log
from .errors import Handler, PartkitError, stop
from .fields import SALIENCY_THRESHOLD, objects_from as object_masks_from
from .grid import sample_on_grid
from .training import check_count, check_rate, epoch_batch_indices, to_device

__all__ = ["SelfTrainer", "self_train_masks", "ema_update", "strong_photometric", "RECIPES", "resolve_recipe"]


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student (buffers copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def strong_photometric(x: torch.Tensor, mean, std, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (p=0.8), random grayscale (p=0.2), Gaussian blur (p=0.5) on a normalised image.

    No cutout: Guided Distillation found it harmful for masks.
    """
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    img = (x * s + m).clamp(0, 1)
    r = lambda lo, hi: float(torch.empty(1).uniform_(lo, hi, generator=gen))  # noqa: E731
    if torch.rand(1, generator=gen) < 0.8:
        img = (img * r(0.6, 1.4)).clamp(0, 1)  # brightness
        mu = img.mean()
        img = ((img - mu) * r(0.6, 1.4) + mu).clamp(0, 1)  # contrast
        gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = ((img - gray) * r(0.6, 1.4) + gray).clamp(0, 1)  # saturation
    if torch.rand(1, generator=gen) < 0.2:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None].expand(3, -1, -1)
    if torch.rand(1, generator=gen) < 0.5:
        sigma = r(0.1, 2.0)
        k = int(2 * round(3 * sigma) + 1)
        t = torch.arange(k, dtype=torch.float32) - k // 2
        g = torch.exp(-t ** 2 / (2 * sigma ** 2))
        g = g / g.sum()
        img = F.conv2d(F.pad(img[None], (k // 2,) * 4, mode="reflect"), g.view(1, 1, 1, k).expand(3, 1, 1, k),
                       groups=3)
        img = F.conv2d(img, g.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)[0]
    return (img - m) / s


class SelfTrainer(DecoderTrainer):
    command = "self-train"

    def __init__(self, inputs: Sequence[str], out: str, teacher: str, *, recipe: str = "guided-distillation",
                 student_init: Optional[str] = None, burn_in: Optional[int] = None,
                 ema_decay: Optional[float] = None, rounds: int = 1, score_threshold: Optional[float] = None,
                 min_mask_area: Optional[float] = None, labeled: Optional[Sequence[str]] = None,
                 labeled_field: str = "gt_parts.png", unsup_weight: Optional[float] = None,
                 train: Optional[TrainConfig] = None, val: Optional[Sequence[str]] = None, resume: bool = False,
                 device: str = "auto", seed: int = 0, handler: Handler = stop, objects_from: Optional[str] = None,
                 fg_threshold: float = SALIENCY_THRESHOLD):
        given = {"student_init": student_init, "burn_in": burn_in, "ema_decay": ema_decay,
                 "score_threshold": score_threshold, "min_mask_area": min_mask_area, "unsup_weight": unsup_weight}
        values = resolve_recipe(recipe, given)
        student_init, ema_decay = values["student_init"], values["ema_decay"]
        score_threshold, min_mask_area, unsup_weight = (values["score_threshold"], values["min_mask_area"],
                                                        values["unsup_weight"])
        if student_init not in ("teacher", "scratch"):
            raise PartkitError(f"--student-init must be teacher or scratch, got {student_init!r}")
        check_rate("--ema-decay", ema_decay, high=1.0, strict=False, fix="pass a decay in [0, 1], e.g. 0.9996")
        check_count("--burn-in", burn_in, 0)
        check_count("--rounds", rounds, fix="pass --rounds 1 for one round of self-training")
        check_rate("--score-threshold", score_threshold, high=1.0, strict=False, fix="pass a score in [0, 1]")
        check_rate("--min-mask-area", min_mask_area, strict=False, fix="pass a soft mask area in cells, e.g. 5")
        check_rate("--unsup-weight", unsup_weight, strict=False, fix="pass a weight >= 0, e.g. 2")
        (train or TrainConfig()).validate()
        self.recipe = recipe
        self.teacher_path, self.student_init = teacher, student_init
        self.labeled_inputs, self.labeled_field = list(labeled) if labeled else [], labeled_field
        self.ema_decay, self.rounds = ema_decay, rounds
        self.score_threshold, self.min_mask_area, self.unsup_weight = score_threshold, min_mask_area, unsup_weight
        teacher_net, ckpt = load_decoder(teacher, "cpu")
        self.teacher_ckpt = ckpt
        spec = ckpt["feature_spec"]
        online = None
        if ckpt.get("features") == "online":
            online = OnlineFeatures(spec["model"], spec["weights"], spec["layers"], spec["size"], "cpu")
        dcfg = {k: v for k, v in ckpt["decoder_config"].items() if k not in ("in_channels", "level_channels")}
        super().__init__(inputs, out, field=None, features="online" if online else "cached", decoder=dcfg,
                         train=train, val=val, resume=resume, device=device, seed=seed, handler=handler,
                         online=online, objects_from=objects_from, fg_threshold=fg_threshold)
        if online is not None:
            online.fx.backbone.to(self.dev)
            online.fx.device = self.dev
        per_round = super().total_steps()
        # the recipe's burn-in is a share of each round's steps (the paper's iterations scaled to --max-steps)
        burn_in = burn_in if burn_in is not None else round(values["burn_in_fraction"] * per_round)
        values["burn_in"] = self.burn_in = burn_in
        if self.dcfg.in_channels != teacher_net.cfg.in_channels:
            raise PartkitError(f"the teacher was trained on {teacher_net.cfg.in_channels}-channel features but the "
                               f"input has {self.dcfg.in_channels}; extract with the teacher's settings")
        if self.dcfg.classes != teacher_net.cfg.classes:
            # the --labeled classes differ from the teacher's (e.g. a class-agnostic proposal decoder and
            # rank's class-specific targets): its pseudo-labels cannot carry the student's classes
            if self.unsup_weight > 0:
                raise PartkitError(
                    f"the teacher {_describe(teacher_net.cfg.classes)} but --labeled '{labeled_field}' "
                    f"{_describe(self.dcfg.classes)}, so its pseudo-labels cannot carry the student's classes; "
                    f"train the teacher on the labels first (partkit train-decoder LABELED --field {labeled_field}) "
                    "or learn the labels alone with --unsup-weight 0 (--recipe partdistillation)")
            same_shape = PartDecoder(self.dcfg)
            load_matching(same_shape, teacher_net.state_dict())  # all but the class head
            teacher_net = same_shape
        self.teacher = teacher_net.to(self.dev).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if student_init == "teacher":
            load_matching(self.net, self.teacher.state_dict())
        self.config.update({"teacher": teacher, "recipe": recipe, "recipe_overrides": sorted(
                                k for k, v in given.items() if v is not None),
                            "student_init": student_init, "burn_in": burn_in,
                            "burn_in_fraction": None if given["burn_in"] is not None else values["burn_in_fraction"],
                            "ema_decay": ema_decay, "rounds": rounds, "score_threshold": score_threshold,
                            "min_mask_area": min_mask_area, "labeled": list(labeled) if labeled else None,
                            "labeled_field": labeled_field, "unsup_weight": unsup_weight,
                            "strong_augment": "photometric" if online else "feature noise"})

    def resolve_classes(self, on_bad) -> Optional[list]:
        """The student's classes: those of the --labeled label maps when they name classes (targets.json,
        part_names), else the teacher's."""
        teacher_classes = self.teacher_ckpt["decoder_config"].get("classes")
        self.labeled = (load_examples(self.labeled_inputs, field=self.labeled_field, min_part_area=0.0,
                                      online=self.online, handler=on_bad) if self.labeled_inputs else [])
        if not self.labeled_inputs:
            return teacher_classes
        if not self.labeled:
            raise PartkitError("self-train: no usable --labeled samples")
        classes = class_list(self.labeled, self.labeled_field)
        if classes is None and teacher_classes is not None:
            raise PartkitError(f"the teacher is class-aware ({len(teacher_classes)} classes) but --labeled "
                               f"'{self.labeled_field}' names no classes; pass --labeled-field targets.png "
                               "(with targets.json) or gt_parts.png with part_names")
        self.labeled = assign_classes(self.labeled, classes, self.labeled_field, on_bad)
        if not self.labeled:
            raise PartkitError("self-train: no usable --labeled samples")
        if classes:
            log(f"self-train: class-aware student, {len(classes)} classes + no-part from --labeled "
                f"'{self.labeled_field}'")
        return classes

    def stream_transform(self):
        return None  # the weak and strong views share one geometry: both are made in the step (see _views)

    def prepare_example(self, ex: Example) -> Example:
        """Known objects (``--objects-from``; by default gt_objects.json when present) become the target map,
        so crops carry them along and pseudo-labels outside every object are dropped; a malformed object
        field is a bad sample (``--skip-bad`` leaves the example out)."""
        ex = super().prepare_example(ex)
        source = object_source(ex.sample, self.objects_from)
        if source is not None:
            masks = object_masks_from(ex.sample, source, ex.meta["image_size"], fg_threshold=self.fg_threshold)[1]
            union = np.zeros(tuple(g * MASK_FACTOR for g in ex.meta["grid"]), bool)
            for m in masks:
                union |= sample_on_grid(m.astype(np.uint8), ex.meta, MASK_FACTOR) > 0
            ex.target = union.astype(np.int32)
            ex.has_objects = True
        return ex

    def total_steps(self) -> int:
        return self.rounds * super().total_steps()

    # ---- one step
    def _views(self, batch: list) -> tuple:
        """Weak and strong features with shared geometry, plus each crop's object mask."""
        if self.online is not None:
            fx = self.online.fx
            weak = batch_features(batch, self.online)
            strong_imgs = torch.stack([strong_photometric(ex.image, fx.backbone.mean, fx.backbone.std, self.gen)
                                       for ex in batch])
            strong = self.online.features(strong_imgs, [ex.meta for ex in batch])
        else:
            weak = [ex.feat.float() for ex in batch]
            strong = []
            for f in weak:  # cached features cannot be colour-jittered: noise and channel dropout instead
                noise = torch.randn(f.shape, generator=self.gen) * 0.1 * f.std()
                keep = (torch.rand(f.shape[0], 1, 1, generator=self.gen) > 0.1).float()
                strong.append((f + noise) * keep)
        xw, xs, objects = [], [], []
        for ex, w, s in zip(batch, weak, strong):
            state = self.gen.get_state()
            fw, obj = augment(Example(ex.key, w, ex.target, ex.ids, ex.classes, ex.meta), self.tc.crop_grid, self.gen)
            self.gen.set_state(state)  # the same crop and flip for the strong view
            fs, _ = augment(Example(ex.key, s, ex.target, ex.ids, ex.classes, ex.meta), self.tc.crop_grid, self.gen)
            xw.append(fw)
            xs.append(fs)
            objects.append(obj > 0 if getattr(ex, "has_objects", False) else None)
        return to_device(torch.stack(xw), self.dev), to_device(torch.stack(xs), self.dev), objects

    @torch.no_grad()
    def pseudo_labels(self, x_weak: torch.Tensor, objects: list) -> list[dict]:
        """Teacher predictions kept if their class probability (max over classes, Guided Distillation's
        alpha_C) >= threshold, their soft mask area (sum of sigmoids, alpha_S) >= min_mask_area, and they
        overlap an object; each keeps the teacher's class (argmax)."""
        out = self.teacher(x_weak)
        scores, labels = PartDecoder.classify(out["pred_logits"])
        soft = out["pred_masks"].float().sigmoid()
        masks = soft > 0.5
        keep = (scores >= self.score_threshold) & (soft.flatten(2).sum(-1) >= self.min_mask_area)
        targets = []
        for b in range(x_weak.shape[0]):
            k = keep[b]
            if objects[b] is not None:
                k = k & (masks[b] & objects[b].to(masks.device)[None]).flatten(1).any(-1)
            targets.append({"masks": masks[b][k], "labels": labels[b][k]})
        return targets

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        if self.labeled and self.unsup_weight == 0:  # the labels alone (PartDistillation's final stage)
            idx = epoch_batch_indices(step, len(self.labeled), self.tc.batch_size, self.seed * 37 + 1)
            sup, sup_terms = self.supervised_loss([self.labeled[i] for i in idx])
            return sup, {f"sup_{k}": v for k, v in sup_terms.items()}
        batch = self.batch(step)
        xw, xs, objects = self._views(batch)
        targets = self.pseudo_labels(xw, objects)
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = self.ddp(xs)
        unsup, terms = self.crit(full_precision(outputs), targets, self.gen)
        terms = {f"unsup_{k}": v for k, v in terms.items()}
        terms["pseudo_per_image"] = sum(t["masks"].shape[0] for t in targets) / len(targets)
        loss = self.unsup_weight * unsup if self.labeled else unsup
        if self.labeled:
            idx = epoch_batch_indices(step, len(self.labeled), self.tc.batch_size, self.seed * 37 + 1)
            sup, sup_terms = self.supervised_loss([self.labeled[i] for i in idx])
            loss = sup + loss
            terms.update({f"sup_{k}": v for k, v in sup_terms.items()})
        return loss, terms

    def after_step(self, done: int) -> None:
        per_round = super().total_steps()
        in_round = (done - 1) % per_round + 1
        if in_round == self.burn_in:
            self.teacher.load_state_dict(self.net.state_dict())  # the guided burn-in ends
        elif in_round > self.burn_in:
            ema_update(self.teacher, self.net, self.ema_decay)
        if in_round == per_round and done < self.steps:
            self.teacher.load_state_dict(self.net.state_dict())  # next round learns from this round's result

    def validate(self, done: int) -> dict:
        student = masks_recall(self.net, self.val_examples, self.online, self.dev)
        teacher = masks_recall(self.teacher, self.val_examples, self.online, self.dev)
        self.teacher.eval()
        return {**{f"student {k}": v for k, v in student.items()}, **{f"teacher {k}": v for k, v in teacher.items()}}

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "teacher_checkpoint": self.teacher_path}

    SELF_TRAIN_OPTIONS = ("recipe", "student_init", "burn_in", "ema_decay", "rounds", "score_threshold", "min_mask_area",
                          "labeled_field", "unsup_weight")

    def resume_options(self, config: dict) -> dict:
        return {**super().resume_options(config),
                **{f"--{k.replace('_', '-')}": config.get(k) for k in self.SELF_TRAIN_OPTIONS}}

    def load_extra_state(self, ckpt: dict) -> None:
        self.teacher.load_state_dict(ckpt["teacher"])


# Self-training recipes: each value of a paper's method, overridden by any option given explicitly.
# burn_in_fraction: the burn-in as a share of each round's steps.
RECIPES = {
    # Berrada et al., WACV 2024, Sec. 3 and 4.1: a random-init student learns from a frozen teacher
    # (guided burn-in, Tab. 2: Cityscapes 5% labels 15k of 90k iterations, the setting of Tab. 4), then
    # teacher := student, then EMA alpha = 0.9996; alpha_C = 0.7, alpha_S = 5, lambda_u = 2.
    "guided-distillation": {"student_init": "scratch", "burn_in_fraction": 15 / 90, "ema_decay": 0.9996,
                            "score_threshold": 0.7, "min_mask_area": 5.0, "unsup_weight": 2.0},
    # Cho et al., CVPR 2023, Sec. 4.2-4.3 and the official PartDistillation.yaml: the student starts from
    # the proposal decoder (MODEL.WEIGHTS) and learns the ranked targets as classes (labels fixed
    # offline: no EMA teacher, no online pseudo-label loss); without --labeled, self-training on the
    # teacher's proposals with its candidate score 0.3, the teacher fixed.
    "partdistillation": {"student_init": "teacher", "burn_in_fraction": 0.0, "ema_decay": 1.0,
                         "score_threshold": 0.3, "min_mask_area": 5.0, "unsup_weight": 0.0},
}


def resolve_recipe(recipe: str, given: dict) -> dict:
    """The recipe's values with every option in ``given`` that is not None in their place."""
    if recipe not in RECIPES:
        raise PartkitError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return {**RECIPES[recipe], **{k: v for k, v in given.items() if v is not None}}


def _describe(classes: Optional[list]) -> str:
    return "is class-agnostic" if classes is None else f"has {len(classes)} classes"


def load_matching(net: torch.nn.Module, state: dict) -> None:
    """Load the entries of ``state`` whose name and shape match ``net``'s (a new class head stays as built)."""
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def self_train_masks(inputs: Sequence[str], out: str, teacher: str, **kwargs) -> dict:
    """Run mask self-training; see :class:`SelfTrainer` for the options."""
    return SelfTrainer(inputs, out, teacher, **kwargs).fit()
