"""Lanczos on matrices with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessspec.linalg.lanczos import LanczosChains, basis_bytes, lanczos, lanczos_lockstep, lanczos_memory_estimate
from hessspec.linalg.spectrum import quadrature
from tests import reference as ref


def _known(n=60, seed=0):
    ev = np.concatenate([np.linspace(-1.0, 2.0, n - 3), [5.0, 9.0, 20.0]])
    A, U = ref.symmetric_with_spectrum(ev, seed)
    return A, np.sort(ev), U


def _start(n, p, seed=1):
    return torch.randn(n, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_full_length_reproduces_every_eigenvalue():
    A, ev, _ = _known()
    res = lanczos(lambda V: A @ V, _start(len(ev), 3), len(ev))
    q = quadrature(res.alpha.numpy(), res.beta.numpy())
    # m = n: the tridiagonal is similar to A; float64 with full reorthogonalisation keeps every eigenvalue to
    # O(n eps ||A||); 1e-10 relative to ||A|| = 20 is a margin of about 1e3.
    for nodes in q.nodes:
        assert np.max(np.abs(nodes - ev)) <= 1e-10 * np.max(np.abs(ev))
    np.testing.assert_allclose(q.weights.sum(axis=1), 1.0, rtol=0, atol=1e-14)


def test_lanczos_relation_and_orthonormal_basis():
    A, ev, _ = _known()
    n, m, p = len(ev), 25, 3
    res = lanczos(lambda V: A @ V, _start(n, p), m, keep_basis=True)
    assert res.basis.shape == (p, m, n)
    for i in range(p):
        Q = res.basis[i].T
        T = torch.diag(res.alpha[i]) + torch.diag(res.beta[i], 1) + torch.diag(res.beta[i], -1)
        r = res.residuals[:, i]
        E = A @ Q - Q @ T - torch.outer(r, torch.eye(m, dtype=torch.float64)[-1])
        assert float(E.abs().max()) <= 1e-12 * float(A.abs().max())
        assert float((Q.T @ Q - torch.eye(m, dtype=torch.float64)).abs().max()) <= 1e-12
        assert float(torch.linalg.vector_norm(r)) == pytest.approx(float(res.residual_norms[i]), rel=1e-12)
        assert float((Q.T @ r).abs().max()) <= 1e-12 * float(res.residual_norms[i])


def test_first_node_weights_are_the_spectral_measure_of_the_start_vector():
    """Gauss quadrature with m nodes integrates polynomials of degree <= 2m-1 exactly: check v^T A^j v."""
    A, ev, _ = _known()
    v = _start(len(ev), 1)
    v = v / v.norm()
    m = 6
    q = quadrature(*(t.numpy() for t in lanczos(lambda V: A @ V, v, m)[:2]))
    for j in range(2 * m):
        exact = float(v[:, 0] @ torch.linalg.matrix_power(A, j) @ v[:, 0])
        assert (q.weights[0] * q.nodes[0] ** j).sum() == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_breakdown_restarts_and_keeps_multiplicities():
    ev = np.array([0.0] * 5 + [1.0] * 3 + [2.0] * 2 + [3.0])
    A, _ = ref.symmetric_with_spectrum(ev, seed=3)
    n = len(ev)
    res = lanczos(lambda V: A @ V, _start(n, 2), n, keep_basis=True)
    # A start vector sees only 4 distinct eigenvalues: the chain breaks down after 4 steps and restarts.
    assert (res.restarts > 0).all()
    q = quadrature(res.alpha.numpy(), res.beta.numpy())
    for nodes, weights in zip(q.nodes, q.weights, strict=True):
        np.testing.assert_allclose(nodes, ev, atol=1e-12)
        # The restarted blocks carry no quadrature weight: the measure stays that of the start vector.
        assert weights.sum() == pytest.approx(1.0, abs=1e-14)
        assert np.count_nonzero(weights > 1e-20) == 4
    Q = res.basis[0].T
    assert float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).abs().max()) <= 1e-12


def test_without_reorthogonalisation_ghosts_appear():
    """The pitfall in DESIGN.md: plain Lanczos duplicates converged outliers; full reorthogonalisation does not."""
    ev = np.concatenate([np.linspace(0, 1, 400), [10.0, 30.0]])
    A, _ = ref.symmetric_with_spectrum(ev, seed=4)
    v = _start(len(ev), 1)
    plain = quadrature(*(t.numpy() for t in lanczos(lambda V: A @ V, v, 90, reorthogonalize=False)[:2]))
    full = quadrature(*(t.numpy() for t in lanczos(lambda V: A @ V, v, 90)[:2]))
    assert np.sum(np.abs(plain.nodes[0] - 30.0) < 1e-6) >= 2
    assert np.sum(np.abs(full.nodes[0] - 30.0) < 1e-6) == 1


def test_float32_and_host_bases():
    A, ev, _ = _known()
    V0 = _start(len(ev), 2)
    base = lanczos(lambda V: A @ V, V0, 30, keep_basis=True)
    host = lanczos(lambda V: A @ V, V0, 30, keep_basis=True, basis_device="cpu")
    single = lanczos(lambda V: A @ V, V0, 30, keep_basis=True, basis_dtype=torch.float32)
    assert torch.equal(base.alpha, host.alpha)
    assert single.basis.dtype == torch.float32
    # Reorthogonalising against float32-rounded vectors keeps orthogonality at float32 level (~1e-7):
    # the top Ritz values, converged to rounding, agree to that level.
    top = np.sort(quadrature(base.alpha.numpy(), base.beta.numpy()).nodes[0])[-3:]
    top32 = np.sort(quadrature(single.alpha.numpy(), single.beta.numpy()).nodes[0])[-3:]
    np.testing.assert_allclose(top32, top, rtol=1e-6)


def test_same_input_gives_bit_identical_output():
    A, ev, _ = _known()
    a = lanczos(lambda V: A @ V, _start(len(ev), 3), 40)
    b = lanczos(lambda V: A @ V, _start(len(ev), 3), 40)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta)


def test_memory_estimate():
    assert basis_bytes(1000, 90, 10) == 8 * 1000 * 90 * 10
    assert basis_bytes(1000, 90, 10, torch.float32) == 4 * 1000 * 90 * 10
    assert lanczos_memory_estimate(100, 10, 2)["basis"] == 16000


def test_bad_input():
    A, ev, _ = _known()
    n = len(ev)
    mv = lambda V: A @ V  # noqa: E731
    with pytest.raises(ValueError, match="cannot exceed"):
        lanczos(mv, _start(n, 1), n + 1)
    with pytest.raises(ValueError, match="at least one"):
        lanczos(mv, torch.zeros(n, 0, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match=r"shape \[n, p\]"):
        lanczos(mv, torch.ones(n, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="positive integer"):
        lanczos(mv, _start(n, 1), 0)
    with pytest.raises(ValueError, match="non-zero"):
        lanczos(mv, torch.zeros(n, 2, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="non-finite"):
        lanczos(mv, torch.full((n, 1), float("nan"), dtype=torch.float64), 3)
    with pytest.raises(FloatingPointError, match="non-finite values at Lanczos step"):
        lanczos(lambda V: V * float("inf"), _start(n, 1), 3)
    with pytest.raises(ValueError, match="returned shape"):
        lanczos(lambda V: V[:-1], _start(n, 1), 3)


def test_lockstep_groups_equal_separate_runs_with_one_call_per_step():
    """Groups of different dimensions and lengths share one operator call per step; each equals its own run."""
    A1, ev1, _ = _known(60, seed=0)
    A2, ev2, _ = _known(20, seed=5)
    V1, V2 = _start(60, 3), _start(20, 2, seed=2)
    calls = []

    def matmat(blocks):
        calls.append([tuple(b.shape) for b in blocks])
        return [A1 @ blocks[0], A2 @ blocks[1]]

    groups = [LanczosChains(V1, 30, keep_basis=True), LanczosChains(V2, 12, keep_basis=True)]
    r1, r2 = lanczos_lockstep(groups, matmat)
    assert len(calls) == 30
    assert calls[0] == [(60, 3), (20, 2)] and calls[12] == [(60, 3), (20, 0)]
    for res, (A, V, m) in zip([r1, r2], [(A1, V1, 30), (A2, V2, 12)], strict=True):
        alone = lanczos(lambda V, A=A: A @ V, V, m, keep_basis=True)
        assert torch.equal(res.alpha, alone.alpha) and torch.equal(res.beta, alone.beta)
        assert torch.equal(res.basis, alone.basis) and torch.equal(res.residual_norms, alone.residual_norms)
    assert r2.basis.shape == (2, 12, 20)


def test_chains_refuse_misuse():
    A, ev, _ = _known()
    chains = LanczosChains(_start(len(ev), 1), 2)
    with pytest.raises(RuntimeError, match="taken 0 of 2"):
        chains.result()
    chains.advance(A @ chains.current)
    chains.advance(A @ chains.current)
    with pytest.raises(RuntimeError, match="already taken all 2"):
        chains.advance(A @ chains.current)
    with pytest.raises(ValueError, match="2 blocks for 1 groups"):
        lanczos_lockstep([LanczosChains(_start(len(ev), 1), 2)], lambda blocks: [blocks[0], blocks[0]])
