"""Every example script runs (on the bundled / shared data) and produces its outputs."""
import os
import subprocess

import pytest

from conftest import ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.sh"))


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(["bash", str(ROOT / "examples" / script), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    produced = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert produced, "the example wrote nothing"
