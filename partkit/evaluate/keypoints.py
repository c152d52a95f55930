"""The keypoint family: kpt-regression, landmarks regressed linearly from predicted part centroids.

The protocol of SCOPS as Huang & Li (``interpretability-by-parts``, ``src/cub200/eval_interp.py``)
and Choudhury et al. (``unsup-parts``, ``evaluation/CUB eval.ipynb``) run it on CUB: per image, the
centroid of each predicted part; per keypoint, a linear map from all centroids to that keypoint,
fitted on the training images where it is visible; the error is the L2 distance in coordinates
normalised by the object's box, averaged over the visible keypoints of the test images, x100.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import fields, metrics as M
from ..errors import BadSample, PartkitError
from ._registry import Pass, register_accumulator, register_metric

if TYPE_CHECKING:
    from . import EvalOptions, SampleView

NORMS = ("bbox", "image")


class _Landmarks:
    """Per image: part centroids, keypoints and the normalising box (kept until the fit)."""

    def __init__(self, o: EvalOptions):
        if o.kpt_train < 0:
            raise PartkitError(f"--kpt-train must be 0 or more, got {o.kpt_train}")
        if o.kpt_train and o.match_on:
            raise PartkitError("kpt-regression fits on --match-on shards or on the first --kpt-train images, not "
                               "both; drop one")
        if not o.kpt_train and not o.match_on:
            raise PartkitError("kpt-regression needs images to fit on: give --match-on TRAIN_SHARDS (the official "
                               "protocol: the train split) or --kpt-train N (the first N images of the input)")
        self.o = o
        self.items: list[tuple] = []
        self.names: list[str] | None = None

    def prepare(self, v: SampleView):
        objs, names = v.keypoints
        if len(objs) != 1:
            raise BadSample(v.key, f"'gt_kpts.json' has {len(objs)} objects; kpt-regression needs exactly one "
                                   "object's keypoints per image")
        if self.names is not None and len(names) != len(self.names):
            raise BadSample(v.key, f"'gt_kpts.json' has {len(names)} keypoints, earlier images {len(self.names)}; "
                                   "kpt-regression needs the same keypoints in every image")
        pred = v.pred
        height, width = pred.shape
        if self.o.kpt_norm == "bbox":
            if not v.has("gt_objects.json"):
                raise BadSample(v.key, "has no 'gt_objects.json' field for the object box of --kpt-norm bbox; run "
                                       "`partkit pack --coco FILE` first, or use --kpt-norm image")
            boxes = [o for o in fields.objects(v.sample) if not o.get("iscrowd")]
            if len(boxes) != 1:
                raise BadSample(v.key, f"'gt_objects.json' has {len(boxes)} objects; --kpt-norm bbox needs exactly "
                                       "one box per image (or use --kpt-norm image)")
            try:
                box = np.asarray(boxes[0]["bbox"], np.float64).reshape(4)
            except (KeyError, TypeError, ValueError):
                raise BadSample(v.key, "the object in 'gt_objects.json' has no 'bbox' [x, y, w, h]") from None
            if not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
                raise BadSample(v.key, f"the object box {box.tolist()} in 'gt_objects.json' is empty or not finite")
        else:
            box = np.array([0.0, 0.0, width, height])
        ids = np.unique(pred)
        centroids = M.part_centroids(pred, ids=[int(i) for i in ids if i != 0])  # 0 is background, never a part
        visible = objs[0][:, 2] >= self.o.kpt_min_visibility
        return names, centroids, objs[0][:, :2].copy(), visible, box

    def commit(self, payload) -> None:
        names, *item = payload
        if self.names is None:
            self.names = names
        self.items.append(tuple(item))


def _design(items: list, parts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N x 2P centroids, N x K x 2 keypoints, N x K visible), both coordinates normalised by the box."""
    x = np.empty((len(items), 2 * len(parts)))
    for n, (centroids, _, _, box) in enumerate(items):
        for j, part in enumerate(parts):
            x[n, 2 * j:2 * j + 2] = centroids.get(part, (0.0, 0.0))  # a missing part sits at the origin
        x[n, 0::2] = (x[n, 0::2] - box[0]) / box[2]
        x[n, 1::2] = (x[n, 1::2] - box[1]) / box[3]
    y = np.stack([(kp - box[:2]) / box[2:] for _, kp, _, box in items])
    visible = np.stack([vis for _, _, vis, _ in items])
    return x, y, visible


def _result(acc: _Landmarks, fit: _Landmarks | None, o: EvalOptions) -> dict:
    if fit is not None:
        train, test, fitted_on = fit.items, acc.items, "match-on shards"
        if fit.names is not None and acc.names is not None and len(fit.names) != len(acc.names):
            raise PartkitError(f"the --match-on shards have {len(fit.names)} keypoints per image, the scored ones "
                               f"{len(acc.names)}; give shards of the same dataset")
    else:
        train, test, fitted_on = acc.items[:o.kpt_train], acc.items[o.kpt_train:], f"first {o.kpt_train} images"
        if not test:
            raise PartkitError(f"kpt-regression fits on the first {o.kpt_train} images and scores the rest, but the "
                               f"input has {len(acc.items)}; lower --kpt-train or give more images")
    if not train:
        raise PartkitError("kpt-regression: no images to fit the regression on")
    parts = sorted({p for centroids, *_ in train for p in centroids})
    if not parts:
        raise PartkitError("kpt-regression: the training images have no predicted parts (ids other than 0)")
    names = acc.names or []
    x_fit, y_fit, vis_fit = _design(train, parts)
    x_test, y_test, vis_test = _design(test, parts)
    errors, per_keypoint, unfitted = [], {}, []
    for k, name in enumerate(names):
        fit_rows, test_rows = vis_fit[:, k], vis_test[:, k]
        if not test_rows.any():
            continue
        if not fit_rows.any():
            unfitted.append(name)
            continue
        pred = M.landmark_regression(x_fit[fit_rows], y_fit[fit_rows, k], x_test[test_rows])
        err = np.linalg.norm(pred - y_test[test_rows, k], axis=1)
        errors.append(err)
        per_keypoint[name] = {"error": float(err.mean() * 100), "n": int(err.size)}
    if not errors:
        raise PartkitError("kpt-regression: no visible keypoint in the test images has a visible counterpart in the "
                           "training images to fit on")
    err = np.concatenate(errors)
    out = {"value": float(err.mean() * 100), "per_keypoint": per_keypoint, "norm": o.kpt_norm,
           "fitted_on": fitted_on, "train_images": len(train), "test_images": len(test), "parts": len(parts),
           "keypoints": int(err.size)}
    if unfitted:
        out["unfitted"] = unfitted  # visible in test images only: no regressor, not scored
    return out


register_accumulator("kpt-regression", lambda o, names: _Landmarks(o))


def _summary(r: dict) -> str:
    return (f"L2 error x100 in {r['norm']}-normalised coordinates over {r['keypoints']} visible test keypoints; "
            f"linear from {r['parts']} part centroids, fitted on {r['fitted_on']} ({r['train_images']} train / "
            f"{r['test_images']} test images)")


@register_metric("kpt-regression", accumulator="kpt-regression", summary=_summary,
                 options=("pred", "kpt_min_visibility", "kpt_train"), choices={"kpt_norm": NORMS},
                 fit="kpt-regression")
def kpt_regression(p: Pass) -> dict:
    """Mean keypoint error (lower is better) of a linear regression from predicted part centroids."""
    return _result(p.accumulators["kpt-regression"], p.fit.get("kpt-regression"), p.options)
