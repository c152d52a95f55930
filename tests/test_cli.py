"""The command line: help, globals, one-line errors, real pipes, stdout hygiene, torchrun."""
import os
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from partkit.cli.main import app
from conftest import ROOT, read_shard, tar_names

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TINY_VIT = ["--model", "timm:vit_tiny_patch16_224", "--weights", "none", "--size", "32"]


def test_help_lists_every_subcommand_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("pack", "extract", "models"):
        assert name in result.stdout
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("partkit ")


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = runner.invoke(app, ["extract", str(tmp_path / "missing.tar"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    result = runner.invoke(app, ["--device", "cuda:7", "extract", "x"]) if not _has_cuda() else None
    if result is not None:
        assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def test_models_json_on_stdout_table_on_stderr():
    result = runner.invoke(app, ["models", "efficientnet*", "--json"])
    assert result.exit_code == 0 and '"efficientnet_lite0"' in result.stdout
    result = runner.invoke(app, ["models", "efficientnet*"])
    assert result.exit_code == 0 and result.stdout == "" and "efficientnet_lite0" in result.stderr
    assert "detectors" not in result.stderr  # no detector matches efficientnet*
    result = runner.invoke(app, ["models"])  # the detectors of partkit detect are listed too
    assert result.exit_code == 0 and result.stdout == ""
    listed = " ".join(result.stderr.split("detectors (partkit detect --model):", 1)[1].split())
    assert listed == "maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2"


def _run(cmd, **kw):
    return subprocess.run(cmd, shell=True, capture_output=True, env=ENV, cwd=ROOT, timeout=300, **kw)


def test_real_pipe_pack_extract_lists_five_samples(cihp_dir, tmp_path):
    cmd = (f"partkit pack {cihp_dir}/images --labels {cihp_dir}/labels | "
           f"partkit extract --model efficientnet_lite0 --size 96")
    piped = _run(f"{cmd} > {tmp_path}/piped.tar")
    assert piped.returncode == 0, piped.stderr.decode()
    data = (tmp_path / "piped.tar").read_bytes()
    names = tar_names(data)
    assert len({n.split(".")[0] for n in names}) == 5
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "json", "gt_parts.png", "feat.npy", "feat.json"}
    # the folder form gives identical samples (batches never straddle shards, so with the same
    # --batch-size and --shard-size the model sees the same batches, and float results match bit for bit)
    folder = _run(f"{cmd} --output {tmp_path}/out")
    assert folder.returncode == 0, folder.stderr.decode()
    from_folder = [s for p in sorted((tmp_path / "out").glob("*.tar")) for s in read_shard(p)]
    assert len(list((tmp_path / "out").glob("*.stats.json"))) == 1
    strip = lambda ss: [{k: v for k, v in s.items() if k != "__url__"} for s in ss]  # noqa: E731
    assert strip(from_folder) == strip(read_shard(data))
    # reading through `pipe:`; a second extract replaces its own feat.* fields (5 fields x 5 samples)
    again = _run(f"partkit extract pipe:'cat {tmp_path}/piped.tar' --model rgb --size 32 | tar t | wc -l")
    assert again.returncode == 0 and int(again.stdout) == 25


def test_closed_stdout_gives_no_traceback(cihp_dir):
    res = _run(f"partkit pack {cihp_dir}/images | partkit extract --model rgb | head -c 100 > /dev/null; "
               "echo ${PIPESTATUS[1]}", executable="/bin/bash")
    err = res.stderr.decode()
    assert "Traceback" not in err and "Exception" not in err, err


def test_refuses_to_write_tar_to_a_terminal(cihp_dir):
    # CliRunner's stdout is not a terminal; a pty shows the refusal
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("partkit", ["partkit", "pack", str(cihp_dir / "images")], ENV)
    out = b""
    try:
        while True:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 2 and b"refusing to write a tar to the terminal" in out


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is installed with torch")
def test_torchrun_two_processes_split_the_shards(tmp_path, cihp_dir):
    packed = _run(f"partkit pack {cihp_dir}/images --labels {cihp_dir}/labels -o {tmp_path}/in --shard-size 1")
    assert packed.returncode == 0
    res = _run(f"torchrun --nproc_per_node=2 --master_port=29517 $(which partkit) extract '{tmp_path}/in/*.tar' "
               f"{' '.join(TINY_VIT)} -o {tmp_path}/out --shard-size 2")
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    keys = sorted(s["__key__"] for p in (tmp_path / "out").glob("*.tar") for s in read_shard(p))
    assert keys == sorted(p.stem for p in (cihp_dir / "images").glob("*.jpg"))
    # rank 0 took input shards 0, 2, 4 (3 samples -> 2 output shards), rank 1 took 1, 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]


def test_drop_progress_and_quiet(tmp_path, cihp_dir):

    res = runner.invoke(app, ["pack", str(cihp_dir / "images"), "-o", str(tmp_path / "packed")])
    assert res.exit_code == 0
    res = runner.invoke(app, ["--progress", "extract", str(tmp_path / "packed"), "--model", "rgb", "--size", "32",
                              "--drop", "jpg", "--drop", "json"])
    assert res.exit_code == 0
    names = tar_names(res.stdout_bytes)
    assert names and not any(n.endswith((".jpg", ".json")) and not n.endswith("feat.json") for n in names)
    assert "extract" in res.stderr  # progress and the summary line went to stderr, the tar to stdout
    res = runner.invoke(app, ["--quiet", "extract", str(tmp_path / "packed"), "--model", "rgb", "--size", "32"])
    assert res.exit_code == 0 and res.stderr == ""
