"""Lanczos bases on the device, in host memory or in a scratch file: the same bits, and no file left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hessspec.analysis import AnalysisSettings, analyze, plan_bases
from hessspec.curvature.hessian import HessianOperator
from hessspec.linalg.basis import (
    SCRATCH_PREFIX,
    BasisStorage,
    remove_stale_scratch,
    resolve_basis_placement,
)
from hessspec.linalg.lanczos import lanczos, reorth_chunk_rows
from tests import reference as ref

FIELDS = ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2", "gradient_nodes")
ROOT = Path(__file__).resolve().parent.parent


def _operator(strategy: str = "reverse") -> HessianOperator:
    torch.manual_seed(3)
    x, y = torch.randn(45, 6, dtype=torch.float64), torch.randint(0, 3, (45,))
    return HessianOperator(ref.tiny_mlp(True), ref.make_batches(x, y, 16), block_strategy=strategy)


def _scratch_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SCRATCH_PREFIX}*"))


@pytest.mark.parametrize("basis_dtype", ["float64", "float32"])
def test_every_basis_placement_gives_the_same_bits(tmp_path, basis_dtype):
    op = _operator()
    results = {
        placement: analyze(
            op,
            AnalysisSettings(
                20, 3, 5, seed=1, basis_placement=placement, basis_dtype=basis_dtype, scratch_dir=str(tmp_path)
            ),
        )
        for placement in ("device", "host", "disk")
    }
    for placement in ("host", "disk"):
        for field in FIELDS:
            assert np.array_equal(getattr(results[placement], field), getattr(results["device"], field)), field
        assert results[placement].settings["basis_placement"] == placement
    assert _scratch_files(tmp_path) == []  # removed after success


def test_chunked_reorthogonalisation_keeps_the_basis_orthonormal(monkeypatch, tmp_path):
    # Chunks of 4 rows (instead of the whole of these tiny bases): the relation and orthogonality hold as tightly.
    import hessspec.linalg.lanczos as lz

    monkeypatch.setattr(lz, "_MAX_CHUNK_ROWS", 4)
    assert reorth_chunk_rows(60) == 4
    ev = np.concatenate([np.linspace(-1.0, 2.0, 57), [5.0, 9.0, 20.0]])
    A, _ = ref.symmetric_with_spectrum(ev, 0)
    V0 = torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with BasisStorage("disk", "cpu", tmp_path) as storage:
        basis = storage.empty((2, 30, 60), torch.float64)
        res = lanczos(lambda V: A @ V, V0, 30, keep_basis=True, basis=basis)
        for i in range(2):
            Q = res.basis[i].T
            T = torch.diag(res.alpha[i]) + torch.diag(res.beta[i], 1) + torch.diag(res.beta[i], -1)
            E = A @ Q - Q @ T - torch.outer(res.residuals[:, i], torch.eye(30, dtype=torch.float64)[-1])
            assert float(E.abs().max()) <= 1e-12 * float(A.abs().max())
            assert float((Q.T @ Q - torch.eye(30, dtype=torch.float64)).abs().max()) <= 1e-12
        assert len(_scratch_files(tmp_path)) == 1
    assert _scratch_files(tmp_path) == []


def test_scratch_file_removed_after_an_error(tmp_path):
    op = _operator()
    calls = []

    def fail_at_step_3(done: int, total: int) -> None:
        calls.append(done)
        assert len(_scratch_files(tmp_path)) == 1  # the basis is on disk while the chains run
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze(
            op, AnalysisSettings(20, 2, 4, basis_placement="disk", scratch_dir=str(tmp_path)), progress=fail_at_step_3
        )
    assert calls == [1, 2, 3] and _scratch_files(tmp_path) == []


def test_stale_scratch_from_a_killed_run_is_removed_by_the_rerun(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_basis_placement import _operator
        from hessspec.analysis import AnalysisSettings, analyze

        def slow(done, total):
            if done == 2:
                print("running", flush=True)
                time.sleep(120)

        analyze(_operator(), AnalysisSettings(20, 2, 4, basis_placement="disk", scratch_dir={str(tmp_path)!r}),
                progress=slow)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "running"
        stale = _scratch_files(tmp_path)
        assert len(stale) == 1
        # A file in use (locked by its process) is left alone.
        assert remove_stale_scratch(tmp_path) == [] and stale[0].exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        child.stdout.close()
    assert _scratch_files(tmp_path) == stale  # SIGKILL leaves the file
    analyze(_operator(), AnalysisSettings(10, 2, 4, basis_placement="disk", scratch_dir=str(tmp_path)))
    assert _scratch_files(tmp_path) == []  # the rerun removed the stale file, and its own


def test_auto_placement_and_refusals(tmp_path):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    free = {"device_free": 100, "host_free": 1000, "disk_free_bytes": 10_000}
    assert resolve_basis_placement("auto", 40, cpu, **free).placement == "device"
    assert resolve_basis_placement("auto", 60, gpu, **free).placement == "host"
    assert resolve_basis_placement("auto", 600, gpu, **free).placement == "disk"
    assert resolve_basis_placement("auto", 60, cpu, **free).placement == "disk"  # CPU: host memory is the device's
    with pytest.raises(MemoryError, match="scratch"):
        resolve_basis_placement("auto", 20_000, gpu, **free)
    with pytest.raises(MemoryError, match="host memory"):
        resolve_basis_placement("host", 2000, gpu, **free)
    assert resolve_basis_placement("disk", 60, cpu, **free).reason.startswith("as asked")
    est, choice = plan_bases(1000, AnalysisSettings(scratch_dir=str(tmp_path)), 11, cpu)
    assert est["basis"] == 1000 * 90 * 11 * 8 and choice.placement == "device"
    # basis_device="cpu", the older spelling, still means host memory.
    assert plan_bases(1000, AnalysisSettings(basis_device="cpu"), 11, cpu)[1].placement == "host"
