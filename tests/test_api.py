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
