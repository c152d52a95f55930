"""The cluster stage: every scope and option, on synthetic feat.npy with known parts."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import read_shard, tar_names
from partkit.cluster import ClusterConfig, cluster
from partkit.errors import BadSample, PartkitError
from partkit.grid import grid_to_image
from partkit.io import Output

runner = CliRunner()
C, GH, GW, S = 12, 8, 8, 8  # channels, grid, stride: an 8x8 grid over a 64x64 image
META = {"grid": [GH, GW], "stride": S, "image_size": [GH * S, GW * S], "resized": [GH * S, GW * S],
        "channels": C, "model": "synthetic", "kind": "hypercolumn"}
# Three regions: background (columns 0-1), an object's top (rows 0-3) and bottom (rows 4-7).
LAYOUT = np.zeros((GH, GW), np.int64)
LAYOUT[:4, 2:] = 1
LAYOUT[4:, 2:] = 2


def features(layout, protos, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    f = protos[layout] + rng.normal(size=layout.shape + (protos.shape[1],)) * noise
    return np.ascontiguousarray(f.transpose(2, 0, 1)).astype(np.float16)


PROTOS = np.random.default_rng(0).normal(size=(6, C))


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rle(mask):
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def sample(key, seed=0, layout=LAYOUT, protos=PROTOS, category=None, **extra):
    s = {"__key__": key, "feat.npy": features(layout, protos, seed), "feat.json": json.dumps(META).encode()}
    if category is not None:
        s["json"] = json.dumps({"category": category}).encode()
    s.update(extra)
    return s


def up(grid):
    return np.kron(grid, np.ones((S, S), grid.dtype))


def gt_parts():
    lab = up(LAYOUT.astype(np.uint8))
    lab[0, :] = 255  # ignore pixels are not foreground
    return png(lab)


def invoke(args, input=None):
    result = runner.invoke(app, args, input=input)
    return result


def run_cli(args, input=None):
    result = invoke(args, input)
    assert result.exit_code == 0, result.stderr
    return read_shard(result.stdout_bytes)


def parts(s):
    return np.array(Image.open(io.BytesIO(s["parts.png"]))), json.loads(s["parts.json"])


def same_partition(a, b):
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(set(a.ravel().tolist())) == len(set(b.ravel().tolist()))


# ---------------------------------------------------------------------------------------------
# scope image


def test_image_scope_recovers_regions_orders_ids_and_records_geometry(shard_factory):
    path = shard_factory([sample("a", 0), sample("b", 1)])
    result = invoke(["cluster", path, "-k", "3"])
    assert result.exit_code == 0, result.stderr
    assert tar_names(result.stdout_bytes)[0].startswith("a.")  # stdout is a plain tar
    out = read_shard(result.stdout_bytes)
    for s in out:
        lab, rec = parts(s)
        assert lab.shape == (GH, GW) and lab.dtype == np.uint8
        assert same_partition(lab, LAYOUT)
        sizes = rec["objects"][0]["sizes"]
        assert rec["objects"][0]["parts"] == [1, 2, 3] and sizes == sorted(sizes, reverse=True)
        assert rec["scope"] == "image" and rec["k"] == 3 and rec["metric"] == "cosine" and rec["seed"] == 0
        assert rec["resolution"] == "grid" and rec["grid"] == [GH, GW] and rec["stride"] == S
        assert rec["image_size"] == META["image_size"] and rec["resized"] == META["resized"]
        assert rec["num_parts"] == 3 and rec["iterations"] >= 1 and rec["inertia"] >= 0
        assert "feat.npy" in s and "feat.json" in s  # input fields pass through


def test_same_input_gives_byte_identical_output_whatever_the_batch(shard_factory):
    path = shard_factory([sample(f"s{i}", i) for i in range(5)])
    a = invoke(["cluster", path, "-k", "4", "--batch-size", "1"]).stdout_bytes
    b = invoke(["cluster", path, "-k", "4", "--batch-size", "3"]).stdout_bytes
    c = invoke(["--seed", "0", "cluster", path, "-k", "4"]).stdout_bytes
    assert a == b == c and len(a) > 0
    d = invoke(["cluster", path, "-k", "4", "--seed", "7"]).stdout_bytes
    assert json.loads(read_shard(d)[0]["parts.json"])["seed"] == 7


def test_upsample_image_matches_grid_to_image(shard_factory):
    path = shard_factory([sample("a")])
    grid_out = run_cli(["cluster", path, "-k", "3"])[0]
    img_out = run_cli(["cluster", path, "-k", "3", "--upsample", "image"])[0]
    g, _ = parts(grid_out)
    im, rec = parts(img_out)
    assert rec["resolution"] == "image" and "stride" not in rec and im.shape == tuple(META["image_size"])
    np.testing.assert_array_equal(im, grid_to_image(g, META))


def test_k_auto_uses_the_elbow_and_l2_metric(shard_factory):
    path = shard_factory([sample("a")])
    lab, rec = parts(run_cli(["cluster", path, "-k", "auto", "--k-max", "6", "--metric", "l2"])[0])
    assert rec["objects"][0]["k"] == 3 and same_partition(lab, LAYOUT)
    assert rec["k"] == "auto" and rec["elbow"] == {"fraction": 0.975, "k_range": [2, 6]} and rec["metric"] == "l2"


def test_random_init_iters_and_tol_are_recorded(shard_factory):
    path = shard_factory([sample("a")])
    _, rec = parts(run_cli(["cluster", path, "-k", "3", "--init", "random", "--iters", "1", "--tol", "0"])[0])
    assert rec["init"] == "random" and rec["max_iter"] == 1 and rec["tol"] == 0 and rec["iterations"] == 1


def test_min_area_merges_or_drops_small_parts(shard_factory):
    layout = LAYOUT.copy()
    layout[0, 0] = 3  # a one-cell part
    path = shard_factory([sample("a", layout=layout)])
    lab, rec = parts(run_cli(["cluster", path, "-k", "4"])[0])
    assert rec["num_parts"] == 4
    lab, rec = parts(run_cli(["cluster", path, "-k", "4", "--min-area", "2"])[0])
    assert rec["num_parts"] == 3 and rec["objects"][0]["small_parts_merged"] == 1 and (lab > 0).all()
    lab, rec = parts(run_cli(["cluster", path, "-k", "4", "--min-area", "0.05", "--min-area-action", "drop"])[0])
    assert rec["num_parts"] == 3 and lab[0, 0] == 0 and (lab > 0).sum() == GH * GW - 1
    assert rec["min_area_action"] == "drop"


# ---------------------------------------------------------------------------------------------
# warm starts


def test_warm_start_from_centroids_pins_ids(shard_factory, tmp_path):
    cents = np.stack([PROTOS[j] / np.linalg.norm(PROTOS[j]) for j in (2, 0, 1)]).astype(np.float32)
    np.save(tmp_path / "c.npy", cents)
    path = shard_factory([sample("a")])
    lab, rec = parts(run_cli(["cluster", path, "--warm-start", str(tmp_path / "c.npy")])[0])
    # centroid j -> part j+1: region 0 is near centroid 1, region 1 near centroid 2, region 2 near centroid 0
    np.testing.assert_array_equal(lab, np.array([2, 3, 1])[LAYOUT])
    assert rec["warm_start"] == "c.npy" and rec["k"] == 3
    result = invoke(["cluster", path, "--warm-start", str(tmp_path / "c.npy"), "-k", "5"])
    assert result.exit_code == 2 and "3 centroids but -k is 5" in result.stderr


def test_warm_start_parts_continues_the_previous_partition(shard_factory):
    first = run_cli(["cluster", shard_factory([sample("a", 0)]), "-k", "3"])[0]
    prev, _ = parts(first)
    # next round: new features for the same image, but the ids carry over from parts.png
    nxt = sample("a", 5, **{"parts.png": first["parts.png"], "parts.json": first["parts.json"]})
    lab, rec = parts(run_cli(["cluster", shard_factory([nxt]), "--warm-start", "parts", "-k", "3"])[0])
    np.testing.assert_array_equal(lab, prev)
    assert rec["warm_start"] == "parts"


# ---------------------------------------------------------------------------------------------
# scope object


def objects_json(*masks, crowd=()):
    objs = [{"id": i + 1, "category": "thing", "iscrowd": int(i in crowd), "segmentation": rle(m),
             "bbox": [0, 0, 1, 1], "area": int(m.sum())} for i, m in enumerate(masks)]
    return json.dumps({"objects": objs}).encode()


def test_object_scope_numbers_parts_across_objects(shard_factory):
    H, W = META["image_size"]
    big = np.zeros((H, W), bool)
    big[:, 2 * S:] = True  # the two-part object (regions 1 and 2)
    small = np.zeros((H, W), bool)
    small[: 2 * S, : S] = True  # two cells of background
    tiny = np.zeros((H, W), bool)
    tiny[S + 2:S + 4, S + 2:S + 4] = True  # smaller than one cell
    empty = np.zeros((H, W), bool)
    crowd = np.zeros((H, W), bool)
    crowd[6 * S:, :S] = True
    s = sample("a", **{"gt_objects.json": objects_json(big, small, tiny, empty, crowd, crowd=(4,))})
    lab, rec = parts(run_cli(["cluster", shard_factory([s]), "--scope", "object", "-k", "2"])[0])
    objs = rec["objects"]
    assert [o["id"] for o in objs] == [1, 2, 3, 4, 5] and rec["fg_from"] == "gt_objects" and rec["coverage"] == 0.5
    assert objs[0]["parts"] == [1, 2] and objs[0]["cells"] == 48 and same_partition(lab[:, 2:], LAYOUT[:, 2:])
    assert objs[1]["parts"] == [3, 4] and objs[1]["cells"] == 2 and set(lab[:2, 0]) == {3, 4}
    assert objs[2]["cells"] == 1 and objs[2]["k"] == 1 and objs[2]["parts"] == [5] and lab[1, 1] == 5
    assert "k reduced" in objs[2]["note"] and "best cell" in objs[2]["note"]
    assert objs[3]["cells"] == 0 and objs[3]["parts"] == [] and objs[3]["note"] == "empty mask"
    assert objs[4]["parts"] == [] and "crowd" in objs[4]["note"]
    assert (lab[2:, :2] == 0).all() and lab[0, 1] == 0  # cells outside every object are background


def test_object_scope_from_gt_parts_and_saliency(shard_factory):
    sal = (LAYOUT > 0).astype(np.float16) * 0.5
    s = sample("a", **{"gt_parts.png": gt_parts(), "saliency.npy": sal})
    path = shard_factory([s])
    lab, rec = parts(run_cli(["cluster", path, "--scope", "object", "--fg-from", "gt_parts", "-k", "2"])[0])
    assert (lab[:, :2] == 0).all() and same_partition(lab[:, 2:], LAYOUT[:, 2:]) and rec["objects"][0]["cells"] == 48
    lab2, rec = parts(run_cli(["cluster", path, "--scope", "object", "--fg-from", "saliency", "-k", "2",
                               "--fg-threshold", "0.3"])[0])
    np.testing.assert_array_equal(lab2, lab)
    assert rec["fg_threshold"] == 0.3
    lab3, _ = parts(run_cli(["cluster", path, "--scope", "object", "--fg-from", "saliency", "-k", "2",
                             "--fg-threshold", "0.6"])[0])
    assert (lab3 == 0).all()  # nothing is salient enough


def test_coverage_decides_which_partly_covered_cells_belong_to_the_mask(shard_factory):
    lab = up(LAYOUT.astype(np.uint8))
    lab[:, S + 3:2 * S] = 1  # column 1 of cells is 5/8 covered
    path = shard_factory([sample("a", **{"gt_parts.png": png(lab)})])
    args = ["--device", "cpu", "cluster", path, "--scope", "object", "--fg-from", "gt_parts", "-k", "2"]
    _, rec = parts(run_cli(args)[0])
    assert rec["objects"][0]["cells"] == 56
    _, rec = parts(run_cli(args + ["--coverage", "0.9"])[0])
    assert rec["objects"][0]["cells"] == 48 and rec["coverage"] == 0.9


# ---------------------------------------------------------------------------------------------
# scope dataset


def dataset_samples():
    # the object's halves swap places between images: global ids must follow the features
    flipped = LAYOUT.copy()
    flipped[:4, 2:], flipped[4:, 2:] = 2, 1
    return [sample("a", 0), sample("b", 1, layout=flipped), sample("c", 2)]


def test_dataset_scope_gives_global_ids_and_reuses_centroids(shard_factory, tmp_path):
    path = shard_factory(dataset_samples())
    cents = tmp_path / "cents.npy"
    out = run_cli(["cluster", path, "--scope", "dataset", "-k", "3", "--save-centroids", str(cents)])
    labs = [parts(s)[0] for s in out]
    rec = parts(out[0])[1]
    for lab in labs:
        assert same_partition(lab, LAYOUT)
    assert labs[0][0, 5] == labs[1][7, 5] and labs[0][7, 5] == labs[1][0, 5]  # same feature, same id
    assert rec["faiss"]["seed"] == 0 and rec["faiss"]["max_points_per_centroid"] == 256
    assert rec["faiss"]["verbose"] is False and rec["faiss"]["init"] == "k-means++" and rec["max_iter"] == 25
    assert np.load(cents).shape == (3, C)
    # reuse: assign only, same labels
    again = run_cli(["cluster", path, "--scope", "dataset", "--centroids", str(cents)])
    for s, t in zip(out, again):
        np.testing.assert_array_equal(parts(s)[0], parts(t)[0])
    assert parts(again[0])[1]["centroids"] == "cents.npy" and parts(again[0])[1]["k"] == 3


def test_dataset_scope_reads_stdin_twice_and_fits_on_a_subset(shard_factory):
    path = shard_factory(dataset_samples())
    with open(path, "rb") as f:
        data = f.read()
    from_file = run_cli(["cluster", path, "--scope", "dataset", "-k", "3"])
    result = invoke(["cluster", "-", "--scope", "dataset", "-k", "3"], input=data)
    assert result.exit_code == 0, result.stderr
    assert "buffered" in result.stderr
    for s, t in zip(from_file, read_shard(result.stdout_bytes)):
        np.testing.assert_array_equal(parts(s)[0], parts(t)[0])
    fit = shard_factory([sample("a", 0)])
    sub = run_cli(["cluster", path, "--scope", "dataset", "-k", "3", "--fit-on", fit, "--max-points-per-centroid", "4"])
    assert parts(sub[0])[1]["faiss"]["fit_samples"] == 1 and parts(sub[0])[1]["faiss"]["trained_on"] == 12
    assert same_partition(parts(sub[1])[0], LAYOUT)


def test_dataset_scope_with_warm_start_and_foreground(shard_factory, tmp_path):
    s = [dict(x, **{"gt_parts.png": gt_parts()}) for x in dataset_samples()]
    path = shard_factory(s)
    out = run_cli(["cluster", path, "--scope", "dataset", "-k", "2", "--fg-from", "gt_parts"])
    lab, rec = parts(out[0])
    assert (lab[:, :2] == 0).all() and set(np.unique(lab[:, 2:])) == {1, 2}
    cents = np.stack([PROTOS[j] / np.linalg.norm(PROTOS[j]) for j in (0, 1, 2)]).astype(np.float32)
    np.save(tmp_path / "w.npy", cents)
    lab, rec = parts(run_cli(["cluster", path, "--scope", "dataset", "--warm-start", str(tmp_path / "w.npy")])[0])
    assert rec["faiss"]["init"] == "warm-start" and same_partition(lab, LAYOUT)


# ---------------------------------------------------------------------------------------------
# scope cosegment


def test_cosegment_shares_parts_within_a_category(shard_factory):
    sal = (LAYOUT > 0).astype(np.float16)
    other = np.random.default_rng(1).normal(size=(6, C))  # a different category looks different
    samples = [sample(f"cat{i}", i, category="cat", **{"saliency.npy": sal}) for i in range(3)]
    samples += [sample(f"dog{i}", i, protos=other, category="dog", **{"saliency.npy": sal}) for i in range(2)]
    out = run_cli(["cluster", shard_factory(samples), "--scope", "cosegment", "-k", "2", "--k-max", "4"])
    labs = {s["__key__"]: parts(s)[0] for s in out}
    recs = {s["__key__"]: parts(s)[1] for s in out}
    for key, lab in labs.items():
        assert (lab[:, :2] == 0).all(), key  # the background cluster lost the saliency vote
        assert same_partition(lab[:, 2:], LAYOUT[:, 2:]), key
    assert (labs["cat0"] == labs["cat2"]).all() and (labs["dog0"] == labs["dog1"]).all()
    assert recs["cat0"]["group"] == "cat" and recs["cat0"]["group_size"] == 3 and recs["dog1"]["group_size"] == 2
    assert recs["cat0"]["fg_clusters"] >= 1 and recs["cat0"]["fg_votes_needed"] == 3
    one = run_cli(["cluster", shard_factory(samples), "--scope", "cosegment", "-k", "4", "--group-by", "none",
                   "--k-max", "4"])
    assert {parts(s)[1]["group"] for s in one} == {"all"} and parts(one[0])[1]["group_size"] == 5


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_features_say_to_run_extract(shard_factory):
    path = shard_factory([{"__key__": "a", "jpg": b"x"}])
    result = invoke(["cluster", path])
    assert result.exit_code == 2 and "partkit extract" in result.stderr and "'a'" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


def test_nan_features_are_a_bad_sample_that_skip_bad_skips(shard_factory):
    bad = sample("bad")
    f = features(LAYOUT, PROTOS, 0)
    f[0, 0, 0] = np.nan
    bad["feat.npy"] = f
    path = shard_factory([sample("good"), bad])
    result = invoke(["cluster", path, "-k", "3"])
    assert result.exit_code == 2 and "'bad'" in result.stderr and "NaN" in result.stderr
    out = run_cli(["cluster", path, "-k", "3", "--skip-bad"])
    assert [s["__key__"] for s in out] == ["good"]


@pytest.mark.parametrize("args, message", [
    (["--scope", "part"], "unknown --scope 'part'; choose one of: image, object, dataset, cosegment"),
    (["-k", "many"], "-k must be a positive integer or 'auto'"),
    (["-k", "0"], "-k must be a positive integer"),
    (["--metric", "dot"], "choose one of: cosine, l2"),
    (["--fg-from", "gt_parts"], "does not apply to --scope image"),
    (["--scope", "object", "--fg-from", "masks"], "choose one of: gt_objects, gt_parts, saliency"),
    (["--scope", "dataset", "-k", "auto"], "give --scope dataset a number"),
    (["--centroids", "c.npy"], "applies to --scope dataset only"),
    (["--scope", "dataset", "--centroids", "nope.npy"], "does not exist"),
    (["--upsample", "x4"], "choose one of: grid, image"),
    (["--coverage", "0"], "--coverage must be in (0, 1]"),
])
def test_option_errors_name_the_fix(shard_factory, args, message):
    path = shard_factory([sample("a")])
    result = invoke(["cluster", path, *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert result.stdout_bytes == b""


def test_library_function_and_folder_output(shard_factory, tmp_path):
    path = shard_factory([sample("a"), sample("b", 1)])
    totals = cluster([path], output=Output(str(tmp_path / "out")), k=3)
    assert totals["written"] == 2
    assert len(read_shard(tmp_path / "out" / "000000.tar")) == 2
    with pytest.raises(PartkitError, match="does not exist"):
        cluster([str(tmp_path / "missing.tar")], output=Output(str(tmp_path / "o2")))
    with pytest.raises(BadSample):
        cluster([shard_factory([{"__key__": "x", "feat.json": b"{}", "feat.npy": np.zeros((2, 3))}])],
                output=Output(str(tmp_path / "o3")))


@pytest.mark.parametrize("options, args", [
    (dict(scope="part"), ["--scope", "part"]),
    (dict(k="many"), ["-k", "many"]),
    (dict(fg_from="gt_parts"), ["--fg-from", "gt_parts"]),
    (dict(scope="dataset", k="auto"), ["--scope", "dataset", "-k", "auto"]),
    (dict(coverage=0.0), ["--coverage", "0"]),  # the CLI passes a float
    (dict(centroids="c.npy"), ["--centroids", "c.npy"]),
    (dict(scope="cosegment", warm_start="parts"), ["--scope", "cosegment", "--warm-start", "parts"]),
])
def test_config_validate_refuses_a_bad_option_with_the_cli_message(shard_factory, options, args):
    with pytest.raises(PartkitError) as refused:
        ClusterConfig(**options).validate()
    result = invoke(["cluster", shard_factory([sample("a")]), *args])
    assert result.exit_code == 2 and f"error: {refused.value}\n" in result.stderr, result.stderr


def test_config_validate_fills_the_scope_defaults_once():
    cfg = ClusterConfig(scope="dataset", k="8", group_by="none", seed="3").validate()
    assert (cfg.k, cfg.max_iter, cfg.fg_from, cfg.group_by, cfg.seed) == (8, 25, None, None, 3)
    assert cfg.validate() == cfg
    assert ClusterConfig(scope="object").validate().fg_from == "gt_objects"
    cfg = ClusterConfig(scope="cosegment").validate()
    assert (cfg.k, cfg.max_iter, cfg.fg_from, cfg.group_by) == (4, 100, "saliency", "category")


def test_library_takes_a_config_or_keywords(shard_factory, tmp_path):
    path = shard_factory([sample("a"), sample("b", 1)])
    cluster([path], ClusterConfig(k=3, seed=1), output=Output(str(tmp_path / "config")))
    cluster([path], ClusterConfig(k=5), output=Output(str(tmp_path / "override")), seed=1, k=3)
    cluster([path], output=Output(str(tmp_path / "keywords")), k=3, seed=1)
    shards = [(tmp_path / name / "000000.tar").read_bytes() for name in ("config", "override", "keywords")]
    assert shards[0] == shards[1] == shards[2]
    with pytest.raises(TypeError):
        cluster([path], output=Output(str(tmp_path / "bad")), clusters=3)
