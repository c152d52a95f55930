"""scripts/gpu_checks.py, the prepared CUDA checks: a dry run of every step on the CPU, so the script
cannot rot while no GPU is at hand (its CUDA-only step is skipped there)."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "gpu_checks.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_dry_run_on_the_cpu_passes_every_step(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "g"), "--device", "cpu"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(tmp_path / "g" / "gpu_checks.json"))
    status = {r["check"]: r["status"] for r in report["results"]}
    assert status.pop("kmeans-test") == "SKIP"  # the suite's CUDA test: nothing to run on the CPU
    assert status == dict.fromkeys(["extract", "cluster", "train-amp", "train-fp32", "resume", "self-train",
                                    "part-contrast"], "PASS"), res.stderr
    assert res.stdout == "" and "8 of 8 not failed" in res.stderr  # the table goes to stderr


def test_refuses_a_used_folder_and_a_missing_gpu(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    res = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "used"), "--device", "cpu"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env=ENV)
    assert res.returncode == 2 and "not empty" in res.stderr and "Traceback" not in res.stderr
    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "new")], capture_output=True, text=True,
                             cwd=ROOT, timeout=120, env=ENV)
        assert res.returncode == 2 and "no CUDA GPU" in res.stderr and not (tmp_path / "new").exists()
