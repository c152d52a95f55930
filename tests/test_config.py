"""``--config FILE`` (issue 20): any command's options from a flat YAML/JSON file or a run's config.json; flags on
the command line override it; unknown keys are refused in one line."""
import json

import pytest

from conftest import ROOT, invoke, one_error_line

IMAGES = [ROOT / "examples" / "data" / "cihp" / "images" / f"{k}.jpg" for k in ("0002190", "0005008")]
TINY = ["--max-steps", "1", "--queries", "4", "--hidden", "16", "--dec-layers", "1", "--batch-size", "2",
        "--warmup", "0", "--crop-grid", "4", "--val-every", "1", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    for args in (["pack", *IMAGES, "-o", tmp / "img"],
                 ["extract", tmp / "img", "--model", "rgb", "--size", "32", "-o", tmp / "feat"],
                 ["cluster", tmp / "feat", "-k", "2", "-o", tmp / "parts"]):
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    return tmp / "parts" / "000000.tar"


def options(run):
    return json.loads((run / "config.json").read_text())["options"]


def test_run_config_round_trips_and_flags_override(parts, tmp_path):
    first = invoke(["--device", "cpu", "train-decoder", parts, "--out", tmp_path / "a", *TINY])
    assert first.exit_code == 0, first.stderr
    opts = options(tmp_path / "a")
    assert opts["queries"] == 4 and opts["inputs"] == [str(parts)]

    again = invoke(["--device", "cpu", "train-decoder", "--config", tmp_path / "a" / "config.json",
                    "--out", tmp_path / "b"])
    assert again.exit_code == 0, again.stderr
    assert options(tmp_path / "b") == {**opts, "out": str(tmp_path / "b")}

    over = invoke(["--device", "cpu", "train-decoder", "--config", tmp_path / "a" / "config.json",
                   "--out", tmp_path / "c", "--lr", "0.01"])
    assert over.exit_code == 0, over.stderr
    assert options(tmp_path / "c") == {**opts, "out": str(tmp_path / "c"), "lr": 0.01}


def test_flat_yaml_config_sets_options(parts, tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs: [{parts}]\nk: 3\nseed: 0\n")
    by_file = invoke(["cluster", "--config", cfg])
    by_flags = invoke(["cluster", parts, "-k", "3"])
    assert by_file.exit_code == 0 and by_flags.exit_code == 0, (by_file.stderr, by_flags.stderr)
    assert by_file.stdout_bytes == by_flags.stdout_bytes
    assert invoke(["cluster", "--config", cfg, "-k", "2"]).stdout_bytes == invoke(["cluster", parts, "-k", "2"]).stdout_bytes


def test_unknown_key_is_refused(parts, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lrr": 0.1, "queries": 4}))
    line = one_error_line(invoke(["train-decoder", parts, "--out", tmp_path / "r", "--config", cfg]),
                          "unknown option(s) lrr", "valid:", "lr")
    assert not (tmp_path / "r").exists(), line


def test_nested_or_broken_config_is_refused(parts, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"lr": 0.1}}))
    one_error_line(invoke(["train-decoder", parts, "--out", tmp_path / "r", "--config", cfg]), "flat mapping")
    cfg.write_text("{not json")
    one_error_line(invoke(["cluster", parts, "--config", cfg]), "not valid JSON")
    one_error_line(invoke(["cluster", parts, "--config", tmp_path / "missing.json"]), "missing.json")


def test_group_commands_take_config(tmp_path):
    res = invoke(["rank", "fit", "--help"])
    assert "--config" in res.stdout
