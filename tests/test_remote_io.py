"""Remote inputs (issue 20): http(s) shards streamed with brace patterns, s3/gs through their clients, and
``-o pipe:CMD``; a glob of local files never yields a URL."""
import functools
import http.server
import os
import threading

import pytest

from partkit.io.sink import input_fingerprint
from partkit.io.urls import expand_urls, open_url
from conftest import ROOT, invoke, one_error_line, read_shard, write_shard

EXAMPLES = ROOT / "examples" / "data"
IMAGES = [EXAMPLES / "cihp" / "images" / f"{k}.jpg" for k in ("0002190", "0005008")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two one-sample feature shards in a folder served by http.server on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("remote")
    for args in (["pack", *IMAGES, "-o", tmp / "img"],
                 ["extract", tmp / "img" / "000000.tar", "--model", "rgb", "--size", "32", "-o", tmp / "feat"]):
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    www = tmp / "www"
    www.mkdir()
    for i, sample in enumerate(read_shard(tmp / "feat" / "000000.tar")):
        write_shard(www / f"in-{i:06d}.tar", [{k: v for k, v in sample.items() if not k.startswith("__")
                                              or k == "__key__"}])
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server shares stderr with the command under test
            pass

    handler = functools.partial(Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_brace_input_equals_local_files(served):
    www, base = served
    local = invoke(["cluster", www / "in-{000000..000001}.tar", "-k", "2"])
    remote = invoke(["cluster", f"{base}/in-{{000000..000001}}.tar", "-k", "2"])
    assert local.exit_code == 0 and remote.exit_code == 0, (local.stderr, remote.stderr)
    assert len(read_shard(remote.stdout_bytes)) == 2
    assert remote.stdout_bytes == local.stdout_bytes


def test_http_404_is_one_line(served, tmp_path):
    _, base = served
    line = one_error_line(invoke(["cluster", f"{base}/missing.tar", "-k", "2", "-o", tmp_path / "o"]),
                          f"cannot read '{base}/missing.tar'", "HTTP 404")
    assert "Traceback" not in line
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tar"))


def test_unreachable_host_is_one_line(tmp_path):
    one_error_line(invoke(["cluster", "http://127.0.0.1:9/x.tar", "-k", "2"]), "cannot read 'http://127.0.0.1:9/x.tar'")


def test_remote_inputs_have_no_fingerprint(served):
    www, base = served
    assert input_fingerprint([str(www / "in-000000.tar")]) is not None
    assert input_fingerprint([f"{base}/in-000000.tar"]) is None


def test_remote_folder_output_resumes_without_fingerprint(served, tmp_path):
    _, base = served
    args = ["cluster", f"{base}/in-{{000000..000001}}.tar", "-k", "2", "-o", tmp_path / "o", "--shard-size", "1"]
    assert invoke(args).exit_code == 0
    res = invoke(args)
    assert res.exit_code == 0 and "already done" in res.stderr, res.stderr


def test_output_pipe_writes_the_stdout_bytes(served, tmp_path):
    www, _ = served
    target = tmp_path / "piped.tar"
    plain = invoke(["cluster", www / "in-000000.tar", "-k", "2", "-o", "-"])
    piped = invoke(["cluster", www / "in-000000.tar", "-k", "2", "-o", f"pipe:cat > '{target}'"])
    assert plain.exit_code == 0 and piped.exit_code == 0, (plain.stderr, piped.stderr)
    assert piped.stdout_bytes == b""
    assert target.read_bytes() == plain.stdout_bytes


def test_output_pipe_failure_is_one_line(served):
    www, _ = served
    one_error_line(invoke(["cluster", www / "in-000000.tar", "-k", "2", "-o", "pipe:cat > /dev/null; exit 3"]),
                   "output command", "status 3")


def test_a_glob_never_produces_a_url(tmp_path, monkeypatch, served):
    www, _ = served
    (tmp_path / "http:" / "host").mkdir(parents=True)
    (tmp_path / "http:" / "host" / "a.tar").write_bytes((www / "in-000000.tar").read_bytes())
    monkeypatch.chdir(tmp_path)
    for pattern in ("http:*/host/*.tar", "ht*p:/host/*.tar", "ht*p://host/*.tar", "{http:,http:}/host/a.tar",
                    "http:/host"):
        urls = expand_urls([pattern])
        assert urls and all(u.startswith("./http:") for u in urls), (pattern, urls)
        stream = open_url(urls[0])
        assert stream.read(3)
        stream.close()


def test_url_braces_expand_and_are_not_globbed():
    assert expand_urls(["https://h/a-{0..2}.tar?x=[1]"]) == [f"https://h/a-{i}.tar?x=[1]" for i in range(3)]
    assert expand_urls(["s3://b/k-{00..01}.tar"]) == ["s3://b/k-00.tar", "s3://b/k-01.tar"]


@pytest.mark.parametrize("url,client", [("s3://bucket/a.tar", "aws"), ("gs://bucket/a.tar", "gsutil")])
def test_cloud_without_client_names_it(url, client, monkeypatch, tmp_path):
    pytest.importorskip("fsspec")  # with fsspec but no s3fs/gcsfs it falls back to the client
    import importlib.util
    if importlib.util.find_spec("s3fs" if url.startswith("s3") else "gcsfs"):
        pytest.skip("the fsspec backend is installed")
    monkeypatch.setenv("PATH", str(tmp_path))
    one_error_line(invoke(["cluster", url, "-k", "2"]), f"cannot read '{url}'", repr(client))


def test_cloud_through_a_fake_client(monkeypatch, tmp_path, served):
    import importlib.util
    if importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed, so fsspec reads s3:// itself")
    www, _ = served
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    # aws s3 cp s3://b/in-000000.tar -  ->  cat the served file
    fake.write_text(f"#!/bin/sh\nf=$(basename \"$3\"); test -f '{www}'/\"$f\" || {{ echo 'NoSuchKey' >&2; exit 1; }}\n"
                    f"cat '{www}'/\"$f\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    local = invoke(["cluster", www / "in-{000000..000001}.tar", "-k", "2"])
    remote = invoke(["cluster", "s3://b/in-{000000..000001}.tar", "-k", "2"])
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout_bytes == local.stdout_bytes
    one_error_line(invoke(["cluster", "s3://b/nope.tar", "-k", "2"]), "aws exited with status 1", "NoSuchKey")


def test_output_pipe_is_stopped_when_the_run_fails(served, tmp_path):
    """A failed run must not hand CMD a clean end of stream: CMD is terminated, so 'write then rename' never renames."""
    www, _ = served
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file at all" * 100)
    target, part = tmp_path / "out.tar", tmp_path / "out.part"
    res = invoke(["cluster", www / "in-000000.tar", bad, "-k", "2",
                  "-o", f"pipe:cat > '{part}' && mv '{part}' '{target}'"])
    assert res.exit_code != 0
    assert not target.exists()
