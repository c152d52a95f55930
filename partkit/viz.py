"""Drawing primitives for part pictures: colours, overlays, titled panels, purity grids, confusion
heat maps, PNG files. What to draw from which samples is :mod:`partkit.show`.

Colours are fixed per label id (:func:`palette`), so part 3 has the same colour in every
picture. Drawing uses Pillow; the heat map uses matplotlib's Agg canvas without pyplot, so
no global backend is touched.

Example:
    >>> rgb = overlay_panel(image, pred, gt)  # doctest: +SKIP
    >>> save_png("overlay.png", rgb)  # doctest: +SKIP
"""
from __future__ import annotations

import colorsys
import heapq
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import PartkitError

__all__ = ["palette", "colorize", "label_colors", "heat_colors", "overlay", "titled", "overlay_panel", "PurityGrid", "save_confusion",
           "legend_entries", "legend", "part_label", "confusion_figure",
           "save_png"]

# tab20's colours, reordered so neighbouring ids contrast; beyond 20, golden-ratio hues.
_BASE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (199, 199, 199)], dtype=np.uint8)
IGNORE_COLOR = (90, 90, 90)


def palette(n: int) -> np.ndarray:
    """Colours (n x 3 uint8) for ids 0..n-1; id 0 (background) is black.

    Example:
        >>> palette(3).tolist()
        [[0, 0, 0], [31, 119, 180], [255, 127, 14]]
    """
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(1, n):
        if i - 1 < len(_BASE):
            out[i] = _BASE[i - 1]
        else:
            h = ((i - 1 - len(_BASE)) * 0.618033988749895) % 1.0
            out[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.65, 0.95)]
    return out[:n]


def colorize(labels: np.ndarray, ignore_id: Optional[int] = None) -> np.ndarray:
    """A label map as an RGB picture (H x W x 3 uint8)."""
    labels = np.asarray(labels)
    ids = labels.astype(np.int64)
    if ignore_id is not None:
        ids = np.where(labels == ignore_id, 0, ids)
    rgb = palette(int(ids.max(initial=0)) + 1)[ids]
    if ignore_id is not None:
        rgb[labels == ignore_id] = IGNORE_COLOR
    return rgb


def label_colors(labels: np.ndarray) -> np.ndarray:
    """A fixed colour per id for per-point labels (:func:`palette` without its black background
    slot, so id 0 is coloured too); negative ids (unlabelled) are light grey.

    Example:
        >>> label_colors(np.array([0, 1, -1])).tolist()
        [[31, 119, 180], [255, 127, 14], [200, 200, 200]]
    """
    labels = np.asarray(labels, np.int64)
    pal = palette(int(labels.max(initial=0)) + 2)[1:]
    out = pal[np.clip(labels, 0, None)]
    out[labels < 0] = (200, 200, 200)  # unlabelled
    return out


def heat_colors(values: np.ndarray, vmax: Optional[float] = None) -> np.ndarray:
    """Values in [0, vmax] (default: their max) as viridis colours (N x 3 uint8); NaN is light grey.

    Example:
        >>> heat_colors(np.array([0.0, 1.0])).tolist()
        [[68, 1, 84], [253, 231, 37]]
    """
    from matplotlib import colormaps

    v = np.asarray(values, np.float64)
    top = vmax if vmax is not None else (np.nanmax(v) if np.isfinite(v).any() else 1.0)
    t = np.clip(np.nan_to_num(v / max(top, 1e-12)), 0, 1)
    out = np.round(255 * colormaps["viridis"](t)[..., :3]).astype(np.uint8)
    out[~np.isfinite(v)] = (200, 200, 200)
    return out


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55, ignore_id: Optional[int] = None) -> np.ndarray:
    """Blend part colours onto the image where the label is not background."""
    colours = colorize(labels, ignore_id).astype(np.float32)
    out = image.astype(np.float32)
    painted = np.asarray(labels) != 0
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return out.round().astype(np.uint8)


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def titled(rgb: np.ndarray, title: str, *, bar: int = 20, font_size: Optional[int] = 14) -> np.ndarray:
    """The picture under a white bar of ``bar`` pixels holding ``title`` (``font_size`` None:
    Pillow's default font)."""
    im = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + bar), (255, 255, 255))
    im.paste(Image.fromarray(rgb), (0, bar))
    ImageDraw.Draw(im).text((4, 3), title, fill=(0, 0, 0), font=None if font_size is None else _font(font_size))
    return np.asarray(im)


def _hstack(panels: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def part_label(i: int, names: Optional[Mapping[int, str]] = None) -> str:
    """What a picture calls part ``i``: its name when ``names`` has one, else the id."""
    return (names or {}).get(int(i), str(int(i)))


def legend_entries(labels: np.ndarray, names: Optional[Mapping[int, str]] = None,
                   ignore_id: Optional[int] = None) -> list[tuple[int, str]]:
    """(id, text) for each part present in ``labels`` (background and ignore left out), by id."""
    ids = np.unique(np.asarray(labels))
    return [(int(i), part_label(i, names)) for i in ids if i != 0 and (ignore_id is None or i != ignore_id)]


def legend(entries: Sequence[tuple[int, str]], width: int, *, row: int = 16) -> np.ndarray:
    """A white strip ``width`` wide with a colour swatch (:func:`palette`) and the text of each entry,
    wrapped over as many rows as needed."""
    font = _font(11)
    pal = palette(max((i for i, _ in entries), default=0) + 1)
    placed, x, y = [], 4, 2
    for i, text in entries:
        w = 14 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 10
        if x + w > width and x > 4:
            x, y = 4, y + row
        placed.append((x, y, i, text))
        x += w
    im = Image.new("RGB", (width, y + row + 2), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for x, y, i, text in placed:
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(int(c) for c in pal[i]), outline=(0, 0, 0))
        draw.text((x + 14, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(im)


def overlay_panel(image: np.ndarray, pred: np.ndarray, gt: Optional[np.ndarray] = None,
                  ignore_id: Optional[int] = None, names: Optional[Mapping[int, str]] = None) -> np.ndarray:
    """Image | prediction overlay | ground-truth overlay, side by side with titles; with ``names``
    ({ground-truth id: name}), a legend of the ground-truth parts present under its panel."""
    panels = [titled(image, "image"), titled(overlay(image, pred), "predicted parts")]
    if gt is not None:
        panel = titled(overlay(image, gt, ignore_id=ignore_id), "ground truth")
        if names:
            panel = np.concatenate([panel, legend(legend_entries(gt, names, ignore_id), panel.shape[1])])
        panels.append(panel)
    return _hstack(panels)


def save_png(path: str, rgb: np.ndarray) -> str:
    """Write ``rgb`` as a PNG file, atomically (a failed write leaves nothing under ``path``)."""
    import io

    from .io.sink import write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return path


def _thumbnail(image: np.ndarray, pred: np.ndarray, part: int, size: int) -> np.ndarray:
    """The object (all predicted parts) cropped and squared, ``part`` tinted, the rest dimmed."""
    obj = pred != 0
    ys, xs = np.nonzero(obj if obj.any() else np.ones_like(obj))
    pad = max(4, int(0.05 * max(np.ptp(ys), np.ptp(xs))))
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, pred.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, pred.shape[1])
    crop = image[y0:y1, x0:x1].astype(np.float32)
    mask = pred[y0:y1, x0:x1] == part
    colour = palette(part + 1)[part].astype(np.float32)
    out = crop * 0.35
    out[mask] = 0.5 * crop[mask] + 0.5 * colour
    im = Image.fromarray(out.round().astype(np.uint8))
    im.thumbnail((size, size), Image.Resampling.BILINEAR)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(square)


class PurityGrid:
    """PartDistillation's purity figure: for each discovered part, the ``n_rows`` x ``n_rows``
    images where it covers the most pixels (or scores highest), with that part highlighted.

    ``update(key, image, pred, group=...)`` keeps only the best few thumbnails per (group, part),
    so memory does not grow with the dataset. ``group`` (e.g. an object class) gives one
    figure per group.

    Example:
        >>> grid = PurityGrid()  # doctest: +SKIP
        >>> for key, image, pred in samples: grid.update(key, image, pred)  # doctest: +SKIP
        >>> grid.save("purity.png")  # doctest: +SKIP
    """

    def __init__(self, n_rows: int = 3, thumb: int = 128, columns: int = 4,
                 title: Optional[Callable[[Optional[str], int], str]] = None):
        self.n_rows, self.thumb, self.columns = n_rows, thumb, columns
        self.title = title or (lambda group, part: f"part {part}")
        self.heaps: dict[tuple, list] = {}
        self.order = 0

    def update(self, key: str, image: np.ndarray, pred: np.ndarray, group: Optional[str] = None,
               scores: Optional[dict] = None) -> None:
        """``scores`` ({part: value}, e.g. a detection score) ranks the instances instead of their area."""
        counts = np.bincount(np.asarray(pred).ravel().astype(np.int64))
        keep = self.n_rows * self.n_rows
        for part in np.flatnonzero(counts):
            if part == 0:
                continue
            heap = self.heaps.setdefault((group, int(part)), [])
            # Min-heap on (area, -order): the earliest sample wins ties, so output is deterministic.
            item = (int(counts[part]) if scores is None else float(scores.get(int(part), 0.0)), -self.order)
            if len(heap) < keep or item > heap[0][:2]:
                entry = (*item, key, _thumbnail(image, pred, int(part), self.thumb))
                (heapq.heappush if len(heap) < keep else heapq.heapreplace)(heap, entry)
        self.order += 1

    def groups(self) -> list:
        return sorted({g for g, _ in self.heaps}, key=lambda g: (g is not None, str(g)))

    def render(self, group: Optional[str] = None) -> np.ndarray:
        parts = sorted(p for g, p in self.heaps if g == group)
        if not parts:
            raise PartkitError("no predicted parts to draw in the purity grid (every prediction is background)")
        cell = self.n_rows * self.thumb + (self.n_rows - 1) * 2
        tiles = []
        for part in parts:
            best = sorted(self.heaps[(group, part)], reverse=True)
            block = np.full((cell, cell, 3), 255, np.uint8)
            for i, entry in enumerate(best):
                r, c = divmod(i, self.n_rows)
                y, x = r * (self.thumb + 2), c * (self.thumb + 2)
                block[y:y + self.thumb, x:x + self.thumb] = entry[3]
            tiles.append(titled(block, self.title(group, part)))
        rows = [_hstack(tiles[i:i + self.columns], gap=12) for i in range(0, len(tiles), self.columns)]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 12), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        return np.concatenate(rows)

    def save(self, path: str) -> str:
        """Write the figure; with groups, one file per group (``purity_<group>.png``)."""
        groups = self.groups()
        if groups == [None] or not groups:
            return save_png(path, self.render(None))
        stem, ext = os.path.splitext(path)
        for g in groups:
            save_png(f"{stem}_{'none' if g is None else g}{ext or '.png'}", self.render(g))
        return os.path.dirname(path) or "."


def confusion_figure(table: np.ndarray, *, names: Optional[Mapping[int, str]] = None,
                     true_name: str = "ground-truth part", pred_name: str = "predicted cluster"):
    """The matplotlib ``Figure`` of :func:`save_confusion`; ground-truth ticks show ``names``
    ({id: name}) where given, predicted clusters their id."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = np.asarray(table, dtype=np.float64)
    true_ids = np.flatnonzero(table.sum(1) > 0)
    pred_ids = np.flatnonzero(table.sum(0) > 0)
    if not true_ids.size or not pred_ids.size:
        raise PartkitError("nothing to draw in the confusion map: no scored pixels (try --region full)")
    conf = table[np.ix_(true_ids, pred_ids)].T
    order = np.lexsort((-conf.max(1), conf.argmax(1)))
    conf, pred_ids = conf[order], pred_ids[order]
    frac = conf / conf.sum(1, keepdims=True)
    fig = Figure(figsize=(max(4, 0.4 * len(true_ids) + 2), max(3, 0.35 * len(pred_ids) + 1.5)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(true_ids)), [part_label(i, names) for i in true_ids], fontsize=7,
                  rotation=45 if names else 0, ha="right" if names else "center")
    ax.set_yticks(range(len(pred_ids)), [str(i) for i in pred_ids], fontsize=7)
    ax.set_xlabel(true_name)
    ax.set_ylabel(pred_name)
    ax.set_title("fraction of each cluster's pixels per part", fontsize=9)
    if frac.size <= 400:
        for (r, c), v in np.ndenumerate(frac):
            if v >= 0.01:
                ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def save_confusion(path: str, table: np.ndarray, *, names: Optional[Mapping[int, str]] = None,
                   true_name: str = "ground-truth part", pred_name: str = "predicted cluster") -> str:
    """Heat map of a true x predicted count table, drawn predicted x true, rows normalised
    (each cluster's pixels split over the true parts); clusters ordered by their majority part;
    ground-truth parts labelled by ``names`` ({id: name}) where given."""
    import io

    from .io.sink import write_atomic

    fig = confusion_figure(table, names=names, true_name=true_name, pred_name=pred_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
    return path
