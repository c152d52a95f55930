"""Part names (`part_names` in json, from `pack --label-names` or `--coco-as parts`) reach the eval report,
the stderr table, overlay legends, purity titles and confusion axes; `show -o` writes .png files."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partkit import fields, viz
from partkit.cli.main import app
from partkit.errors import BadSample, PartkitError
from partkit.evaluate import evaluate, render
from partkit.io import encode_png

runner = CliRunner()
NAMES = {"0": "background", "1": "hair", "2": "face"}


def _jpg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key, names=NAMES, shift=0):
    gt = np.zeros((16, 16), np.uint8)
    gt[2:8, 2:14], gt[8:14, 2:14] = 1, 2
    pred = np.zeros((16, 16), np.uint8)
    pred[2:8, 2:14], pred[8:14, 2:14] = 5 + shift, 7 + shift  # arbitrary cluster ids
    meta = {"width": 16, "height": 16, **({"part_names": names} if names is not None else {})}
    return {"__key__": key, "png": _jpg(np.full((16, 16, 3), 120, np.uint8)), "gt_parts.png": encode_png(gt),
            "parts.png": encode_png(pred), "json": json.dumps(meta).encode()}


def test_reader_and_first_name_wins():
    assert fields.part_names(_sample("a")) == {0: "background", 1: "hair", 2: "face"}
    assert fields.part_names(_sample("a", names=None)) == {}
    with pytest.raises(BadSample, match="not a part id"):
        fields.part_names(_sample("a", names={"x": "hair"}))
    with pytest.raises(BadSample, match="not a string"):
        fields.part_names(_sample("a", names={"1": 3}))
    pooled = fields.PartNames()
    assert pooled.add({1: "hair"}, "a") == []
    msgs = pooled.add({1: "head", 2: "face"}, "b")
    assert len(msgs) == 1 and "'hair'" in msgs[0] and "'head'" in msgs[0] and "keeping 'hair'" in msgs[0]
    assert pooled.add({1: "head"}, "c") == []  # reported once per id
    assert pooled.names == {1: "hair", 2: "face"} and pooled.label(2) == "face" and pooled.label(9) == "9"


def test_report_and_table_show_names(shard_factory, tmp_path):
    shard = shard_factory([_sample("a"), _sample("b")])
    report = evaluate([shard], ["nmi", "miou"], miou="pooled")
    assert report["part_names"] == NAMES
    m = report["metrics"]["miou"]
    assert m["part_names"] == {"1": "hair", "2": "face"}
    assert m["named_iou"] == {"hair": 100.0, "face": 100.0}
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "miou", shard, "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "miou per part" in res.stderr and "hair" in res.stderr and "face" in res.stderr
    assert json.loads(out.read_text())["metrics"]["miou"]["named_iou"]["hair"] == 100.0
    plain = shard_factory([_sample("c", names=None)])
    assert "part_names" not in evaluate([plain], ["miou"])["metrics"]["miou"]
    res = runner.invoke(app, ["eval", "miou", plain, "--json", str(out)])
    assert res.exit_code == 0 and "miou per part" not in res.stderr


def test_conflicting_names_warn_and_keep_the_first(shard_factory):
    shard = shard_factory([_sample("a"), _sample("b", names={"1": "head"})])
    res = runner.invoke(app, ["eval", "miou", shard])
    assert res.exit_code == 0, res.output
    assert "warning" in res.stderr and "keeping 'hair'" in res.stderr
    assert json.loads(res.stdout)["part_names"]["1"] == "hair"


def test_pictures_label_parts_by_name(tmp_path, shard_factory):
    gt = np.zeros((6, 6), np.uint8)
    gt[:2], gt[2:4], gt[5, 5] = 1, 2, 255
    assert viz.legend_entries(gt, {1: "hair", 2: "face"}, ignore_id=255) == [(1, "hair"), (2, "face")]
    assert viz.legend_entries(gt, {1: "hair"}, ignore_id=255) == [(1, "hair"), (2, "2")]
    image = np.full((6, 6, 3), 100, np.uint8)
    assert viz.overlay_panel(image, gt, gt, 255, names={1: "hair"}).shape[0] > viz.overlay_panel(image, gt, gt, 255).shape[0]
    table = np.array([[0, 0, 0], [0, 9, 1], [0, 2, 8]])
    ax = viz.confusion_figure(table, names={1: "hair", 2: "face"}).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hair", "face"]
    assert [t.get_text() for t in viz.confusion_figure(table).axes[0].get_xticklabels()] == ["1", "2"]
    # the purity grid titles each cluster by the part most of its pixels fall on
    from partkit.show import Pictures
    shard = shard_factory([_sample("a"), _sample("b")])
    files = render([shard], "purity", str(tmp_path / "p.png"))
    assert files == {"purity": str(tmp_path / "p.png")}
    pics = Pictures({"purity": str(tmp_path / "q.png")})
    from partkit.fields import SampleView
    for key in ("a", "b"):
        v = SampleView(_sample(key))
        pics.names.add(v.part_names, key)
        pics.commit(pics.prepare(v))
    assert pics.cluster_names() == {5: "hair", 7: "face"}
    assert pics.purity.title(None, 5) == "part 5: mostly hair"


def test_show_output_without_extension_gets_png(shard_factory, tmp_path):
    shard = shard_factory([_sample("a")])
    res = runner.invoke(app, ["show", "confusion", shard, "-o", str(tmp_path / "out" / "confusion")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "confusion.png").is_file() and not (tmp_path / "out" / "confusion").exists()
    assert "confusion.png" in res.stderr
    res = runner.invoke(app, ["show", "purity", shard, "-o", str(tmp_path / "pur")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pur.png").is_file()


def test_pack_label_names(tmp_path):
    from partkit.io import Output
    from partkit.pack import pack
    from conftest import read_shard

    (tmp_path / "im").mkdir(), (tmp_path / "lab").mkdir()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(tmp_path / "im" / "x.jpg")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "lab" / "x.png")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "background", "1": "hat"}))
    pack([str(tmp_path / "im")], labels=str(tmp_path / "lab"), label_names=str(names),
         output=Output(str(tmp_path / "out")))
    (s,) = read_shard(next((tmp_path / "out").glob("*.tar")))
    assert json.loads(s["json"])["part_names"] == {"0": "background", "1": "hat"}
    with pytest.raises(PartkitError, match="pass --labels too"):
        pack([str(tmp_path / "im")], label_names=str(names), output=Output(str(tmp_path / "o2")))
    names.write_text(json.dumps(["hat"]))
    with pytest.raises(PartkitError, match="must be an object"):
        pack([str(tmp_path / "im")], labels=str(tmp_path / "lab"), label_names=str(names),
             output=Output(str(tmp_path / "o3")))
