"""What ``partkit show`` and ``partkit eval --viz`` draw, from which samples, into which files.

The drawing itself (colours, overlays, titled panels, purity grids, confusion heat maps, PNG
files) is :mod:`partkit.viz`; the point-cloud views are :func:`partkit.render3d.render_views_png`.
This module decides what goes into each picture:

- :class:`Pictures`: overlays of the first samples, a purity grid, a confusion heat map. It is
  an accumulator of the evaluation pass, so ``eval --viz`` draws in the same pass that scores,
  and ``show overlays|purity|confusion`` is that pass with the pictures only
  (:func:`partkit.evaluate.render`).
- :func:`purity_per_class`: one purity figure per object class from ``partkit rank apply``
  output, plus an ``index.html``.
- :func:`show_points`: three views of each point cloud, a row per label field; with ``ply``, a
  coloured ``.ply`` per (point cloud, label field) for MeshLab / CloudCompare.
- :func:`save_shape_views`: ``distill-3d --save-views``: a shape's rendered views, the teacher's
  label map per view, and its coverage (views per point, vote confidence).

Example:
    >>> show_points(["preds.tar"], "pictures/")  # doctest: +SKIP
    ['pictures/cap_val_000.png', ...]
"""
from __future__ import annotations

import html
import os
import re
from typing import Callable, Optional, Sequence

import numpy as np

from . import viz
from ._log import progress
from . import fields as F
from . import metrics as M
from .errors import BadSample, Handler, PartkitError, stop
from .io import decode_json, decode_label_map, decode_npy, iter_loaded, write_atomic
from .io.tario import key_problem
from .pointcloud import decode_shape, write_ply

__all__ = ["VIEWS", "Pictures", "view_paths", "png_path", "purity_per_class", "show_points", "save_shape_views", "file_key"]

VIEWS = ("overlays", "purity", "confusion")


def view_paths(directory: str) -> dict:
    """Where ``eval --viz DIR`` puts each picture: ``overlays/``, ``purity.png``, ``confusion.png``."""
    return {"overlays": os.path.join(directory, "overlays"), "purity": os.path.join(directory, "purity.png"),
            "confusion": os.path.join(directory, "confusion.png")}


def png_path(path: str) -> str:
    """Where ``show purity|confusion -o PATH`` writes: PATH itself when it ends in ``.png``, else
    PATH + ``.png`` (``-o out/confusion`` writes ``out/confusion.png``, never a file without an
    extension)."""
    return path if path.lower().endswith(".png") else path + ".png"


class Pictures:
    """Pictures of a pass over samples: ``out`` maps each view in :data:`VIEWS` to draw to its path.

    ``overlays`` (a folder) gets ``<key>.png`` for the first ``max_overlays`` samples, ``purity``
    (a PNG) the purity grid, ``confusion`` (a PNG) the heat map of the table ``confusion_table()``
    returns at the end (None: nothing was tallied, no file). ``prepare(view)`` reads what the
    pictures need from a sample view (may raise :class:`BadSample`); ``commit`` draws and cannot
    fail on the sample; ``finish`` writes the pooled pictures and returns ``{view: path}``.
    """

    def __init__(self, out: dict, *, max_overlays: int = 16,
                 confusion_table: Optional[Callable[[], Optional[np.ndarray]]] = None,
                 names: Optional[F.PartNames] = None):
        self.out, self.max_overlays, self.confusion_table = out, max_overlays, confusion_table
        self.names = names if names is not None else F.PartNames()  # filled by the pass (evaluate._Names)
        self.purity = viz.PurityGrid(title=self._purity_title) if "purity" in out else None
        self.majority = M.Contingency() if "purity" in out else None  # ground truth x cluster, for the titles
        self.written = 0

    def cluster_names(self) -> dict[int, str]:
        """{predicted cluster: the name (or id) of the ground-truth part most of its pixels fall on},
        from the samples seen so far that have ground truth."""
        table = self.majority.table_ if self.majority is not None else np.zeros((0, 0))
        if not table.size:
            return {}
        fg = table.copy()
        fg[0] = 0
        return {int(c): viz.part_label(int(fg[:, c].argmax()), self.names.names)
                for c in np.flatnonzero(fg.sum(0)) if c != 0}

    def _purity_title(self, group, part: int) -> str:
        name = self.cluster_names().get(int(part)) if self.names.names else None
        return f"part {part}" if name is None else f"part {part}: mostly {name}"

    def prepare(self, v):
        need_image = self.purity is not None or ("overlays" in self.out and self.written < self.max_overlays)
        image = v.image if need_image else None
        if image is not None and image.shape[:2] != v.shape:
            raise BadSample(v.key, f"the image is {image.shape[1]}x{image.shape[0]} but "
                                   f"'{v.gt_field}' is {v.shape[1]}x{v.shape[0]}")
        gt = v.gt if v.has(v.gt_field) else None
        table = None
        if self.majority is not None and gt is not None:
            keep = gt != v.ignore_id
            table = M.Contingency().update(gt[keep], v.pred[keep])
        return v.key, image, v.pred, gt, (v.ignore_id if gt is not None else None), table

    def commit(self, payload) -> None:
        key, image, pred, gt, ignore_id, table = payload
        if "overlays" in self.out and self.written < self.max_overlays:
            os.makedirs(self.out["overlays"], exist_ok=True)
            viz.save_png(os.path.join(self.out["overlays"], f"{key}.png"),
                         viz.overlay_panel(image, pred, gt, ignore_id=ignore_id, names=self.names.names))
            self.written += 1
        if self.purity is not None:
            self.purity.update(key, image, pred)
        if table is not None:
            self.majority.add(table)

    def finish(self) -> dict:
        files = {}
        if "overlays" in self.out:
            files["overlays"] = self.out["overlays"]
        if self.purity is not None:
            files["purity"] = self.purity.save(self.out["purity"])
        if "confusion" in self.out and self.confusion_table is not None:
            table = self.confusion_table()
            if table is not None:
                files["confusion"] = viz.save_confusion(self.out["confusion"], table, names=self.names.names)
        return files


# ---------------------------------------------------------------------------------------------
# Purity per (class, part cluster) of `partkit rank apply` output


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def _ranked(sample: dict) -> tuple:
    """(key, ranked.json, ranked_parts.png as int64, image) of a ``rank apply`` sample, checked."""
    key = sample["__key__"]
    doc = decode_json(sample, "ranked.json")
    if (not isinstance(doc, dict) or not isinstance(doc.get("k"), int) or doc["k"] < 1
            or not isinstance(doc.get("proposals"), list) or not isinstance(doc.get("classes"), list)
            or not all(isinstance(p, dict) and "part_id" in p and "score" in p for p in doc["proposals"])):
        raise BadSample(key, "'ranked.json' lacks k, classes or proposals (part_id, score); "
                             "re-run `partkit rank apply`")
    labels = decode_label_map(sample, "ranked_parts.png").astype(np.int64)
    image = F.image(sample)
    if image.shape[:2] != labels.shape:
        raise BadSample(key, "ranked_parts.png and the image differ in size")
    return key, doc, labels, image


def purity_per_class(inputs: Sequence[str], out_dir: str, *, n_rows: int = 3, handler: Handler = stop) -> dict:
    """For each class, a figure with one ``n_rows`` x ``n_rows`` grid per part cluster: the
    highest-scoring instances (from ``ranked.json``), part highlighted; plus ``index.html``."""
    grid, k, samples = None, None, 0
    with progress("show purity --per-class") as bar:
        for key, doc, labels, image in iter_loaded(inputs, _ranked, handler=handler):
            k = int(doc["k"])
            if grid is None:
                grid = viz.PurityGrid(n_rows, title=lambda group, part: f"{group} cluster {(part - 1) % k} (id {part})")
            best: dict = {}
            for p in doc["proposals"]:
                best[p["part_id"]] = max(best.get(p["part_id"], 0.0), p["score"])
            for j, name in enumerate(doc["classes"]):
                mine = (labels > j * k) & (labels <= (j + 1) * k)
                if mine.any():
                    grid.update(key, image, np.where(mine, labels, 0), group=name,
                                scores={pid: s for pid, s in best.items() if j * k < pid <= (j + 1) * k})
            samples += 1
            bar.update()
    if grid is None or not grid.groups():
        raise PartkitError("no ranked parts to draw; run `partkit rank apply` on these samples first")
    os.makedirs(out_dir, exist_ok=True)
    files, rows = {}, []
    for g in grid.groups():
        fname = f"purity_{_safe(str(g))}.png"
        files[str(g)] = viz.save_png(os.path.join(out_dir, fname), grid.render(g))
        rows.append(f"<h2>{_html(str(g))}</h2>\n<img src=\"{fname}\" alt=\"{_html(str(g))}\">")
    page = ("<!doctype html>\n<meta charset=\"utf-8\">\n<title>partkit purity per class</title>\n"
            f"<h1>Part clusters per class</h1>\n<p>{samples} samples; each grid shows the highest-scoring instances of "
            f"one cluster (part id = class_index * {k} + cluster + 1).</p>\n" + "\n".join(rows) + "\n")
    files["index"] = os.path.join(out_dir, "index.html")
    write_atomic(files["index"], page.encode("utf-8"))
    return files


# ---------------------------------------------------------------------------------------------
# Point clouds


def file_key(key: str) -> str:
    """A sample key used as a file name: the sample-key rule of :func:`partkit.io.tario.key_problem`
    (no path separators, no leading dot, bounded length), else :class:`BadSample`."""
    problem = key_problem(key)
    if problem is not None:
        raise BadSample(key, f"cannot name a file after this sample: it {problem}")
    return key


def _field_stem(name: str) -> str:
    return name.split(".", 1)[0]


def show_points(inputs: Sequence[str], out_dir: Optional[str], *,
                fields: Sequence[str] = ("pred_parts.npy", "gt_parts.npy"), max_samples: int = 16, size: int = 256,
                ply: Optional[str] = None, ascii_ply: bool = False, handler: Handler = stop) -> list[str]:
    """One ``<key>.png`` per point-cloud sample in ``out_dir``: a row per label field present, three
    views each; with ``ply`` (a folder), also ``<key>.<field>.ply`` per label field present
    (``<key>.points.ply``, grey, when none is), points coloured as in the pictures, with a ``label``
    property (binary PLY; ``ascii_ply``: ASCII).

    Samples with none of ``fields`` are drawn grey (shading only).
    """
    from .render3d import render_views_png  # torch: only when points are drawn
    from .viz import label_colors

    if max_samples < 1:
        raise PartkitError(f"--max must be at least 1, got {max_samples}")
    if out_dir is None and ply is None:
        raise PartkitError("show points needs --output DIR (PNG pictures), --ply DIR (.ply files) or both")
    for opt, folder in (("--output", out_dir), ("--ply", ply)):
        if folder is not None and os.path.isfile(folder):
            raise PartkitError(f"{opt} {folder!r} is a file; pass a folder")
    def load(sample: dict) -> tuple:
        shape = decode_shape(sample)
        panels = []
        for name in fields:
            if name in sample:
                labels = decode_npy(sample, name).reshape(-1)
                if len(labels) != len(shape):
                    raise BadSample(sample["__key__"], f"'{name}' has {len(labels)} labels for {len(shape)} points")
                panels.append((name, labels))
        return file_key(sample["__key__"]), shape, panels or [("points", None)]

    written, count = [], 0
    for key, shape, panels in iter_loaded(inputs, load, handler=handler):
        if out_dir is not None:
            path = os.path.join(out_dir, f"{key}.png")
            render_views_png(path, shape.points, panels, normals=shape.normals, size=size)
            written.append(path)
        if ply is not None:
            os.makedirs(ply, exist_ok=True)
            for name, labels in panels:
                grey = np.full((len(shape), 3), 153, np.uint8)
                colors = grey if labels is None else label_colors(labels)
                path = os.path.join(ply, f"{key}.{_field_stem(name)}.ply")
                write_atomic(path, write_ply(shape.points, colors, shape.normals, labels, binary=not ascii_ply))
                written.append(path)
        count += 1
        if count >= max_samples:
            break
    if not written:
        raise PartkitError("show points: the input holds no point-cloud samples; run `partkit pack` on point clouds")
    return written


def save_shape_views(out_dir: str, key: str, shape, rendering, label, confidence, point_labels) -> list[str]:
    """``distill-3d --save-views``: ``<key>.views.png`` (the rendered views), ``<key>.teacher.png`` (the
    teacher's label per pixel, background white, one colour per class, under a row of its confidence)
    and ``<key>.coverage.png`` (the points from three views, coloured by how many views labelled each,
    and by the vote confidence of its pseudo-label; grey: never seen)."""
    from .render3d import render_views_png

    key = file_key(key)
    os.makedirs(out_dir, exist_ok=True)
    V = rendering.image.shape[0]
    views = np.concatenate(list(rendering.image.cpu().numpy()), axis=1)
    lab = label.cpu().numpy()
    colours = viz.label_colors(lab.reshape(-1)).reshape(*lab.shape, 3)
    colours[lab < 0] = 255
    conf = confidence.float().cpu().numpy()
    heat = viz.heat_colors(conf.reshape(-1), vmax=1.0).reshape(*conf.shape, 3)
    heat[lab < 0] = 255
    teacher = np.concatenate([viz.titled(np.concatenate(list(colours), axis=1), "teacher label per view", bar=18,
                                         font_size=None),
                              viz.titled(np.concatenate(list(heat), axis=1), "teacher confidence (0..1)", bar=18,
                                         font_size=None)], axis=0)
    count = point_labels.views_per_point().cpu().numpy().astype(np.float64)
    target, weight = point_labels.targets()
    seen = target.cpu().numpy() >= 0
    conf_pts = np.where(seen, weight.cpu().numpy(), np.nan)
    count_cols = viz.heat_colors(np.where(count > 0, count, np.nan), vmax=float(V))
    cov = point_labels.coverage()
    paths = [os.path.join(out_dir, f"{key}.{name}.png") for name in ("views", "teacher", "coverage")]
    viz.save_png(paths[0], viz.titled(views, f"{key}: {V} rendered views", bar=18, font_size=None))
    viz.save_png(paths[1], teacher)
    render_views_png(paths[2], shape.points, [
        (f"views labelling each point (0..{V}; grey: none), coverage {100 * cov['coverage']:.1f}%", count_cols),
        (f"vote confidence (0..1), mean {cov['confidence']:.2f}", viz.heat_colors(conf_pts, vmax=1.0))],
        normals=shape.normals, size=192)
    return paths
