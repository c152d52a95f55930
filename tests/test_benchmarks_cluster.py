"""benchmarks/cluster.py runs at tiny size and prints every ratio line."""
import os
import subprocess
import sys

from conftest import ROOT


def test_cluster_benchmark_prints_ratios():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--tiny"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for line in ("speed ratio partkit/sklearn-loop", "partkit/faiss-loop", "mean inertia ratio partkit/sklearn",
                 "time ratio partkit/faiss", "peak RSS ratio partkit/faiss"):
        assert line in out, out
