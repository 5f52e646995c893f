"""The public Python API: every exported name resolves, and the file/plot layers do not load torch."""

from __future__ import annotations

import subprocess
import sys

import hessspec


def test_every_export_resolves():
    for name in hessspec.__all__:
        assert getattr(hessspec, name) is not None, name


def test_store_and_plots_do_not_import_torch():
    code = "import sys, hessspec, hessspec.store, hessspec.plots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_ANALYSE_IN_A_FRESH_PROCESS = """
import warnings
warnings.simplefilter("error")  # any warning that reaches the user is an error
import torch
from torch import nn
import hessspec
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
op = hessspec.HessianOperator(model, [(x, y)], block_strategy="vmap")
r = hessspec.analyze(op, hessspec.AnalysisSettings(lanczos_steps=8, probes=2, top_k=3))
print(repr(r))
"""


def test_no_torch_internal_warning_leaks_and_results_print_short():
    # torch.func's forward-mode decompositions load through the deprecated torch.jit.script (a FutureWarning) the
    # first time in a process: a fresh interpreter, with every warning an error.
    out = subprocess.run([sys.executable, "-c", _ANALYSE_IN_A_FRESH_PROCESS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("CheckpointResult(step=0, curvature='hessian', block='all'") and "converged=" in line
    assert len(line) < 300 and "array(" not in line


def test_run_report_prints_short(tmp_path):
    from hessspec.runner.pipeline import RunReport
    from tests.test_store import make_result

    report = RunReport(out=str(tmp_path / "o.h5"), analysed=(make_result(0), make_result(10)), skipped=())
    assert (
        repr(report)
        == f"RunReport(out={str(tmp_path / 'o.h5')!r}, analysed=2 result(s) at steps [0, 10], skipped=0 checkpoint(s))"
    )
