"""Bad training options (issue 14): every training command refuses non-finite or degenerate options, and a
resume with another architecture, with exit status 2, one `partkit: error:` line naming the option and the
fix, no traceback, and no run folder or output left behind."""
import pytest
from typer.testing import CliRunner

from conftest import ROOT
from partkit.cli.main import app

runner = CliRunner()
EXAMPLES = ROOT / "examples" / "data"
DECODER = ["--queries", "4", "--hidden", "16", "--dec-layers", "1", "--batch-size", "2", "--max-steps", "2",
           "--crop-grid", "8"]
DISTILL = ["--weights", "none", "--size", "32", "--epochs", "1", "--points", "64", "--knn", "4", "--width", "8",
           "--depth", "1", "-k", "2", "--elevations", "30", "--azimuths", "0,180"]


def invoke(args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two CIHP images (packed, rgb features, clusters), a tiny decoder run, five ShapeNetPart caps."""
    tmp = tmp_path_factory.mktemp("train_inputs")
    images = [EXAMPLES / "cihp" / "images" / f"{k}.jpg" for k in ("0002190", "0005008")]
    for args in (["pack", *images, "-o", tmp / "img"],
                 ["extract", tmp / "img" / "000000.tar", "--model", "rgb", "--size", "64", "-o", tmp / "feat"],
                 ["cluster", tmp / "feat" / "000000.tar", "-k", "2", "-o", tmp / "parts"],
                 ["train-decoder", tmp / "parts" / "000000.tar", "--out", tmp / "run", *DECODER],
                 ["pack", EXAMPLES / "shapenetpart" / "cap_val.npz", "-o", tmp / "pts"]):
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    return {"img": tmp / "img" / "000000.tar", "parts": tmp / "parts" / "000000.tar", "run": tmp / "run",
            "pts": tmp / "pts" / "000000.tar"}


def assert_refused(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr.strip()
    lines = [line for line in err.splitlines() if line.startswith("partkit: error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), err
    return lines[0]


def assert_nothing_left(*paths):
    for path in paths:
        assert not path.exists(), f"{path} was left behind"


TRAIN = ["train-decoder", "{parts}", "--out", "{out}", *DECODER]
MASKS = ["self-train", "{parts}", "--teacher", "{run}", "--out", "{out}", "--max-steps", "1", "--batch-size", "2",
         "--crop-grid", "8"]
CONTRAST = ["self-train", "{img}", "--objective", "part-contrast", "--out", "{out}", "--model", "timm:test_efficientnet",
            "--weights", "none", "--size", "32", "-k", "3", "--epochs", "1", "--rounds", "1", "--batch-size", "2"]
DISTILL_3D = ["distill-3d", "{pts}", *DISTILL, "--out", "{out}", "-o", "{preds}"]

CASES = [
    (TRAIN, ["--lr", "nan"], "--lr"), (TRAIN, ["--lr", "inf"], "--lr"), (TRAIN, ["--lr", "-1e-4"], "--lr"),
    (TRAIN, ["--lr", "0"], "--lr"), (TRAIN, ["--queries", "0"], "--queries"), (TRAIN, ["--hidden", "30"], "--hidden"),
    (TRAIN, ["--hidden", "0"], "--hidden"), (TRAIN, ["--dec-layers", "0"], "--dec-layers"),
    (TRAIN, ["--crop-grid", "0"], "--crop-grid"), (TRAIN, ["--batch-size", "0"], "--batch-size"),
    (TRAIN, ["--max-steps", "0"], "--max-steps"), (TRAIN, ["--epochs", "0"], "--epochs"),
    (TRAIN, ["--warmup", "-1"], "--warmup"), (TRAIN, ["--stop-at", "0"], "--stop-at"),
    (TRAIN, ["--weight-decay", "nan"], "--weight-decay"), (TRAIN, ["--clip-grad", "inf"], "--clip-grad"),
    (TRAIN, ["--log-every", "0"], "--log-every"), (TRAIN, ["--size", "0"], "--size"),
    (MASKS, ["--lr", "nan"], "--lr"), (MASKS, ["--rounds", "0"], "--rounds"), (MASKS, ["--ema-decay", "nan"], "--ema-decay"),
    (MASKS, ["--ema-decay", "1.5"], "--ema-decay"), (MASKS, ["--crop-grid", "0"], "--crop-grid"),
    (MASKS, ["--batch-size", "0"], "--batch-size"), (MASKS, ["--score-threshold", "nan"], "--score-threshold"),
    (MASKS, ["--unsup-weight", "-1"], "--unsup-weight"), (MASKS, ["--burn-in", "-1"], "--burn-in"),
    (MASKS, ["--stop-at", "0"], "--stop-at"),
    (CONTRAST, ["--lr", "nan"], "--lr"), (CONTRAST, ["--lr", "-1"], "--lr"), (CONTRAST, ["--rounds", "0"], "--rounds"),
    (CONTRAST, ["--tau", "0"], "--tau"), (CONTRAST, ["--momentum", "nan"], "--momentum"), (CONTRAST, ["-k", "1"], "-k"),
    (CONTRAST, ["--batch-size", "0"], "--batch-size"), (CONTRAST, ["--epochs", "0"], "--epochs"),
    (CONTRAST, ["--round-epochs", "0"], "--round-epochs"), (CONTRAST, ["--max-steps", "5"], "--max-steps"),
    (CONTRAST, ["--optimizer", "lars"], "--optimizer"), (CONTRAST, ["--dino-weight", "1"], "--dino-weight"),
    (CONTRAST, ["--round-lr", "0"], "--round-lr"),
    (CONTRAST, ["--size", "0"], "--size"), (CONTRAST, ["--stop-at", "0"], "--stop-at"),
    (CONTRAST, ["--workers", "-1"], "--workers"), (CONTRAST, ["--shuffle-buffer", "0"], "--shuffle-buffer"),
    (DISTILL_3D, ["--lr", "nan"], "--lr"), (DISTILL_3D, ["--lr", "-inf"], "--lr"), (DISTILL_3D, ["--epochs", "0"], "--epochs"),
    (DISTILL_3D, ["--batch-size", "0"], "--batch-size"), (DISTILL_3D, ["--plateau", "nan"], "--plateau"),
    (DISTILL_3D, ["--temperature", "0"], "--temperature"), (DISTILL_3D, ["--stop-at", "0"], "--stop-at"),
    (DISTILL_3D, ["--width", "0"], "--width"), (DISTILL_3D, ["--elevations", "nan"], "--elevations"),
]


def _id(case):
    cmd, extra, _ = case
    name = "contrast" if "part-contrast" in cmd else "masks" if "--teacher" in cmd else cmd[0]
    return f"{name}{''.join(extra)}"


@pytest.mark.parametrize("cmd,extra,option", CASES, ids=[_id(c) for c in CASES])
def test_bad_training_option_is_refused_before_any_work(data, tmp_path, cmd, extra, option):
    out, preds = tmp_path / "run", tmp_path / "preds"
    args = [str(a).format(out=out, preds=preds, **data) for a in cmd] + extra
    line = assert_refused(invoke(args), option)
    assert "; pass" in line or "pass " in line, line  # the fix
    assert_nothing_left(out, preds)


def test_distill_3d_resume_and_stop_at_need_a_run_folder(data, tmp_path):
    args = ["distill-3d", data["pts"], *DISTILL, "-o", tmp_path / "preds"]
    assert_refused(invoke([*args, "--resume"]), "--out")
    assert_refused(invoke([*args, "--stop-at", "1"]), "--out")
    assert_nothing_left(tmp_path / "preds")


def test_resume_with_another_architecture_names_the_option(data, tmp_path):
    out = tmp_path / "run"
    res = invoke(["train-decoder", data["parts"], "--out", out, *DECODER, "--stop-at", "1"])
    assert res.exit_code == 0, res.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = assert_refused(invoke(["train-decoder", data["parts"], "--out", out, *DECODER, "--hidden", "32",
                                  "--resume"]), "--hidden", "32", "16", "new --out")
    assert "state_dict" not in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the run is left as it was
    assert_refused(invoke(["train-decoder", data["parts"], "--out", out, *DECODER, "--resume", "--lr", "0.5"]), "--lr")
    res = invoke(["train-decoder", data["parts"], "--out", out, *DECODER, "--resume"])  # the same options continue
    assert res.exit_code == 0, res.stderr
    assert_refused(invoke(["train-decoder", data["parts"], "--out", tmp_path / "new", *DECODER, "--resume"]),
                   "--resume", "not found")
    assert_nothing_left(tmp_path / "new")


def test_resume_of_self_train_and_distill_3d_with_other_options(data, tmp_path):
    out = tmp_path / "st"
    masks = ["self-train", data["parts"], "--teacher", data["run"], "--out", out, "--max-steps", "2", "--batch-size", "2",
             "--crop-grid", "8", "--score-threshold", "0"]
    assert invoke([*masks, "--stop-at", "1"]).exit_code == 0
    assert_refused(invoke([*masks, "--resume", "--ema-decay", "0.5"]), "--ema-decay")
    run3d = tmp_path / "d3"
    res = invoke(["distill-3d", data["pts"], *DISTILL, "--epochs", "2", "--stop-at", "1", "--out", run3d, "-o",
                  tmp_path / "p"])
    assert res.exit_code == 0, res.stderr
    assert not (tmp_path / "p").exists()  # a stopped student writes no samples
    assert_refused(invoke(["distill-3d", data["pts"], *DISTILL, "--epochs", "2", "--width", "16", "--resume", "--out",
                           run3d, "-o", tmp_path / "p"]), "--width")
    assert_nothing_left(tmp_path / "p")
