"""`partkit eval --protocol` and `--miou official`: PartDistillation's mIoU, checked against a reference."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from partkit.cli.main import app
from partkit.errors import PartkitError
from partkit.evaluate import PROTOCOLS, evaluate
from partkit.io import encode_json, encode_png

runner = CliRunner()


def _sample(key, gt, pred, category=None):
    s = {"__key__": key, "gt_parts.png": encode_png(np.asarray(gt, np.uint8)),
         "parts.png": encode_png(np.asarray(pred, np.uint8))}
    if category is not None:
        s["json"] = encode_json({"category": category})
    return s


# ------------------------------------------------------------------------ an independent reference
# Written from PartDistillation's miou_matcher.py / miou_evaluator.py in its own layout: parts are
# 0..P-1 and background is index P; the count matrix is indexed [predicted, true].


def _reference(samples, n_parts, n_clusters):
    """samples: (gt, pred, category) with gt in 0..n_parts (0 = background) and pred in 0..n_clusters."""
    bg = n_parts
    counts = {}
    for gt, pred, cat in samples:
        true = np.where(gt == 0, bg, gt.astype(int) - 1).ravel()
        cluster = np.where(pred == 0, -1, pred.astype(int) - 1).ravel()  # -1: nothing predicted
        m = counts.setdefault(cat, np.zeros((n_clusters + 1, n_parts + 1)))  # last cluster row: background
        for c, t in zip(cluster, true):
            m[c if c >= 0 else n_clusters, t] += 1
    out = {}
    for cat, m in counts.items():
        # the matcher: each cluster row, over the part columns only, its largest (first on ties)
        to_part = [int(np.argmax(m[c, :n_parts])) for c in range(n_clusters)]
        conf = np.zeros((n_parts + 1, n_parts + 1))  # [predicted part or bg, true part or bg]
        for c in range(n_clusters + 1):
            row = to_part[c] if c < n_clusters else bg
            conf[row] += m[c]
        ious, accs, iopreds = {}, {}, {}
        present_either = 0
        for p in range(n_parts):
            hit = conf[p, p]
            true_total = conf[:, p].sum()  # every pixel of part p, whatever was predicted there
            pred_total = conf[p, :].sum()  # every pixel predicted p, background ones included
            if true_total + pred_total > 0:
                present_either += 1
            if true_total > 0:
                ious[p + 1] = hit / (true_total + pred_total - hit)
                accs[p + 1] = hit / true_total
            if pred_total > 0:
                iopreds[p + 1] = hit / pred_total
        out[cat] = {"iou": ious, "acc": accs, "iopred": iopreds,
                    "miou": sum(ious.values()) / present_either,  # zeros for predicted-only parts
                    "macc": float(np.mean(list(accs.values()))), "miopred": float(np.mean(list(iopreds.values())))}
    summary = {f"c_{k}": float(np.mean([c[k] for c in out.values()])) for k in ("miou", "macc", "miopred")}
    for k, short in (("iou", "miou"), ("acc", "macc"), ("iopred", "miopred")):
        summary[f"a_{short}"] = float(np.mean([v for c in out.values() for v in c[k].values()]))
    return out, summary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_miou_equals_the_reference(shard_factory, seed):
    rng = np.random.default_rng(seed)
    n_parts, n_clusters = 6, 5
    samples = []
    for i in range(8):
        h, w = rng.integers(8, 20, 2)
        gt = rng.integers(0, n_parts + 1, (h, w))
        gt[rng.random((h, w)) < 0.4] = 0  # plenty of background
        pred = np.where(rng.random((h, w)) < 0.6, np.minimum(gt, n_clusters), rng.integers(0, n_clusters + 1, (h, w)))
        cat = ["cat", "dog", "car"][i % 3]
        if cat == "car":
            gt = np.where(gt > 3, 0, gt)  # a class with fewer parts: some clusters predict parts it lacks
        samples.append((gt, pred, cat))
    ref, summary = _reference(samples, n_parts, n_clusters)
    r = evaluate([shard_factory([_sample(f"s{i}", g, p, c) for i, (g, p, c) in enumerate(samples)])],
                 ["miou"])["metrics"]["miou"]
    assert r["miou"] == "official" and r["classes"] == 3
    for cat, want in ref.items():
        got = r["per_class"][cat]
        for k in ("iou", "acc", "iopred"):
            assert set(got[k]) == {str(p) for p in want[k]}, (cat, k)
            for p, v in want[k].items():
                assert got[k][str(p)] == pytest.approx(100 * v, abs=1e-9), (cat, k, p)
        for k in ("miou", "macc", "miopred"):
            assert got[k] == pytest.approx(100 * want[k], abs=1e-9), (cat, k)
    for k, v in summary.items():
        assert r[k] == pytest.approx(100 * v, abs=1e-9), k
    assert r["value"] == r["c_miou"]


def test_a_part_predicted_on_background_is_charged_for_it(shard_factory):
    # one cluster covers a 10-pixel part and 90 background pixels
    gt = np.zeros((10, 10), np.uint8)
    gt[0] = 1
    pred = np.ones((10, 10), np.uint8)
    shard = shard_factory([_sample("a", gt, pred)])
    official = evaluate([shard], ["miou"], protocol="partdistillation")["metrics"]["miou"]
    assert official["value"] == pytest.approx(10.0) and official["iou"] == {"1": pytest.approx(10.0)}
    assert official["acc"] == {"1": 100.0} and official["mapping"] == {"1": 1}
    fg = evaluate([shard], ["miou"], miou="pooled", region="fg")["metrics"]["miou"]
    assert fg["value"] == 100.0 and fg["miou"] == "pooled"


def test_official_denominator_counts_parts_only_predicted(shard_factory):
    # part 2 is not in the truth of class b; --match none predicts it there: a 0 in b's mIoU
    a = _sample("a", [[1, 1, 2, 2]], [[1, 1, 2, 2]], category="a")
    b = _sample("b", [[1, 1, 0, 0]], [[1, 1, 2, 0]], category="b")
    r = evaluate([shard_factory([a, b])], ["miou"], match="none")["metrics"]["miou"]
    assert r["per_class"]["b"]["miou"] == pytest.approx(50.0)  # IoU 1 for part 1, part 2 predicted only
    assert r["per_class"]["b"]["iou"] == {"1": 100.0} and r["per_class"]["b"]["iopred"] == {"1": 100.0, "2": 0.0}
    assert r["c_miou"] == pytest.approx(75.0) and r["a_miou"] == pytest.approx(100.0)
    assert r["c_miopred"] == pytest.approx(75.0) and r["a_miopred"] == pytest.approx(75.0)  # 1, 1 (a); 1, 0 (b)


def test_matcher_ignores_background_and_breaks_ties_low(shard_factory):
    # cluster 3: 5 background pixels, 1 of part 2, 1 of part 1 -> part 1 (tie, lowest id); cluster 4 only on
    # background -> part 1 (the official argmax of an all-zero row)
    gt = [[0, 0, 0, 0, 0, 2, 1, 0, 2, 2]]
    pred = [[3, 3, 3, 3, 3, 3, 3, 4, 5, 5]]
    r = evaluate([shard_factory([_sample("a", gt, pred)])], ["miou"])["metrics"]["miou"]
    assert r["mapping"] == {"3": 1, "4": 1, "5": 2}
    assert r["iou"] == {"1": pytest.approx(100 / 8), "2": pytest.approx(200 / 3)}


def test_match_none_scores_class_ids_and_names_unknown_ones(shard_factory):
    shard = shard_factory([_sample("a", [[0, 4, 4, 9]], [[0, 4, 9, 9]], category="bird")])
    r = evaluate([shard], ["miou"], match="none")["metrics"]["miou"]
    assert r["iou"] == {"4": 50.0, "9": 50.0} and r["match"] == "none"
    bad = shard_factory([_sample("a", [[0, 4, 4, 9]], [[0, 4, 17, 23]], category="bird")])
    with pytest.raises(PartkitError, match=r"predicted ids 17, 23 are no ground-truth part id \(those are 4, 9\)"):
        evaluate([bad], ["miou"], match="none")


def test_no_part_pixels_is_an_error(shard_factory):
    with pytest.raises(PartkitError, match="no ground-truth part pixels"):
        evaluate([shard_factory([_sample("a", [[0, 0]], [[1, 1]])])], ["miou"])


# ------------------------------------------------------------------------------------ --protocol


def _shard(shard_factory):
    return shard_factory([_sample("a", [[0, 1, 1, 2]], [[1, 1, 1, 2]], category="cat")])


def test_protocol_is_recorded_in_the_report(shard_factory):
    result = runner.invoke(app, ["eval", "miou", _shard(shard_factory), "--protocol", "partdistillation"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    p = report["protocol"]
    assert p["name"] == "partdistillation" and report["options"]["protocol"] == "partdistillation"
    assert p["set"]["miou"] == "official" and p["set"]["match"] == "majority" and p["overridden"] == {}
    assert "miou_evaluator.py" in p["official"]["miou"] and p["explicit"] == {}
    assert report["metrics"]["miou"]["miou"] == "official"


def test_an_explicit_option_overrides_the_preset_and_is_recorded(shard_factory):
    result = runner.invoke(app, ["eval", "miou", _shard(shard_factory), "--protocol", "partdistillation",
                                 "--match", "hungarian", "--region", "fg"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    p = report["protocol"]
    assert p["overridden"] == {"match": {"preset": "majority", "given": "hungarian"}}
    assert p["explicit"] == {"match": "hungarian", "region": "fg"} and "match" not in p["set"]
    assert report["options"]["match"] == "hungarian" and report["metrics"]["miou"]["match"] == "hungarian"
    # the library: keywords are the explicit options
    lib = evaluate([_shard(shard_factory)], ["miou"], protocol="partdistillation", match="none")
    assert lib["protocol"]["overridden"] == {"match": {"preset": "majority", "given": "none"}}


def test_without_protocol_the_defaults_are_partdistillations(shard_factory):
    report = evaluate([_shard(shard_factory)], ["miou"])
    assert report["protocol"] == {"name": None, "explicit": {}}
    assert report["options"]["miou"] == PROTOCOLS["partdistillation"].options["miou"]


def test_unknown_protocol_is_a_one_line_error(shard_factory):
    result = runner.invoke(app, ["eval", "miou", _shard(shard_factory), "--protocol", "cho"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown protocol 'cho'; choose from partdistillation, choudhury, shapenetpart, zhu" \
        in lines[0]
    with pytest.raises(PartkitError, match="choose from partdistillation, choudhury"):
        evaluate(["x.tar"], ["miou"], protocol="cho")


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_preset_sets_valid_options(shard_factory, name):
    from partkit.evaluate import EvalOptions

    o = EvalOptions(protocol=name, given=[])
    o.validate(["miou"])
    for option, value in PROTOCOLS[name].options.items():
        assert getattr(o, option) == value


def test_every_preset_option_exists_and_the_papers_settings_are_wired():
    from dataclasses import fields as dc_fields

    from partkit.evaluate import PROTOCOLS, EvalOptions

    names = {f.name for f in dc_fields(EvalOptions)}
    for p in PROTOCOLS.values():
        assert set(p.options) <= names, (p.name, set(p.options) - names)
        assert not p.pending, (p.name, p.pending)
    assert PROTOCOLS["partdistillation"].options["average"] == "class"  # Tab. 2: NMI averaged over classes
    assert PROTOCOLS["choudhury"].options["average"] == "pooled"
    assert PROTOCOLS["zhu"].options["retrieval_features"] == "patches"
    assert PROTOCOLS["zhu"].options["exclude_self"] is True  # "all the other patches"
