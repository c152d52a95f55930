"""Shard I/O: URL expansion, tar round trips, corrupt input, folder shards, resume, distribution."""
import io
import json
import os

import numpy as np
import pytest

from partkit.errors import BadSample, PartkitError, SkipBad
from partkit.io import (Output, TarSampleWriter, decode_image, decode_label_map, dist_info, encode_png,
                        expand_urls, iter_samples, run_stage)
from conftest import read_shard, tar_names, write_shard


def _samples(n, prefix="s"):
    return [{"__key__": f"{prefix}{i:03d}", "txt": f"hello {i}".encode(), "json": b'{"i": %d}' % i} for i in range(n)]


def test_expand_urls_braces_globs_folders(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"d-{i:06d}.tar", _samples(1))
    assert expand_urls([str(tmp_path / "d-{000000..000001}.tar")]) == [str(tmp_path / "d-000000.tar"),
                                                                       str(tmp_path / "d-000001.tar")]
    assert expand_urls([str(tmp_path / "d-*.tar")]) == sorted(str(p) for p in tmp_path.glob("d-*.tar"))
    assert expand_urls([str(tmp_path)]) == sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert expand_urls(["-", "pipe:cat x"]) == ["-", "pipe:cat x"]
    with pytest.raises(PartkitError, match="does not exist"):
        expand_urls([str(tmp_path / "nope.tar")])
    with pytest.raises(PartkitError, match="matches no file"):
        expand_urls([str(tmp_path / "zz-*.tar")])


def test_tar_round_trip_is_deterministic_and_sorted(tmp_path):
    samples = [{"__key__": "a", "json": b"{}", "feat.npy": b"x", "jpg": b"y"}]
    buf1, buf2 = io.BytesIO(), io.BytesIO()
    for buf in (buf1, buf2):
        w = TarSampleWriter(buf)
        for s in samples:
            w.write(s)
        w.close()
    assert buf1.getvalue() == buf2.getvalue()
    assert tar_names(buf1.getvalue()) == ["a.feat.npy", "a.jpg", "a.json"]
    back = read_shard(buf1.getvalue())
    assert back[0]["feat.npy"] == b"x" and back[0]["__key__"] == "a"


def test_truncated_and_non_tar_inputs_give_one_line_errors(tmp_path):
    good = write_shard(tmp_path / "good.tar", _samples(5))
    data = open(good, "rb").read()
    (tmp_path / "trunc.tar").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    for name in ("trunc.tar", "junk.tar"):
        with pytest.raises(PartkitError, match="not a valid tar stream or truncated") as e:
            list(iter_samples([str(tmp_path / name)]))
        assert "\n" not in str(e.value)
    skip = SkipBad()
    other = write_shard(tmp_path / "other.tar", _samples(5, prefix="o"))
    got = list(iter_samples([str(tmp_path / "trunc.tar"), other], handler=skip))  # keys are unique
    assert len(skip.records) == 1 and skip.records[0]["key"] is None and len(got) >= 5


def test_pipe_input(tmp_path):
    path = write_shard(tmp_path / "a.tar", _samples(3))
    assert [s["__key__"] for s in iter_samples([f"pipe:cat {path}"])] == ["s000", "s001", "s002"]
    with pytest.raises(PartkitError, match="exited with status"):
        list(iter_samples(["pipe:cat /nonexistent/file.tar 2>/dev/null"]))


def _upper(batch):
    return [{**s, "txt": s["txt"].upper()} for s in batch]


def test_folder_shards_stats_and_resume(tmp_path):
    src = write_shard(tmp_path / "in.tar", _samples(7))
    out = tmp_path / "out"
    run_stage([src], _upper, output=Output(str(out), shard_size=3), name="t")
    assert sorted(os.listdir(out)) == ["000000.stats.json", "000000.tar", "000001.stats.json", "000001.tar",
                                       "000002.stats.json", "000002.tar"]
    stats = json.loads((out / "000002.stats.json").read_text())
    assert stats["count"] == 1 and stats["shard"] == "000002.tar"
    first = (out / "000001.tar").read_bytes()

    # A rerun redoes only unfinished shards (a crash between the stats and the tar rename leaves the stats
    # without the tar), and never calls process for finished ones.
    (out / "000001.tar").unlink()
    seen = []

    def spy(batch):
        seen.extend(s["__key__"] for s in batch)
        return _upper(batch)

    summary = run_stage([src], spy, output=Output(str(out), shard_size=3), name="t")
    assert seen == ["s003", "s004", "s005"] and summary["resumed_samples"] == 4
    assert (out / "000001.tar").read_bytes() == first

    # Different options in the same folder: refuse instead of mixing runs.
    with pytest.raises(PartkitError, match="different run"):
        run_stage([src], _upper, output=Output(str(out), shard_size=3), name="t", config={"k": 5})
    run_stage([src], spy, output=Output(str(out), shard_size=3, overwrite=True), name="t", config={"k": 5})


def test_failure_mid_shard_leaves_no_partial_file(tmp_path):
    src = write_shard(tmp_path / "in.tar", _samples(5))
    out = tmp_path / "out"

    def boom(batch):
        if batch[0]["__key__"] == "s003":
            raise PartkitError("boom")
        return batch

    with pytest.raises(PartkitError):
        run_stage([src], boom, output=Output(str(out), shard_size=2), name="t")
    assert sorted(os.listdir(out)) == ["000000.stats.json", "000000.tar"]  # shard 1 neither final nor temp


def test_skip_bad_counts_in_stats(tmp_path):
    src = write_shard(tmp_path / "in.tar", _samples(4))

    def prepare(s):
        if s["__key__"] == "s001":
            raise BadSample("s001", "broken")
        return s

    out = tmp_path / "out"
    with pytest.raises(BadSample, match="broken"):
        run_stage([src], lambda b: b, prepare=prepare, output=Output(str(out / "a")), name="t")
    summary = run_stage([src], lambda b: b, prepare=prepare, handler=SkipBad(), output=Output(str(out / "b")), name="t")
    stats = json.loads((out / "b" / "000000.stats.json").read_text())
    assert summary["skipped"] == 1 and stats["skipped"] == 1 and stats["skipped_samples"][0]["key"] == "s001"
    assert [s["__key__"] for s in read_shard(out / "b" / "000000.tar")] == ["s000", "s002", "s003"]


def test_empty_input_is_an_error(tmp_path):
    empty = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(PartkitError, match="no samples"):
        run_stage([empty], lambda b: b, output=Output(str(tmp_path / "o")), name="t")


def test_distribution_splits_shards_disjointly(tmp_path, monkeypatch):
    shards = [write_shard(tmp_path / f"in{i}.tar", _samples(2, prefix=f"r{i}_")) for i in range(4)]
    out = tmp_path / "out"
    for rank in range(2):
        run_stage(shards, lambda b: b, output=Output(str(out), num_shards=2, shard_index=rank), name="t")
    keys = sorted(s["__key__"] for p in sorted(out.glob("*.tar")) for s in read_shard(p))
    assert keys == sorted(f"r{i}_{j:03d}" for i in range(4) for j in range(2))
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert dist_info() == (3, 4)
    with pytest.raises(PartkitError, match="go together"):
        dist_info(num_shards=2)


def test_image_codecs_handle_modes_and_bad_bytes():
    from PIL import Image

    def enc(im, fmt="PNG"):
        b = io.BytesIO()
        im.save(b, format=fmt)
        return b.getvalue()

    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    rgba = Image.new("RGBA", (10, 12), (255, 0, 0, 128))
    for im in (gray16, rgba, Image.new("L", (9, 11)), Image.new("P", (8, 8))):
        arr = decode_image({"__key__": "k", "png": enc(im)})
        assert arr.dtype == np.uint8 and arr.shape == (im.size[1], im.size[0], 3)
    with pytest.raises(BadSample, match="not a readable image"):
        decode_image({"__key__": "k", "jpg": b"hello"})
    with pytest.raises(BadSample, match="empty"):
        decode_image({"__key__": "k", "jpg": b""})
    with pytest.raises(BadSample, match="smaller than"):
        decode_image({"__key__": "k", "png": enc(Image.new("RGB", (12, 12)))}, min_size=16)
    with pytest.raises(BadSample, match="below the 8-pixel minimum side"):
        decode_image({"__key__": "k", "png": enc(Image.new("RGB", (1, 1)))})
    with pytest.raises(BadSample, match="has no 'jpg' field; run `partkit pack`"):
        decode_image({"__key__": "k"})
    labels = np.array([[0, 1], [300, 2]])
    assert (decode_label_map({"__key__": "k", "x.png": encode_png(labels)}, "x.png") == labels).all()


def test_huge_image_header_is_refused_without_decoding():
    # A 20,000 x 20,000 PNG header over a tiny body: refused from the header alone.
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(BadSample, match="20000x20000.*limit"):
        decode_image({"__key__": "big", "png": png})


def test_members_made_with_dot_slash_are_plain_keys(tmp_path):
    """``tar -C dir -cf x.tar .`` names members ``./a.json``: the same sample as ``a.json``, not a bad key."""
    import tarfile

    from partkit.io import iter_tar

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text('{"x": 1}')
    (src / "a.txt").write_text("hi")
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        tf.add(src, arcname=".")
    with open(tmp_path / "x.tar", "rb") as f:
        samples = list(iter_tar(f, "x.tar"))
    assert [s["__key__"] for s in samples] == ["a"]
    assert samples[0]["json"] == b'{"x": 1}' and samples[0]["txt"] == b"hi"


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f4", "<i4", "|u1", "|b1"])
def test_decode_npy_equals_np_load_and_refuses_nan_and_inf(dtype):
    """decode_npy parses the header itself (one copy, no pickles): the same array as np.load in C and
    Fortran order, writable; any NaN or inf of a float array is refused, float16 included."""
    from partkit.io import decode_npy, encode_npy

    rng = np.random.default_rng(0)
    for shape in [(3, 4, 5), (0, 3), (), (7,)]:
        a = (rng.normal(size=shape) * 10).astype(dtype)
        for order in "CF":
            buf = io.BytesIO()
            np.save(buf, np.asarray(a, order=order))
            got = decode_npy({"__key__": "k", "x.npy": buf.getvalue()}, "x.npy")
            want = np.load(io.BytesIO(buf.getvalue()))
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
            assert got.flags.writeable
            if a.dtype.kind == "f" and a.size:
                for bad in (np.nan, np.inf, -np.inf):
                    b = np.array(a, order=order)
                    b.flat[a.size // 2] = bad
                    buf = io.BytesIO()
                    np.save(buf, b)
                    with pytest.raises(BadSample, match="NaN or inf"):
                        decode_npy({"__key__": "k", "x.npy": buf.getvalue()}, "x.npy")
        for version in ((1, 0), (2, 0), (3, 0)):  # headers of every version (parsed once, then remembered)
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=version)
            for _ in range(2):
                assert np.array_equal(decode_npy({"__key__": "k", "x.npy": buf.getvalue()}, "x.npy"), a)
    with pytest.raises(BadSample, match="not a valid .npy"):
        decode_npy({"__key__": "k", "x.npy": b"\x93NUMPY\x01\x00garbage"}, "x.npy")
    whole = encode_npy(np.zeros((4, 4), np.float32))
    for cut in (12, len(whole) - 1):  # a truncated header or data
        with pytest.raises(BadSample, match="not a valid .npy"):
            decode_npy({"__key__": "k", "x.npy": whole[:cut]}, "x.npy")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample):
        decode_npy({"__key__": "k", "x.npy": obj.getvalue()}, "x.npy")
