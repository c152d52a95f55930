"""Bad input to every command: one stderr line, non-zero exit, no traceback, no output left behind.

Covers issue 8's list: unreadable shards (truncated, not a tar, empty, missing, field-less),
bad fields (wrong dtype/shape arrays, NaN features, non-images, 1x1 images, a 20,000 x 20,000
header), unknown model names, missing and corrupted checkpoints, conflicting options,
`--skip-bad` counting, stdout closed early, and a killed `--output DIR` run that is rerun.
"""
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import ROOT, read_shard, write_shard

runner = CliRunner()
EXAMPLES = ROOT / "examples" / "data"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# The model options of the tiny pipeline the fixtures build.
DECODER = ["--queries", "4", "--hidden", "16", "--dec-layers", "1", "--batch-size", "2", "--max-steps", "1"]
COMMANDS = {
    "pack": ["pack", "{inp}", "-o", "{out}"],
    "extract": ["extract", "{inp}", "--model", "rgb", "--size", "64", "-o", "{out}"],
    "detect": ["detect", "{inp}", "--weights", "none", "--size", "64", "--max-size", "64", "--rpn-proposals", "20",
               "--max-detections", "2", "-o", "{out}"],
    "cluster": ["cluster", "{inp}", "-k", "2", "-o", "{out}"],
    "train-decoder": ["train-decoder", "{inp}", "--out", "{out}", *DECODER],
    "predict": ["predict", "{inp}", "--checkpoint", "{run}", "-o", "{out}"],
    "self-train": ["self-train", "{inp}", "--teacher", "{run}", "--out", "{out}", "--max-steps", "1",
                   "--batch-size", "2", "--score-threshold", "0"],
    "rank fit": ["rank", "fit", "{inp}", "--model-out", "{out}/rank.npz", "-k", "2", "--objects-from", "gt_parts",
                 "--default-class", "person", "--score-threshold", "0", "--min-area", "0"],
    "rank apply": ["rank", "apply", "{inp}", "--model", "{rank}", "-o", "{out}"],
    "eval": ["eval", "nmi", "ari", "{inp}"],
    "show overlays": ["show", "overlays", "{inp}", "-o", "{out}"],
    "distill-3d": ["distill-3d", "{inp}", "--weights", "none", "--size", "32", "--epochs", "1", "--points", "64",
                   "--knn", "4", "--width", "8", "--depth", "1", "-k", "2", "--elevations", "30", "--azimuths",
                   "0,180", "--out", "{out}/run", "-o", "{out}/preds"],
}
SHARD_COMMANDS = sorted(c for c in COMMANDS if c != "pack")


def invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(res, *needles):
    assert res.exit_code not in (0, None), (res.stdout, res.stderr)
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an unhandled exception
    err = res.stderr.strip()
    assert err, "no error message"
    assert err.splitlines()[-1].startswith("partkit: error:"), err
    assert len([line for line in err.splitlines() if line.startswith("partkit: error:")]) == 1, err
    assert "Traceback" not in err
    for needle in needles:  # a string, or a tuple of alternatives
        alternatives = needle if isinstance(needle, tuple) else (needle,)
        assert any(a.lower() in err.lower() for a in alternatives), err
    return err


def assert_nothing_written(out):
    """No shard, stats, checkpoint or picture under ``out`` (an empty folder is fine)."""
    if out.exists():
        left = [p.name for p in out.rglob("*") if p.is_file()]
        assert not left, f"partial output left behind: {left}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Valid shards of every stage (2 CIHP images at 64 px, 5 ShapeNetPart caps), built with the CLI."""
    tmp = tmp_path_factory.mktemp("base")
    images = [EXAMPLES / "cihp" / "images" / f"{k}.jpg" for k in ("0002190", "0005008")]
    steps = [
        ["pack", *images, "--labels", EXAMPLES / "cihp" / "labels", "-o", tmp / "img"],
        ["extract", tmp / "img" / "000000.tar", "--model", "rgb", "--size", "64", "-o", tmp / "feat"],
        ["cluster", tmp / "feat" / "000000.tar", "-k", "2", "-o", tmp / "parts"],
        ["train-decoder", tmp / "parts" / "000000.tar", "--out", tmp / "run", *DECODER],
        ["predict", tmp / "feat" / "000000.tar", "-c", tmp / "run", "-o", tmp / "pred"],
        ["rank", *COMMANDS["rank fit"][1:2], tmp / "pred" / "000000.tar", *COMMANDS["rank fit"][3:4],
         tmp / "rank.npz", *COMMANDS["rank fit"][5:]],
        ["pack", EXAMPLES / "shapenetpart" / "cap_val.npz", "-o", tmp / "pts"],
    ]
    for args in steps:
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    shards = {name: tmp / name / "000000.tar" for name in ("img", "feat", "parts", "pred", "pts")}
    pts3d = read_shard(shards["pts"])  # eval miou-3d input: predictions = the ground truth
    for s in pts3d:
        s["pred_parts.npy"] = s["gt_parts.npy"]
    shards["pts3d"] = write_shard(tmp / "pts3d.tar", [_strip(s) for s in pts3d])
    return {"dir": tmp, "run": tmp / "run", "rank": tmp / "rank.npz", **shards}


def _strip(sample):
    return {k: v for k, v in sample.items() if k != "__url__"}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    good = write_shard(tmp / "good.tar", [{"__key__": f"k{i}", "txt": b"x" * 3000} for i in range(4)])
    data = open(good, "rb").read()
    (tmp / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp / "notatar.tar").write_bytes(b"\x89PNG this is not a tar archive" * 100)
    write_shard(tmp / "empty.tar", [])
    (tmp / "nofield.tar").write_bytes(data)  # samples without the fields any stage needs
    return tmp


def _format(cmd, base, inp, out):
    return [str(a).format(inp=inp, out=out, run=base["run"], rank=base["rank"]) for a in cmd]


# --------------------------------------------------------------------------- unreadable shards
@pytest.mark.parametrize("case", ["truncated.tar", "notatar.tar", "empty.tar", "nofield.tar", "missing.tar"])
@pytest.mark.parametrize("command", SHARD_COMMANDS)
def test_bad_shard_fails_cleanly(base, bad_shards, command, case):
    out = bad_shards / f"out_{command}_{case}".replace(" ", "_")
    res = invoke(_format(COMMANDS[command], base, bad_shards / case, out))
    assert_clean_failure(res)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- bad fields
def _png_header(w, h):
    """A PNG whose header claims w x h RGB pixels (no pixel data: decoding it would allocate w*h*3 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _image(w, h, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=fmt)
    return buf.getvalue()


def mutate(field, kind, value):
    """The bytes of ``field`` made bad in one way."""
    if kind == "not-an-image":
        return b"this is not an image, just text " * 20
    if kind == "1x1":
        return _image(1, 1) if field in ("jpg", "png") else _image(1, 1, "L", "PNG")
    if kind == "huge-header":
        return _png_header(20000, 20000)
    if kind == "not-npy":
        return b"\x93NUMPY garbage"
    arr = np.load(io.BytesIO(value))
    if kind == "nan":
        arr = arr.astype(np.float32) if arr.dtype.kind != "f" else arr.copy()
        arr.reshape(-1)[:: max(1, arr.size // 7)] = np.nan
    elif kind == "wrong-dtype":
        arr = np.full(arr.shape, "x", dtype="<U1")
    elif kind == "wrong-shape":
        arr = arr.reshape(-1)[:-1] if arr.ndim > 1 else arr.reshape(1, -1, 1)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


IMAGE_KINDS = ["not-an-image", "1x1", "huge-header"]
ARRAY_KINDS = ["nan", "wrong-dtype", "wrong-shape", "not-npy"]
# (command, extra options, base shard, field, kinds)
FIELD_TABLE = [
    ("extract", [], "img", "jpg", IMAGE_KINDS),
    ("detect", [], "img", "jpg", ["not-an-image"]),  # extract's image reader: every kind there
    ("cluster", [], "feat", "feat.npy", ARRAY_KINDS),
    ("cluster", ["--scope", "object", "--fg-from", "gt_parts"], "feat", "gt_parts.png", IMAGE_KINDS),
    ("train-decoder", [], "parts", "feat.npy", ARRAY_KINDS),
    ("train-decoder", [], "parts", "parts.png", IMAGE_KINDS),
    ("predict", [], "feat", "feat.npy", ARRAY_KINDS),
    ("self-train", [], "parts", "feat.npy", ARRAY_KINDS),
    ("rank fit", [], "pred", "proposals.npy", ARRAY_KINDS),
    ("rank apply", [], "pred", "proposals.npy", ARRAY_KINDS),
    ("eval", [], "parts", "parts.png", IMAGE_KINDS),
    ("eval", [], "parts", "gt_parts.png", IMAGE_KINDS),
    ("eval miou-3d", [], "pts3d", "pred_parts.npy", ARRAY_KINDS),
    ("show overlays", [], "parts", "jpg", IMAGE_KINDS),
    ("distill-3d", [], "pts", "points.npy", ARRAY_KINDS),
]
FIELD_CASES = [pytest.param(cmd, opts, shard, field, kind, id=f"{cmd}-{field}-{kind}".replace(" ", "_"))
               for cmd, opts, shard, field, kinds in FIELD_TABLE for kind in kinds]


def _command(cmd):
    if cmd == "eval miou-3d":
        return ["eval", "miou-3d", "{inp}"]
    return COMMANDS[cmd]


def _bad_input(base, tmp_path, shard, field, kind):
    """A shard whose first sample (key 'bad') has ``field`` spoilt; the other samples are good."""
    samples = [_strip(s) for s in read_shard(base[shard])]
    samples[0]["__key__"] = "bad"
    samples[0][field] = mutate(field, kind, samples[0][field])
    return write_shard(tmp_path / "in.tar", samples), len(samples)


@pytest.mark.parametrize("cmd,opts,shard,field,kind", FIELD_CASES)
def test_bad_field_fails_cleanly_or_is_skipped(base, tmp_path, cmd, opts, shard, field, kind):
    inp, n = _bad_input(base, tmp_path, shard, field, kind)
    out = tmp_path / "out"
    args = _format(_command(cmd), base, inp, out) + opts
    assert_clean_failure(invoke(args), "'bad'", field)
    assert_nothing_written(out)
    # --skip-bad goes on with the good samples and counts the bad one
    res = invoke(args + ["--skip-bad"])
    assert res.exit_code == 0, res.stderr
    assert skipped_count(cmd, out, res) == 1


def skipped_count(cmd, out, res):
    """How many samples a --skip-bad run reports as skipped, where the command records it."""
    if cmd in ("eval", "eval miou-3d"):
        return len(json.loads(res.stdout)["skipped"])
    if cmd in ("train-decoder", "self-train"):
        return len(json.loads((out / "config.json").read_text())["skipped_samples"])
    if cmd == "rank fit":
        with np.load(out / "rank.npz") as z:
            return len(json.loads(str(z["meta"]))["skipped"])
    if cmd == "distill-3d":
        return json.loads((out / "preds" / "000000.stats.json").read_text())["skipped"]
    if cmd == "show overlays":
        return int(re.search(r"skipped (\d+) bad sample", res.stderr).group(1))
    return json.loads((out / "000000.stats.json").read_text())["skipped"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_pack_refuses_bad_image_files(tmp_path, kind):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((EXAMPLES / "cihp" / "images" / "0002190.jpg").read_bytes())
    (folder / "bad.jpg").write_bytes(mutate("jpg", kind, None))
    out = tmp_path / "out"
    assert_clean_failure(invoke(["pack", folder, "-o", out]), "bad")
    assert_nothing_written(out)
    res = invoke(["pack", folder, "-o", out, "--skip-bad"])
    assert res.exit_code == 0, res.stderr
    stats = json.loads((out / "000000.stats.json").read_text())
    assert stats["skipped"] == 1 and stats["count"] == 1


# --------------------------------------------------------------------------- models and checkpoints
@pytest.mark.parametrize("args,close", [
    (["extract", "{inp}", "--model", "efficientnet_lite", "-o", "{out}"], "efficientnet_lite0"),
    (["extract", "{inp}", "--model", "timm:resnet5", "-o", "{out}"], "resnet50"),
    (["train-decoder", "{inp}", "--features", "online", "--model", "dino_vit16", "--out", "{out}"], "dino_vits16"),
    (["self-train", "{inp}", "--objective", "part-contrast", "--model", "efficientnet-lite0", "--out", "{out}"],
     "efficientnet_lite0"),
    (["distill-3d", "{inp}", "--teacher-model", "clip_vitb", "--out", "{out}"], "clip_vitb16"),
], ids=["extract", "extract-timm", "train-decoder", "self-train", "distill-3d"])
def test_unknown_model_lists_close_matches(base, tmp_path, args, close):
    inp = base["pts"] if args[0] == "distill-3d" else base["parts"]
    out = tmp_path / "out"
    assert_clean_failure(invoke(_format(args, base, inp, out)), close)
    assert_nothing_written(out)


# (name, command, input shard, kinds, how the bad file is passed: a run folder, its last.pt, a .npz or a .npy)
CHECKPOINT_CASES = [
    ("predict", ["predict", "{inp}", "-c", "{ckpt}", "-o", "{out}"], "feat", ["missing", "garbage", "truncated"], "dir"),
    ("self-train", ["self-train", "{inp}", "--teacher", "{ckpt}", "--out", "{out}"], "parts",
     ["missing", "garbage", "truncated"], "dir"),
    ("train-decoder-resume", ["train-decoder", "{inp}", "--out", "{ckpt}", "--resume", *DECODER], "parts",
     ["missing", "garbage", "truncated"], "dir"),
    ("extract-weights", ["extract", "{inp}", "--model", "efficientnet_lite0", "--weights", "{ckpt}", "-o", "{out}"],
     "img", ["missing", "garbage", "truncated", "decoder"], "pt"),
    ("rank-apply", ["rank", "apply", "{inp}", "--model", "{ckpt}", "-o", "{out}"], "pred",
     ["missing", "garbage", "truncated"], "npz"),
    ("cluster-centroids", ["cluster", "{inp}", "--scope", "dataset", "-k", "2", "--centroids", "{ckpt}", "-o",
                           "{out}"], "feat", ["missing", "garbage", "wrong_shape"], "npy"),
    ("cluster-warm-start", ["cluster", "{inp}", "-k", "2", "--warm-start", "{ckpt}", "-o", "{out}"], "feat",
     ["missing", "garbage", "wrong_shape", "strings"], "npy"),
    ("distill-3d-weights", ["distill-3d", "{inp}", "--weights", "{ckpt}", "--out", "{out}/run", "-o", "{out}/p"],
     "pts", ["missing", "garbage"], "pt"),
]
CORRUPT = ("corrupt", "not a valid", "not a readable", "not a ranking model")
CHECKPOINT_NEEDLES = {"missing": ("not found", "does not exist"), "garbage": CORRUPT, "truncated": CORRUPT,
                      "decoder": "weights", "wrong_shape": "channels", "strings": "expected k x C"}


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory):
    """Bad run folders, weight files, rank models and centroid files (garbage, truncated, wrong shape)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    good = (base["run"] / "last.pt").read_bytes()
    for name, data in (("garbage", b"not a checkpoint" * 64), ("truncated", good[: len(good) // 2]),
                       ("decoder", good)):
        (tmp / name).mkdir()
        (tmp / name / "last.pt").write_bytes(data)
        (tmp / f"{name}.npz").write_bytes(data)
        (tmp / f"{name}.npy").write_bytes(data)
    (tmp / "missing").mkdir()  # a folder without last.pt
    np.save(tmp / "wrong_shape.npy", np.zeros((2, 5), np.float32))  # 5 channels; the features have 3
    np.save(tmp / "strings.npy", np.full((2, 3), "x"))
    return tmp


@pytest.mark.parametrize("name,args,shard,kind,how", [
    pytest.param(name, args, shard, kind, how, id=f"{name}-{kind}")
    for name, args, shard, kinds, how in CHECKPOINT_CASES for kind in kinds])
def test_missing_or_corrupt_checkpoint_fails_cleanly(base, checkpoints, tmp_path, name, args, shard, kind, how):
    ckpt = {"dir": checkpoints / kind, "pt": checkpoints / kind / "last.pt",
            "npz": checkpoints / f"{kind}.npz", "npy": checkpoints / f"{kind}.npy"}[how]
    out = tmp_path / "out"
    before = sorted(p.name for p in ckpt.parent.rglob("*"))
    args = [a.format(inp=base[shard], out=out, ckpt=ckpt) for a in args]
    assert_clean_failure(invoke(args), CHECKPOINT_NEEDLES[kind])
    assert_nothing_written(out)
    assert sorted(p.name for p in ckpt.parent.rglob("*")) == before  # the bad file is left as it was


# --------------------------------------------------------------------------- conflicting options
CONFLICTS = [
    ("extract", ["extract", "{img}", "--model", "efficientnet_lite0", "--facet", "key", "-o", "{out}"], "--facet"),
    ("extract", ["extract", "{img}", "--model", "efficientnet_lite0", "--saliency", "-o", "{out}"], "--saliency"),
    ("extract", ["extract", "{img}", "--num-shards", "2", "--shard-index", "0"], "--output"),
    ("cluster", ["cluster", "{feat}", "--scope", "dataset", "--centroids", "{dir}/c.npy", "--save-centroids",
                 "{out}/c.npy", "-o", "{out}"], "--save-centroids"),
    ("cluster", ["cluster", "{feat}", "--scope", "image", "--centroids", "{dir}/c.npy", "-o", "{out}"],
     "--centroids"),
    ("train-decoder", ["train-decoder", "{parts}", "--features", "cached", "--weights", "x.pt", "--out", "{out}"],
     "--weights"),
    ("predict", ["predict", "{feat}", "-c", "{run}", "--teacher", "-o", "{out}"], "--teacher"),
    ("self-train", ["self-train", "{img}", "--objective", "part-contrast", "--teacher", "{run}", "--out", "{out}"],
     "--teacher"),
    ("rank apply", ["rank", "apply", "{pred}", "--model", "{rank}", "--objects-from", "gt_parts", "--objects-field",
                    "x.json", "-o", "{out}"], "--objects-field"),
    ("eval", ["eval", "miou", "{parts}", "--match", "none", "--match-on", "{parts}"], "--match-on"),
    ("show purity", ["show", "purity", "{parts}", "--per-class", "--pred", "x.png", "-o", "{out}"], "--pred"),
    ("distill-3d", ["distill-3d", "{pts}", "--teacher", "parts", "--parts", "panel,peak", "--out", "{out}"],
     "--parts"),
    ("pack", ["pack", "{ex}/shapenetpart/cap_val.npz", "--labels", "{ex}/cihp/labels", "-o", "{out}"], "--labels"),
]


@pytest.mark.parametrize("args,needle", [pytest.param(a, n, id=f"{c}-{i}") for i, (c, a, n) in enumerate(CONFLICTS)])
def test_conflicting_options_fail_cleanly(base, tmp_path, args, needle):
    out = tmp_path / "out"
    fill = {k: v for k, v in base.items()}
    args = [a.format(out=out, ex=EXAMPLES, **fill) for a in args]
    assert_clean_failure(invoke(args), needle)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- real processes
def _partkit(args, **kw):
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-c", "from partkit.cli.main import main; main()", *map(str, args)],
                            cwd=ROOT, env=ENV, **kw)


HEAD_CASES = {
    "pack": ["pack", "{imgs}"],
    "extract": ["extract", "{big}", "--model", "rgb", "--size", "64", "--batch-size", "2"],
    "cluster": ["cluster", "{big}", "-k", "2", "--batch-size", "2"],
    "predict": ["predict", "{big}", "-c", "{run}", "--batch-size", "2"],
    "rank apply": ["rank", "apply", "{bigpred}", "--model", "{rank}"],
    "distill-3d": ["distill-3d", "{pts}", "--weights", "none", "--size", "32", "--epochs", "1", "--points", "64",
                   "--knn", "4", "--width", "8", "--depth", "1", "-k", "2", "--elevations", "30",
                   "--azimuths", "0,180"],
}


@pytest.fixture(scope="module")
def big_inputs(base, tmp_path_factory):
    """Enough samples that the output overflows a pipe buffer (64 KiB) many times over."""
    tmp = tmp_path_factory.mktemp("big")
    out = {}
    for name in ("parts", "pred"):
        samples = [_strip(s) for s in read_shard(base[name])]
        copies = [{**s, "__key__": f"{s['__key__']}_{i:03d}"} for i in range(20) for s in samples]
        out[name] = write_shard(tmp / f"{name}.tar", copies)
    (tmp / "imgs").mkdir()
    for i, path in enumerate(sorted((EXAMPLES / "cihp" / "images").glob("*.jpg")) * 8):
        (tmp / "imgs" / f"{i:03d}.jpg").write_bytes(path.read_bytes())
    out["imgs"] = tmp / "imgs"
    return out


@pytest.mark.parametrize("command", sorted(HEAD_CASES))
def test_stdout_closed_early(base, big_inputs, command):
    """`partkit ... | head -c 1`: exit non-zero with one line on stderr, no traceback."""
    args = [a.format(imgs=big_inputs["imgs"], big=big_inputs["parts"], bigpred=big_inputs["pred"], run=base["run"],
                     rank=base["rank"], pts=base["pts"]) for a in HEAD_CASES[command]]
    proc = _partkit(args, stdout=subprocess.PIPE)
    assert proc.stdout.read(1)
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("partkit: error:") and "broken pipe" in lines[-1], err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_killed_mid_shard_rerun_matches_uninterrupted(base, tmp_path):
    """SIGKILL while shard 1 is half written; the rerun finishes it and the shards equal a clean run's."""
    from partkit.io import TarSampleWriter

    samples = [_strip(s) for s in read_shard(base["feat"])]
    samples = [{**s, "__key__": f"{s['__key__']}_{i}"} for i in range(8) for s in samples]  # 16 samples
    full = write_shard(tmp_path / "in.tar", samples)
    args = ["cluster", "-k", "2", "--batch-size", "1", "--shard-size", "4"]

    clean = tmp_path / "clean"
    assert invoke(args + [full, "-o", clean]).exit_code == 0

    killed = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = _partkit(args + ["-", "-o", killed], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        writer = TarSampleWriter(proc.stdin)

        def mid_shard_1():
            return (killed / "000000.stats.json").exists() and list(killed.glob(".000001.tar.tmp-*"))

        for i, sample in enumerate(samples):  # feed samples one by one until shard 0 is done and shard 1 is open
            writer.write(sample)
            proc.stdin.flush()
            if i < 5:  # shard 1 cannot open before its first sample (the 5th) is complete: the 6th member ends it
                continue
            deadline = time.time() + 3
            while not mid_shard_1() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            if mid_shard_1():
                break
        assert mid_shard_1() and not (killed / "000001.tar").exists(), (tmp_path / "stderr.txt").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        writer.discard()

    res = invoke(args + [full, "-o", killed])
    assert res.exit_code == 0, res.stderr
    assert "4 already done" in res.stderr
    assert not list(killed.glob(".*tmp*"))
    names = sorted(p.name for p in clean.glob("*.tar"))
    assert names == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    assert names == sorted(p.name for p in killed.glob("*.tar"))
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
