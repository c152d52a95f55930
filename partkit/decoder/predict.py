"""``partkit predict``: part proposals from a trained decoder, as RLE masks with scores and features."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import fields, rle
from .._runtime import resolve_device
from ..training import load_checkpoint
from ..errors import BadSample, Handler, PartkitError, stop
from ..io import Output, decode_json, encode_json, encode_npy, encode_png, run_stage
from .model import DecoderConfig, PartDecoder

__all__ = ["load_decoder", "predict", "masks_to_image", "proposals_from_labels", "encode_proposals"]


def load_decoder(checkpoint: str, device="cpu", ema: bool = False) -> tuple[PartDecoder, dict]:
    ckpt = load_checkpoint(checkpoint)
    if "decoder_config" not in ckpt:
        raise PartkitError(f"{checkpoint!r} is not a part-decoder checkpoint (no decoder_config)")
    if ema and "teacher" not in ckpt:
        raise PartkitError(f"--teacher reads the EMA teacher of a self-train run, but {checkpoint!r} has none "
                           "(a train-decoder run?); drop --teacher")
    net = PartDecoder(DecoderConfig(**ckpt["decoder_config"]))
    state = ckpt["teacher"] if ema else ckpt["model"]
    net.load_state_dict(state)
    return net.to(device).eval(), ckpt


def masks_to_image(logits: torch.Tensor, meta: dict) -> torch.Tensor:
    """Mask logits at mask-feature resolution (Q x 2h x 2w) -> Q x H x W at image resolution."""
    gh, gw = meta["grid"]
    rh, rw = meta["resized"]
    H, W = meta["image_size"]
    cover = (gh * meta["stride"], gw * meta["stride"])  # resized-input pixels the grid spans
    up = F.interpolate(logits[None], size=cover, mode="bilinear", align_corners=False)[0]
    return F.interpolate(up[None, :, :rh, :rw], size=(H, W), mode="bilinear", align_corners=False)[0]


def encode_proposals(binary: np.ndarray, scores: np.ndarray, classes: Optional[Sequence] = None) -> list[dict]:
    """Q x H x W boolean masks + scores -> proposals.json entries (compressed RLE, bbox, area); with
    ``classes`` (a ``(label id, name)`` per mask), ``category_id`` and ``category`` too."""
    out = []
    for i, (m, s) in enumerate(zip(binary, scores)):
        seg = rle.encode(m)
        entry = {"id": i + 1, "score": round(float(s), 6), "bbox": [round(v, 2) for v in rle.bbox(seg)],
                 "area": int(rle.area(seg)), "segmentation": seg}
        if classes is not None:
            entry["category_id"], entry["category"] = int(classes[i][0]), str(classes[i][1])
        out.append(entry)
    return out


def proposals_from_labels(sample: dict, field: str = "parts.png") -> dict:
    """Each id of a label map (e.g. raw clusters) as one proposal at image size, scored by its area share.

    Lets ``eval ar`` compare raw cluster proposals with the decoder's on equal terms.
    """
    from ..grid import grid_to_image
    from ..io import decode_label_map

    labels = decode_label_map(sample, field)
    meta_field = fields.companion(field)
    meta = decode_json(sample, meta_field) if meta_field in sample else {}
    if "grid" in meta and list(labels.shape) == list(meta["grid"]):
        labels = grid_to_image(labels, fields.geometry(meta, sample["__key__"], meta_field))
    elif "json" in sample:
        info = fields.info(sample)
        if labels.shape != (info["height"], info["width"]):
            labels = np.asarray(Image.fromarray(labels).resize((info["width"], info["height"]), Image.NEAREST))
    ids, counts = np.unique(labels[fields.foreground(labels)], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    binary = np.stack([labels == ids[i] for i in order]) if len(ids) else np.zeros((0, *labels.shape), bool)
    return {"proposals": encode_proposals(binary, counts[order] / max(1, counts.sum())), "source": field}


def predict(
    inputs: Sequence[str],
    checkpoint: str,
    *,
    topk: int = 200,  # PartDistillation: TEST.DETECTIONS_PER_IMAGE 200, its AR@200
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    label_map: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    output: Output = Output(),
    handler: Handler = stop,
    use_teacher: bool = False,
    label_rule: str = "proposal",
    objects_from: Optional[str] = None,
    fg_threshold: float = fields.SALIENCY_THRESHOLD,
) -> dict:
    """Add ``proposals.json`` (RLE masks, scores, boxes, areas; a class-aware decoder's ``category_id``
    and ``category``) and ``proposals.npy`` (query features); ``label_map``: ``pred_parts.png``.

    ``label_rule``: ``proposal`` (each pixel to its most confident kept proposal) or ``semantic``
    (Mask2Former's semantic inference, class-aware decoders only: each pixel to the class c maximising
    the sum over all queries of p(c | query) x mask probability). ``objects_from`` (gt_objects,
    gt_parts, saliency): ``pred_parts.png`` is 0 outside the sample's objects."""
    if topk < 1:
        raise PartkitError(f"--topk must be at least 1, got {topk}")
    if label_rule not in ("proposal", "semantic"):
        raise PartkitError(f"--label-rule must be proposal or semantic, got {label_rule!r}")
    fields.check_object_source(objects_from)
    dev = resolve_device(device)
    net, ckpt = load_decoder(checkpoint, dev, ema=use_teacher)
    classes = net.cfg.classes  # [[label id, name], ...] of a class-aware decoder, else None
    if label_rule == "semantic" and not classes:
        raise PartkitError("--label-rule semantic needs a class-aware decoder (train-decoder / self-train on a "
                           "label map that names classes); use --label-rule proposal")
    online = None
    if ckpt.get("features") == "online":
        from .features import OnlineFeatures

        spec = ckpt["feature_spec"]
        online = OnlineFeatures(spec["model"], spec["weights"], spec["layers"], spec["size"], dev)

    def prepare(sample: dict):
        if online is not None:
            x, meta = online.meta(sample)
            return sample, x, meta
        feat, meta = fields.features(sample, require_geometry=True)
        if feat.shape[0] != net.cfg.in_channels:
            raise BadSample(sample["__key__"], f"feat.npy has {feat.shape[0]} channels; the decoder was trained on "
                            f"{net.cfg.in_channels} (same extract settings?)")
        return sample, torch.from_numpy(feat.astype(np.float32)), meta

    def process(batch: list) -> list:
        if online is not None:
            feats = online.features(torch.stack([x for _, x, _ in batch]), [m for _, _, m in batch])
        else:
            feats = [x for _, x, _ in batch]
        results = []
        with torch.inference_mode():
            for (sample, _, meta), feat in zip(batch, feats):
                out = net(feat[None].to(dev).float())
                scores, cls = PartDecoder.classify(out["pred_logits"][0])
                order = scores.argsort(descending=True)[:topk]
                order = order[scores[order] >= score_threshold]
                logits = masks_to_image(out["pred_masks"][0][order].float(), meta)
                probs = logits.sigmoid()
                binary = (probs > mask_threshold).cpu().numpy()
                picked = [classes[c] for c in cls[order].tolist()] if classes else None
                doc = {"proposals": encode_proposals(binary, scores[order].cpu().numpy(), picked), "topk": topk,
                       "score_threshold": score_threshold, "mask_threshold": mask_threshold,
                       "checkpoint": checkpoint, "class_aware": bool(classes)}
                if classes:
                    doc["classes"] = {str(i): n for i, n in classes}
                new = {**sample, "proposals.json": encode_json(doc),
                       "proposals.npy": encode_npy(out["query_feats"][0][order].cpu().numpy().astype(np.float16))}
                if label_map:
                    # class-aware: each pixel's class id (the same id means the same part in every image);
                    # class-agnostic: the proposal's id in this image's proposals.json (its score rank)
                    ids = (torch.tensor([i for i, _ in picked], dtype=torch.long) if classes
                           else torch.arange(1, len(order) + 1))
                    if label_rule == "semantic":
                        lab = _semantic_map(out["pred_logits"][0], out["pred_masks"][0], meta, classes)
                    else:
                        lab = _label_map(probs, scores[order], mask_threshold, ids)
                    if objects_from is not None:
                        masks = fields.objects_from(sample, objects_from, lab.shape, fg_threshold=fg_threshold)[1]
                        lab = np.where(masks.any(0), lab, 0) if len(masks) else np.zeros_like(lab)
                    new["pred_parts.png"] = encode_png(lab)
                results.append(new)
        return results

    config = {"checkpoint": checkpoint, "topk": topk, "score_threshold": score_threshold,
              "mask_threshold": mask_threshold, "label_map": label_map, "teacher": use_teacher,
              "label_rule": label_rule, "objects_from": objects_from, "fg_threshold": fg_threshold}
    return run_stage(inputs, process, output=output, name="predict", batch_size=batch_size, prepare=prepare,
                     handler=handler, config=config)


def _semantic_map(class_logits: torch.Tensor, mask_logits: torch.Tensor, meta: dict, classes: list) -> np.ndarray:
    """Mask2Former's semantic inference over all queries: argmax_c sum_q p(c | q) sigmoid(mask_q), as label ids."""
    p = class_logits.float().softmax(-1)[:, :-1]  # the no-part logit is dropped
    m = masks_to_image(mask_logits.float(), meta).sigmoid()
    sem = torch.einsum("qc,qhw->chw", p, m)
    ids = torch.tensor([i for i, _ in classes], dtype=torch.long)
    return ids[sem.argmax(0).cpu()].numpy()


def _label_map(probs: torch.Tensor, scores: torch.Tensor, threshold: float, ids: torch.Tensor) -> np.ndarray:
    """Each pixel to the id (``ids``, one per proposal) of its most confident proposal (argmax of mask
    probability x score), 0 where no mask is on."""
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], np.uint16)
    conf = probs * scores[:, None, None]
    best = conf.argmax(0)
    on = probs.gather(0, best[None])[0] > threshold
    return torch.where(on, ids.to(best.device)[best], torch.zeros_like(best)).cpu().numpy()
