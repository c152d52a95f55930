"""Each benchmark runs once at tiny size so it cannot rot, and prints its ratio lines."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_runs_tiny(script):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ratio" in res.stdout, res.stdout
