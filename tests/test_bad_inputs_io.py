"""Hostile input (issue 14): no command runs what a file name says, writes outside its output, or silently
loses samples.

Each test builds its hostile input and checks the exit status, exactly one `partkit: error:` line naming the
sample or file and the fix, no traceback, nothing written outside the named output and nothing left under a
final name; the security cases also check that no shell command ran and no file appeared outside the output.
"""
import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import ROOT, read_shard, write_shard

runner = CliRunner()
EXAMPLES = ROOT / "examples" / "data"
IMAGES = [EXAMPLES / "cihp" / "images" / f"{k}.jpg" for k in ("0002190", "0005008")]


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def assert_clean_failure(res, *needles, code=2):
    assert res.exit_code == code, (res.exit_code, res.stdout_bytes[:200], res.stderr)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr.strip()
    lines = [line for line in err.splitlines() if line.startswith("partkit: error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    for needle in needles:  # a string, or a tuple of alternatives
        alternatives = needle if isinstance(needle, tuple) else (needle,)
        assert any(a.lower() in lines[0].lower() for a in alternatives), (needle, lines[0])
    return lines[0]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_nothing_written(out):
    assert files_under(out) == [], f"output left behind: {files_under(out)}"


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _strip(sample):
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two CIHP images at 64 px: packed, features (rgb), parts; and 5 ShapeNetPart caps."""
    tmp = tmp_path_factory.mktemp("base")
    steps = [
        ["pack", *IMAGES, "--labels", EXAMPLES / "cihp" / "labels", "-o", tmp / "img"],
        ["extract", tmp / "img" / "000000.tar", "--model", "rgb", "--size", "64", "-o", tmp / "feat"],
        ["cluster", tmp / "feat" / "000000.tar", "-k", "2", "-o", tmp / "parts"],
        ["pack", EXAMPLES / "shapenetpart" / "cap_val.npz", "-o", tmp / "pts", "--points-per-shape", "64"],
    ]
    for args in steps:
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    shards = {name: tmp / name / "000000.tar" for name in ("img", "feat", "parts", "pts")}
    shards["dir"] = tmp
    return shards


def samples_of(path):
    return [_strip(s) for s in read_shard(path)]


def raw_tar(path, members):
    """A tar of ``[(name, bytes | TarInfo-kwargs)]`` written member by member (names are not checked)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, dict):
                for k, v in data.items():
                    setattr(info, k, v)
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def rekeyed(path, key, dest):
    """``path``'s first sample under ``key`` (written raw, so unsafe keys survive), then the others."""
    samples = samples_of(path)
    members = [(f"{key}.{ext}", data) for ext, data in sorted(samples[0].items()) if ext != "__key__"]
    members += [(f"{s['__key__']}.{ext}", data) for s in samples[1:] for ext, data in sorted(s.items())
                if ext != "__key__"]
    return raw_tar(dest, members)


# --------------------------------------------------------------------------- security: file names are never commands
@pytest.mark.parametrize("how", ["glob", "folder", "brace"])
@pytest.mark.parametrize("command", ["eval", "cluster"])
def test_expanded_file_name_is_never_a_command(base, tmp_path, monkeypatch, command, how):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(base["parts"] if command == "eval" else base["feat"], work / "good.tar")
    other = [{**s, "__key__": "o" + s["__key__"]} for s in samples_of(work / "good.tar")]
    evil = "pipe:id>PWNED;cat good.tar;echo .tar" if how != "brace" else "pipe:id>PWNED.tar"
    write_shard(work / evil, other)  # a real shard whose *name* is a shell command
    monkeypatch.chdir(work)
    spec = {"glob": "*.tar", "folder": ".", "brace": "{good,pipe:id>PWNED}.tar"}[how]
    out = tmp_path / "out"
    args = ["eval", "nmi", spec] if command == "eval" else ["cluster", spec, "-k", "2", "-o", out]
    before = set(os.listdir(work))
    res = invoke(args)
    assert res.exit_code == 0, res.stderr
    assert set(os.listdir(work)) == before  # no PWNED file: `id` did not run
    if command == "eval":
        assert json.loads(res.stdout)["samples"] == 4  # the odd name was read as the file it is
    else:
        assert len(read_shard(out / "000000.tar")) == 4


# --------------------------------------------------------------------------- security: keys never escape the output
UNSAFE_KEYS = {"parent": "../../escaped", "absolute": "{abs}/escaped", "leading-dot": ".hidden", "long": "k" * 250,
               "backslash": "a\\b"}


def _run_viz(kind, inp, out, *extra):
    if kind == "show overlays":
        return invoke(["show", "overlays", inp, "-o", out, *extra])
    if kind == "eval --viz":
        return invoke(["eval", "nmi", inp, "--viz", out, *extra])
    return invoke(["show", "points", inp, "-o", out, "--field", "gt_parts.npy", "--size", "32", *extra])


@pytest.mark.parametrize("key", sorted(UNSAFE_KEYS))
@pytest.mark.parametrize("kind", ["show overlays", "eval --viz", "show points"])
def test_unsafe_key_never_becomes_a_path(base, tmp_path, kind, key):
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    key = UNSAFE_KEYS[key].format(abs=tmp_path / "abs")
    inp = rekeyed(base["pts" if kind == "show points" else "parts"], key, root / "in.tar")
    out = root / "out"
    before = snapshot(tmp_path)
    err = assert_clean_failure(_run_viz(kind, inp, out), "in.tar", "plain name")
    assert repr(key[:20])[:-1] in err
    assert snapshot(tmp_path) == before  # not a PNG anywhere: neither in out nor outside it
    # --skip-bad leaves the sample out and draws the others, inside the output only
    res = _run_viz(kind, inp, out, "--skip-bad")
    assert res.exit_code == 0, res.stderr
    new = set(snapshot(tmp_path)) - set(before)
    assert new and all(p.startswith("a/b/out/") for p in new), new


def test_unsafe_key_is_refused_when_read(tmp_path):
    from partkit.errors import BadSample, SkipBad
    from partkit.io import iter_samples

    path = raw_tar(tmp_path / "x.tar", [("../x.jpg", b"1"), ("ok.jpg", b"2")])
    with pytest.raises(BadSample, match="plain name"):
        list(iter_samples([str(path)]))
    skip = SkipBad()
    assert [s["__key__"] for s in iter_samples([str(path)], handler=skip)] == ["ok"]
    assert len(skip.records) == 1 and "'../x'" in skip.records[0]["reason"]


# --------------------------------------------------------------------------- memory bounds
def test_member_above_the_limit_is_refused_from_its_header(base, tmp_path, monkeypatch):
    samples = samples_of(base["feat"])
    inp = write_shard(tmp_path / "in.tar", samples)
    out = tmp_path / "out"
    monkeypatch.setenv("PARTKIT_MAX_MEMBER_BYTES", "1000")
    assert_clean_failure(invoke(["cluster", inp, "-k", "2", "-o", out]), "PARTKIT_MAX_MEMBER_BYTES", "in.tar")
    assert_nothing_written(out)
    monkeypatch.delenv("PARTKIT_MAX_MEMBER_BYTES")
    # a header declaring 2 GiB (over the 1 GiB default) is refused before a byte of it is read
    info = tarfile.TarInfo("big.feat.npy")
    info.size = 2 << 30
    (tmp_path / "big.tar").write_bytes(info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096)
    t0 = time.time()
    assert_clean_failure(invoke(["cluster", tmp_path / "big.tar", "-k", "2", "-o", out]), "big.feat.npy",
                         "PARTKIT_MAX_MEMBER_BYTES")
    assert time.time() - t0 < 10
    assert_nothing_written(out)


@pytest.mark.parametrize("args", [
    ["extract", "{img}", "--model", "rgb", "--size", "100000", "-o", "{out}"],
    ["show", "points", "{pts}", "--size", "100000", "-o", "{out}"],
    ["distill-3d", "{pts}", "--size", "100000", "--out", "{out}/run", "-o", "{out}/p"],
], ids=["extract", "show-points", "distill-3d"])
def test_pixel_size_options_are_bounded(base, tmp_path, args):
    out = tmp_path / "out"
    args = [a.format(img=base["img"], pts=base["pts"], out=out) for a in args]
    assert_clean_failure(invoke(args), "--size 100000", "PARTKIT_MAX_SIDE")
    assert_nothing_written(out)


def test_size_limit_can_be_lowered(base, tmp_path, monkeypatch):
    monkeypatch.setenv("PARTKIT_MAX_SIDE", "32")
    out = tmp_path / "out"
    assert_clean_failure(invoke(["extract", base["img"], "--model", "rgb", "--size", "64", "-o", out]), "1..32")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- truncated streams
def _cuts(data):
    """Ways to cut a valid tar: at a member boundary, mid-member, and just its end-of-archive blocks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    last = members[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    boundary = members[len(members) // 2].offset  # the header of a member in the middle
    mid = members[len(members) // 2].offset_data + 100
    return {"boundary": data[:boundary], "mid-member": data[:mid], "no-end-blocks": data[:end],
            "one-end-block": data[:end + 512]}


@pytest.mark.parametrize("cut", ["boundary", "mid-member", "no-end-blocks", "one-end-block"])
@pytest.mark.parametrize("where", ["folder", "stdout"])
def test_truncated_stream_is_an_error(base, tmp_path, cut, where):
    data = _cuts(base["feat"].read_bytes())[cut]
    out = tmp_path / "out"
    args = ["cluster", "-", "-k", "2"] + (["-o", out] if where == "folder" else [])
    res = invoke(args, input=data)
    assert_clean_failure(res, ("mid-archive", "truncated"), "regenerate")
    assert_nothing_written(out)


def test_cut_sample_is_never_emitted(base, tmp_path):
    from partkit.errors import SkipBad
    from partkit.io import iter_samples

    full = samples_of(base["feat"])
    for cut, data in _cuts(base["feat"].read_bytes()).items():
        (tmp_path / "cut.tar").write_bytes(data)
        skip = SkipBad()
        got = list(iter_samples([str(tmp_path / "cut.tar")], handler=skip))
        errors = [r["reason"] for r in skip.records]
        assert len(errors) == 1 and "cut.tar" in errors[0], (cut, errors)
        assert len(got) < len(full)
        for s in got:  # every sample given out is whole
            assert _strip(s) == next(f for f in full if f["__key__"] == s["__key__"]), cut


# --------------------------------------------------------------------------- output folders
def test_output_folder_holding_an_input_is_refused(base, tmp_path):
    folder = tmp_path / "feat"
    shutil.copytree(base["feat"].parent, folder)
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    for out in (folder, tmp_path):  # equal to the input's folder, or containing it
        res = invoke(["cluster", folder, "-k", "2", "-o", out, "--overwrite"])
        assert_clean_failure(res, "holds the input", "another folder")
        assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before


def test_distill3d_output_holding_its_input_is_refused_before_training(base, tmp_path):
    folder = tmp_path / "pts"
    shutil.copytree(base["pts"].parent, folder)
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    res = invoke(["distill-3d", folder, "-k", "2", "--out", tmp_path / "run", "-o", folder,
                  "--overwrite"])
    assert_clean_failure(res, "holds the input", "another folder")
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before
    assert not (tmp_path / "run").exists()  # refused before the student was trained


def test_resume_checks_the_inputs(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for im in IMAGES:
        shutil.copy(im, imgs)
    out = tmp_path / "out"
    assert invoke(["pack", imgs / IMAGES[0].name, "-o", out]).exit_code == 0
    before = snapshot(out)
    stats = json.loads((out / "000000.stats.json").read_text())
    assert stats["inputs"]["files"] == 1 and len(stats["inputs"]["sha256"]) == 64
    res = invoke(["pack", imgs / IMAGES[1].name, "-o", out])  # same options, another input
    assert_clean_failure(res, "other inputs", "--overwrite")
    assert snapshot(out) == before
    res = invoke(["pack", imgs / IMAGES[0].name, "-o", out])  # the same input resumes
    assert res.exit_code == 0 and "already done" in res.stderr, res.stderr
    os.utime(imgs / IMAGES[0].name, (1, 1))  # the same name, changed since
    assert_clean_failure(invoke(["pack", imgs / IMAGES[0].name, "-o", out]), "other inputs")


def test_second_writer_is_refused(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `partkit ... -o out` holds
    try:
        assert_clean_failure(invoke(["cluster", base["feat"], "-k", "2", "-o", out]), "another partkit run",
                             str(out))
        assert_nothing_written(out)
    finally:
        os.close(fd)
    assert invoke(["cluster", base["feat"], "-k", "2", "-o", out]).exit_code == 0


def test_second_writer_process_is_refused(base, tmp_path):
    """A real run blocked on stdin holds the folder; a second run into it is refused and changes nothing."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from partkit.cli.main import main; main()", "cluster", "-", "-k",
                             "2", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if out.exists():
                fd = os.open(out, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    break  # the first run holds it
                finally:
                    os.close(fd)
            time.sleep(0.1)
        res = invoke(["cluster", base["feat"], "-k", "2", "-o", out])
        assert_clean_failure(res, "another partkit run")
        proc.stdin.write(base["feat"].read_bytes())
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(read_shard(out / "000000.tar")) == 2  # the first run's shard, whole


def test_handmade_shard_is_not_overwritten(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(base["img"], out / "000000.tar")  # a shard made elsewhere, no stats file
    before = (out / "000000.tar").read_bytes()
    assert_clean_failure(invoke(["cluster", base["feat"], "-k", "2", "-o", out]), "000000.tar", "--overwrite")
    assert (out / "000000.tar").read_bytes() == before and os.listdir(out) == ["000000.tar"]
    assert invoke(["cluster", base["feat"], "-k", "2", "-o", out, "--overwrite"]).exit_code == 0


def test_crash_between_stats_and_tar_leaves_no_complete_looking_shard(base, tmp_path, monkeypatch):
    """The stats file is written before the tar gets its final name: a crash between them is redone on rerun."""
    import partkit.io.sink as sink

    out = tmp_path / "out"
    real = os.replace

    def crash(src, dst):
        if str(dst).endswith(".tar"):
            raise KeyboardInterrupt  # killed just before the rename
        return real(src, dst)

    monkeypatch.setattr(sink.os, "replace", crash)
    res = invoke(["cluster", base["feat"], "-k", "2", "-o", out])
    assert res.exit_code != 0
    assert not (out / "000000.tar").exists() and not list(out.glob(".*tmp*"))
    monkeypatch.setattr(sink.os, "replace", real)
    res = invoke(["cluster", base["feat"], "-k", "2", "-o", out])
    assert res.exit_code == 0 and "already done" not in res.stderr, res.stderr
    assert len(read_shard(out / "000000.tar")) == 2


# --------------------------------------------------------------------------- links and mixed inputs
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_link_members_are_refused(base, tmp_path, kind):
    samples = samples_of(base["parts"])
    members = [(f"{s['__key__']}.{ext}", data) for s in samples for ext, data in sorted(s.items()) if ext != "__key__"]
    first = members[0][0]
    link = {"type": tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, "linkname": first}
    members.insert(1, (f"{samples[0]['__key__']}.extra.png", link))
    inp = raw_tar(tmp_path / "links.tar", members)
    out = tmp_path / "out"
    assert_clean_failure(invoke(["eval", "nmi", inp]), "extra.png", "link", "without links")
    assert_clean_failure(invoke(["cluster", inp, "-o", out]), "extra.png", "link")
    assert_nothing_written(out)


def test_duplicate_keys_across_inputs_are_refused(base, tmp_path):
    a = write_shard(tmp_path / "a.tar", samples_of(base["feat"]))
    b = write_shard(tmp_path / "b.tar", samples_of(base["feat"])[:1])
    out = tmp_path / "out"
    key = samples_of(base["feat"])[0]["__key__"]
    assert_clean_failure(invoke(["cluster", a, b, "-k", "2", "-o", out]), key, "a.tar", "b.tar", "unique")
    assert_nothing_written(out)
    assert_clean_failure(invoke(["eval", "nmi", base["parts"], base["parts"]]), "twice", "unique")


def test_literal_path_that_looks_like_a_glob(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(IMAGES[0], folder / "img[1].jpg")
    shutil.copy(IMAGES[1], folder / "img1.jpg")
    out = tmp_path / "out"
    res = invoke(["pack", folder / "img[1].jpg", "-o", out])
    assert res.exit_code == 0, res.stderr
    (sample,) = read_shard(out / "000000.tar")
    assert json.loads(sample["json"])["source"].endswith("img[1].jpg")
    assert sample["jpg"] == IMAGES[0].read_bytes()


# --------------------------------------------------------------------------- malformed COCO
def _coco(kind):
    from pycocotools import mask as mask_utils

    images = [{"id": 1, "file_name": IMAGES[0].name}]
    ann = {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
           "segmentation": [[1, 1, 20, 1, 20, 20, 1, 20]]}
    coco = {"images": images, "annotations": [ann], "categories": [{"id": 1, "name": "person"}]}
    if kind == "rle-counts":
        from PIL import Image
        iw, ih = Image.open(IMAGES[0]).size
        rle = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))  # runs covering 100 pixels
        ann["segmentation"] = {"size": [ih, iw], "counts": rle["counts"].decode()}
    elif kind == "duplicate-image-id":
        images.append({"id": 1, "file_name": IMAGES[1].name})
    elif kind == "null-annotation":
        coco["annotations"].append(None)
    elif kind == "null-image":
        images.append(None)
    elif kind == "short-keypoints":
        ann["keypoints"] = [10, 12]
    elif kind == "string-keypoints":
        ann["keypoints"] = ["10", "12", "2"]
    return coco


COCO_NEEDLES = {"rle-counts": ("annotation 7", "counts"), "duplicate-image-id": ("image id 1", "twice"),
                "null-annotation": ("annotations[1]", "null"), "null-image": ("images[1]", "null"),
                "short-keypoints": ("annotation 7", "keypoints"), "string-keypoints": ("annotation 7", "keypoints")}


@pytest.mark.parametrize("kind", sorted(COCO_NEEDLES))
def test_malformed_coco_is_refused(tmp_path, kind):
    (tmp_path / "coco.json").write_text(json.dumps(_coco(kind)))
    out = tmp_path / "out"
    res = invoke(["pack", IMAGES[0], "--coco", tmp_path / "coco.json", "-o", out])
    assert_clean_failure(res, "coco.json", "fix or drop", *COCO_NEEDLES[kind])
    assert_nothing_written(out)


# --------------------------------------------------------------------------- wrong or unwritable output paths
OUTPUT_CASES = {
    "eval --json folder": (["eval", "nmi", "{parts}", "--json", "{dir}"], "is a folder"),
    "eval --json missing folder": (["eval", "nmi", "{parts}", "--json", "{dir}/missing/r.json"], "does not exist"),
    "eval --viz file": (["eval", "nmi", "{parts}", "--viz", "{file}"], "is a file"),
    "show overlays -o file": (["show", "overlays", "{parts}", "-o", "{file}"], "is a file"),
    "show points -o file": (["show", "points", "{pts}", "-o", "{file}"], "is a file"),
    "cluster --save-centroids folder": (["cluster", "{feat}", "--scope", "dataset", "-k", "2", "--save-centroids",
                                         "{dir}", "-o", "{dir}/out"], "is a folder"),
    "rank fit --model-out folder": (["rank", "fit", "{parts}", "--model-out", "{dir}", "-k", "2"], "is a folder"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_path_of_the_wrong_kind(base, tmp_path, case):
    args, needle = OUTPUT_CASES[case]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "afile").write_text("keep me")
    fill = {"parts": base["parts"], "pts": base["pts"], "feat": base["feat"], "dir": tmp_path / "d",
            "file": tmp_path / "d" / "afile"}
    before = snapshot(tmp_path)
    assert_clean_failure(invoke([a.format(**fill) for a in args]), needle, ("--json", "--viz", "--output",
                                                                            "--save-centroids", "--model-out"))
    assert snapshot(tmp_path) == before


class _FailingFile(io.FileIO):
    """A file whose writes fail like a full disk (or, with EACCES, a folder we may not write to)."""

    err = errno.ENOSPC

    def write(self, data):
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("what", ["eval --json", "cluster -o", "show overlays"])
def test_write_failure_is_one_error_and_leaves_nothing(base, tmp_path, monkeypatch, what, err):
    import partkit.io.sink as sink

    monkeypatch.setattr(_FailingFile, "err", err)

    def failing_open(path, mode="r", *a, **kw):
        return _FailingFile(path, mode.replace("b", "")) if "w" in mode else open(path, mode, *a, **kw)

    monkeypatch.setattr(sink, "open", failing_open, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    args = {"eval --json": ["eval", "nmi", base["parts"], "--json", out / "r.json"],
            "cluster -o": ["cluster", base["feat"], "-k", "2", "-o", out],
            "show overlays": ["show", "overlays", base["parts"], "-o", out]}[what]
    assert_clean_failure(invoke(args), os.strerror(err), str(out))
    assert_nothing_written(out)  # no temporary, nothing under a final name


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(base, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_clean_failure(invoke(["eval", "nmi", base["parts"], "--json", out / "r.json"]), "permission")
        assert_clean_failure(invoke(["cluster", base["feat"], "-k", "2", "-o", out]), "permission")
    finally:
        out.chmod(0o755)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- options and files
@pytest.mark.parametrize("args", [
    ["--seed", "-1", "cluster", "{feat}", "-k", "2", "-o", "{out}"],
    ["--seed", "-3", "extract", "{img}", "--model", "rgb", "--size", "64", "-o", "{out}"],
    ["--seed", "-1", "eval", "nmi", "{parts}"],
    ["cluster", "{feat}", "--scope", "dataset", "-k", "2", "--seed", "-1", "-o", "{out}"],
], ids=["global-cluster", "global-extract", "global-eval", "cluster-seed"])
def test_negative_seed_is_refused(base, tmp_path, args):
    out = tmp_path / "out"
    args = [a.format(feat=base["feat"], img=base["img"], parts=base["parts"], out=out) for a in args]
    assert_clean_failure(invoke(args), "--seed", "0 or more")
    assert_nothing_written(out)


MESH_CASES = {
    "off-counts": ("cube.off", "OFF\nfour 2 0\n", "counts line"),
    "off-short": ("cube.off", "OFF\n8 2 0\n0 0 0\n1 0 0\n", "declares 8 vertices"),
    "off-vertex": ("cube.off", "OFF\n3 1 0\n0 0 0\n1 zero 0\n0 1 0\n3 0 1 2\n", "vertex 1"),
    "off-face": ("cube.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1\n", "face 0"),
    "ply-type": ("pts.ply", "ply\nformat ascii 1.0\nelement vertex 1\nproperty flt x\nend_header\n0\n",
                 "unknown type 'flt'"),
    "ply-body": ("pts.ply", "ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                            "property float z\nend_header\n0 0 0\n", "declares 5 'vertex'"),
    "ply-count": ("pts.ply", "ply\nformat ascii 1.0\nelement vertex many\nend_header\n", "element NAME COUNT"),
}


@pytest.mark.parametrize("case", sorted(MESH_CASES))
def test_malformed_mesh_says_what_is_wrong(tmp_path, case):
    name, text, needle = MESH_CASES[case]
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    assert_clean_failure(invoke(["pack", tmp_path / name, "-o", out]), name, needle)
    assert_nothing_written(out)


def test_sigterm_removes_the_temporary_stdin_copy(base, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from partkit.cli.main import main; main()", "cluster", "-",
                             "--scope", "dataset", "-k", "2", "-o", str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        data = base["feat"].read_bytes()
        proc.stdin.write(data[: len(data) // 2])  # part of the stream; the rest never comes
        proc.stdin.flush()
        deadline = time.time() + 60
        while not list(tmpdir.glob("partkit-cluster-*/*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(tmpdir.glob("partkit-cluster-*/*")), proc.stderr.read().decode() if proc.poll() else "no copy"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.listdir(tmpdir) == [], os.listdir(tmpdir)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("partkit: error:"), err
    assert_nothing_written(out)
