"""partkit.viz and `partkit show`: pictures go to PNG files, colours are fixed per part id."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partkit.cli.main import app
from partkit import viz
from partkit.errors import PartkitError
from partkit.io import encode_png

runner = CliRunner()


def test_palette_is_fixed_per_id():
    p = viz.palette(40)
    assert (p[0] == 0).all() and (viz.palette(5) == p[:5]).all()
    assert len({tuple(c) for c in p[1:]}) == 39  # distinct colours
    labels = np.array([[0, 3, 255]], np.uint8)
    rgb = viz.colorize(labels, ignore_id=255)
    assert rgb[0, 1].tolist() == p[3].tolist() and rgb[0, 2].tolist() == list(viz.IGNORE_COLOR)


def test_overlay_paints_parts_only_and_panel_layout():
    image = np.full((10, 12, 3), 200, np.uint8)
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 3:7] = 2
    out = viz.overlay(image, labels)
    assert (out[labels == 0] == 200).all() and not (out[labels == 2] == 200).all()
    panel = viz.overlay_panel(image, labels, labels)
    assert panel.shape == (10 + 20, 3 * 12 + 2 * 6, 3)
    assert viz.overlay_panel(image, labels).shape[1] == 2 * 12 + 6


def test_purity_grid_keeps_the_largest_instances_per_part(tmp_path):
    grid = viz.PurityGrid(n_rows=2, thumb=16, columns=2)
    image = np.zeros((8, 8, 3), np.uint8)
    for area in [3, 9, 1, 7, 5, 9]:
        pred = np.zeros((8, 8), np.uint8)
        pred.flat[:area] = 1
        pred[7, 7] = 2
        grid.update(f"a{area}", image, pred)
    kept = sorted(grid.heaps[(None, 1)], reverse=True)
    assert [(e[0], e[2]) for e in kept] == [(9, "a9"), (9, "a9"), (7, "a7"), (5, "a5")]
    assert kept[0][1] > kept[1][1]  # tie: the earlier sample ranks first
    rgb = grid.render()
    assert rgb.shape[1] == 2 * (2 * 16 + 2) + 12 and rgb.dtype == np.uint8
    assert Image.open(grid.save(str(tmp_path / "p.png"))).size == (rgb.shape[1], rgb.shape[0])
    grid.update("c", image, pred, group="cat")
    written = grid.save(str(tmp_path / "g" / "purity.png"))
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["purity_cat.png", "purity_none.png"]
    assert written == str(tmp_path / "g")


def test_confusion_heat_map(tmp_path):
    table = np.array([[0, 0, 0], [0, 8, 2], [0, 1, 5]])
    path = viz.save_confusion(str(tmp_path / "c.png"), table)
    assert Image.open(path).format == "PNG"
    with pytest.raises(PartkitError, match="nothing to draw in the confusion map"):
        viz.save_confusion(str(tmp_path / "e.png"), np.zeros((2, 2)))


def _shard(shard_factory, n=3):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        gt = np.zeros((20, 24), np.uint8)
        gt[4:16, 5:19] = rng.integers(1, 4, (12, 14))
        pred = np.where(gt > 0, gt % 3 + 1, 0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"v{i}", "png": buf.getvalue(), "gt_parts.png": encode_png(gt),
                        "parts.png": encode_png(pred)})
    return shard_factory(samples)


def test_show_commands_write_files_not_stdout(shard_factory, tmp_path):
    shard = _shard(shard_factory)
    result = runner.invoke(app, ["show", "overlays", shard, "-o", str(tmp_path / "ov"), "--max", "2"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["v0.png", "v1.png"]
    assert Image.open(tmp_path / "ov" / "v0.png").size == (3 * 24 + 12, 20 + 20)
    for view in ("purity", "confusion"):
        out = tmp_path / f"{view}.png"
        result = runner.invoke(app, ["show", view, shard, "-o", str(out)])
        assert result.exit_code == 0 and result.stdout == "" and Image.open(out).format == "PNG", result.stderr
    result = runner.invoke(app, ["show", "confusion", shard, "--gt-field", "nope.png", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "has no 'nope.png' field" in result.stderr
    result = runner.invoke(app, ["show", "purity", shard, "--pred", "gt_parts.png", "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 0  # any label-map field can be drawn


def test_eval_viz_draws_everything(shard_factory, tmp_path):
    result = runner.invoke(app, ["eval", "nmi", _shard(shard_factory), "--viz", str(tmp_path / "viz")])
    assert result.exit_code == 0, result.stderr
    pictures = json.loads(result.stdout)["pictures"]
    assert set(pictures) == {"overlays", "purity", "confusion"}
    assert len(list((tmp_path / "viz" / "overlays").iterdir())) == 3
    assert (tmp_path / "viz" / "purity.png").exists() and (tmp_path / "viz" / "confusion.png").exists()


def test_label_colors_and_titled_panels():
    assert viz.label_colors(np.array([0, 1, -1])).tolist() == [viz.palette(2)[1].tolist(), viz.palette(3)[2].tolist(),
                                                               [200, 200, 200]]
    rgb = np.zeros((5, 30, 3), np.uint8)
    out = viz.titled(rgb, "t", bar=18, font_size=None)
    assert out.shape == (23, 30, 3) and (out[18:] == 0).all() and (out[:18] < 255).any()


def test_pictures_write_only_the_views_asked_for(shard_factory, tmp_path):
    from partkit.evaluate import render
    from partkit.show import VIEWS, view_paths

    paths = view_paths(str(tmp_path / "v"))
    assert set(paths) == set(VIEWS) and paths["overlays"].endswith("overlays")
    files = render([_shard(shard_factory)], "overlays", str(tmp_path / "ov"), viz_max=1)
    assert files == {"overlays": str(tmp_path / "ov")} and [p.name for p in (tmp_path / "ov").iterdir()] == ["v0.png"]
    with pytest.raises(PartkitError, match="view must be one of"):
        render([_shard(shard_factory)], "nope", str(tmp_path / "x"))
