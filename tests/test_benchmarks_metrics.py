"""benchmarks/metrics.py runs at tiny size and prints the speed ratio and the agreement."""
import re
import subprocess
import sys

from conftest import ROOT


def test_metrics_benchmark_tiny():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "metrics.py"), "--tiny"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert re.search(r"speed-up ratio sklearn / partkit: [\d.]+x", result.stdout)
    assert "identical to 1e-9" in result.stdout
    assert re.search(r"peak memory .* MB at 10 images, [\d.]+ MB at 100 images", result.stdout)
