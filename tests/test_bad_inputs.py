"""Bad input to every shard-reading command: one stderr line, non-zero exit, no traceback, no output.

(The rest of issue 8's list -- wrong dtypes, NaN features, huge headers, corrupted checkpoints,
interrupted reruns -- is covered per module in test_io, test_extract, test_decoder, test_cluster.)
"""
import pytest
from typer.testing import CliRunner

from commands.main import app
from conftest import write_shard

runner = CliRunner()

COMMANDS = {
    "extract": ["extract", "{inp}", "--model", "rgb", "-o", "{out}"],
    "cluster": ["cluster", "{inp}", "-k", "2", "-o", "{out}"],
    "train-decoder": ["train-decoder", "{inp}", "--out", "{out}", "--max-steps", "1"],
    "predict": ["predict", "{inp}", "--checkpoint", "{run}", "-o", "{out}"],
    "self-train": ["self-train", "{inp}", "--teacher", "{run}", "--out", "{out}"],
    "rank fit": ["rank", "fit", "{inp}", "--model-out", "{out}/rank.npz"],
    "eval": ["eval", "nmi", "ari", "{inp}"],
    "show overlays": ["show", "overlays", "{inp}", "-o", "{out}"],
    "distill-3d": ["distill-3d", "{inp}", "--out", "{out}/run", "-o", "{out}/preds"],
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    good = write_shard(tmp / "good.tar", [{"__key__": f"k{i}", "txt": b"x" * 3000} for i in range(4)])
    data = open(good, "rb").read()
    (tmp / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp / "notatar.tar").write_bytes(b"\x89PNG this is not a tar archive" * 100)
    write_shard(tmp / "empty.tar", [])
    (tmp / "nofield.tar").write_bytes(data)  # samples without the fields any stage needs
    return tmp


def _run(cmd, tmp, inp, name):
    run = tmp / "no_such_run"
    args = [a.format(inp=inp, out=tmp / f"out_{name}", run=run) for a in cmd]
    return runner.invoke(app, args)


@pytest.mark.parametrize("case", ["truncated.tar", "notatar.tar", "empty.tar", "nofield.tar", "missing.tar"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_input_fails_cleanly(bad_inputs, command, case):
    res = _run(COMMANDS[command], bad_inputs, str(bad_inputs / case), f"{command}_{case}".replace(" ", "_"))
    assert res.exit_code not in (0, None), res.stdout
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an unhandled exception
    err = res.stderr.strip()
    assert err.splitlines()[-1].startswith("partkit: error:"), err
    assert "Traceback" not in err
    out = bad_inputs / f"out_{command}_{case}".replace(" ", "_")
    assert not list(out.glob("*.tar")) if out.exists() else True  # nothing half-written
