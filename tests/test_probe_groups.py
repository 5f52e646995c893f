"""Probes depend on (seed, i) alone, and running the chains in groups (--probes-per-pass) changes no stored number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessspec.analysis import AnalysisSettings, analyze, rademacher_probes
from hessspec.curvature.hessian import HessianOperator
from hessspec.linalg.lanczos import chain_groups, lanczos, stream_seed
from tests import reference as ref

_FIELDS = ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2", "gradient_nodes")


def _assert_same(a, b) -> None:
    for name in _FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.trace == b.trace and a.trace_stderr == b.trace_stderr and a.loss == b.loss


def _problem(model_fn, bn: bool, strategy: str) -> HessianOperator:
    torch.manual_seed(3)
    model = model_fn(bn)
    shape = (1, 6, 6) if model_fn is ref.tiny_cnn else (6,)
    x = torch.randn(45, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (45,))
    return HessianOperator(model, ref.make_batches(x, y, 16), block_strategy=strategy)


def test_probe_i_depends_on_seed_and_i_alone():
    few, more = rademacher_probes(101, 2, seed=5), rademacher_probes(101, 4, seed=5)
    assert torch.equal(few, more[:, :2])
    assert not torch.equal(rademacher_probes(101, 2, seed=6), few)
    assert set(torch.unique(few * np.sqrt(101)).tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="non-negative"):
        stream_seed(-1, 0)


def test_chain_groups():
    assert chain_groups(5, None) == [range(0, 5)]
    assert chain_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert chain_groups(3, 7) == [range(0, 3)]


@pytest.mark.parametrize("strategy", ["reverse", "loop"])
@pytest.mark.parametrize(("model_fn", "bn"), [(ref.tiny_mlp, True), (ref.tiny_cnn, False)])
def test_probes_per_pass_changes_no_bit(model_fn, bn, strategy):
    op = _problem(model_fn, bn, strategy)
    settings = AnalysisSettings(lanczos_steps=24, probes=4, top_k=6, seed=2, gradient_crosscheck=True)
    whole = analyze(op, settings)
    for group in (1, 2, 3):
        grouped = analyze(op, AnalysisSettings(24, 4, 6, seed=2, probes_per_pass=group, gradient_crosscheck=True))
        _assert_same(whole, grouped)


def test_probes_per_pass_progress_counts_every_pass():
    op = _problem(ref.tiny_mlp, False, "reverse")
    seen = []
    analyze(
        op,
        AnalysisSettings(10, 3, 4, probes_per_pass=2, gradient_crosscheck=True),
        progress=lambda done, total: seen.append((done, total)),
    )
    # 3 probes + the gradient chain in groups of 2: two groups of 10 steps.
    assert seen[-1] == (20, 20) and len(seen) == 20


def test_more_probes_extend_fewer():
    op = _problem(ref.tiny_mlp, True, "reverse")
    two = analyze(op, AnalysisSettings(20, 2, 5, seed=4, gradient_crosscheck=True))
    three = analyze(op, AnalysisSettings(20, 3, 5, seed=4, gradient_crosscheck=True))
    assert np.array_equal(two.nodes, three.nodes[:2]) and np.array_equal(two.weights, three.weights[:2])
    # The top pairs come from the union of all chains' Krylov spaces: a third chain enlarges it, so each top Ritz
    # value can only rise towards its eigenvalue (Cauchy interlacing), up to what the union drops as dependent
    # directions (Gram eigenvalues below RANK_TOL = 1e-8 of the largest: Ritz values move by ~1e-8 ||H||; measured
    # here: a fall of 3e-9 at ||H|| = 1.8, on a pair with residual 7e-5).
    scale = np.abs(two.top_eigenvalues).max()
    assert np.all(three.top_eigenvalues >= two.top_eigenvalues - 1e-8 * scale)
    assert np.array_equal(two.gradient_nodes, three.gradient_nodes)


def test_vmap_grouping_changes_rounding_only():
    # vmap evaluates a group's columns in batched kernels whose rounding depends on the group's width.
    op = _problem(ref.tiny_mlp, True, "vmap")
    whole = analyze(op, AnalysisSettings(24, 4, 6, seed=2))
    grouped = analyze(op, AnalysisSettings(24, 4, 6, seed=2, probes_per_pass=3))
    scale = np.max(np.abs(whole.nodes))
    np.testing.assert_allclose(grouped.nodes, whole.nodes, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(grouped.top_eigenvalues[:3], whole.top_eigenvalues[:3], rtol=1e-10)


def test_grouped_breakdowns_restart_alike():
    # Repeated eigenvalues make every chain break down and restart from its own random stream.
    ev = np.array([0.0] * 5 + [1.0] * 3 + [2.0] * 2 + [3.0])
    A, _ = ref.symmetric_with_spectrum(ev, seed=3)
    V0 = torch.randn(len(ev), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = lanczos(lambda V: A @ V, V0, len(ev), keep_basis=True, restart_seeds=[7, 8, 9])
    assert (whole.restarts > 0).all()

    def columns(V):
        return torch.stack([A @ V[:, i].contiguous() for i in range(V.shape[1])], dim=1)

    for group in (1, 2):
        # Column by column, so that the product of each column does not depend on the group (a BLAS gemm may).
        a = lanczos(columns, V0, len(ev), keep_basis=True, restart_seeds=[7, 8, 9], chains_per_pass=group)
        b = lanczos(columns, V0, len(ev), keep_basis=True, restart_seeds=[7, 8, 9])
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta) and torch.equal(a.basis, b.basis)
        assert torch.equal(a.restarts, whole.restarts)


def test_probes_per_pass_with_curvatures_and_blocks():
    from hessspec.analysis import analyze_many
    from hessspec.curvature.gauss_newton import CurvatureOperator

    torch.manual_seed(3)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    op = CurvatureOperator(ref.tiny_mlp(True), ref.make_batches(x, y, 16), block_strategy="reverse")
    settings = AnalysisSettings(12, 3, 4, seed=1, curvatures=("hessian", "ggn"), blocks=("modules",))
    whole = analyze_many(op, settings)
    grouped = analyze_many(
        op, AnalysisSettings(12, 3, 4, seed=1, curvatures=("hessian", "ggn"), blocks=("modules",), probes_per_pass=2)
    )
    assert [(r.curvature, r.block) for r in whole] == [(r.curvature, r.block) for r in grouped]
    for a, b in zip(whole, grouped, strict=True):
        for name in _FIELDS[:-1]:
            assert np.array_equal(getattr(a, name), getattr(b, name)), (a.curvature, a.block, name)
