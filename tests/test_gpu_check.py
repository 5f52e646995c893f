"""benchmarks/gpu_check.sh runs end to end (at toy size on the CPU), so the GPU check cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "| cifar-resnet8 | bfloat16 |" in text and "| cifar-resnet8-nobn | float32 + TF32 |" in text
    assert "failed" not in text and "ran eagerly" not in text and "skipped" not in text
    # The compiled cell of the tiny run (float32, no BN): cost, compile time and difference to eager, all numbers.
    row = next(line for line in text.splitlines() if line.startswith("| cifar-resnet8-nobn | float32 |"))
    ratio, compile_s, difference = (cell.strip() for cell in row.strip("|").split("|")[5:8])
    assert float(ratio) > 0 and float(compile_s) >= 0 and float(difference) < 1e-2
    assert "**one checkpoint**" in text
