"""Rayleigh-Ritz over the union of all Lanczos chains, against dense eigendecompositions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessspec.analysis import rademacher_probes
from hessspec.linalg import ritz
from hessspec.linalg.lanczos import lanczos
from hessspec.linalg.overlap import ritz_pairs
from hessspec.linalg.ritz import RESIDUAL_TOL, converged_pairs, union_ritz_pairs


def hessian_like(n: int, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix shaped like a network Hessian: a Marchenko-Pastur-like bulk near 0 with a negative part,
    and 10 outliers from 30 down to 3 in random directions."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n // 2)) / np.sqrt(n)
    bulk = 0.5 * X @ X.T - 0.05 * np.eye(n) + 0.02 * np.diag(rng.standard_normal(n))
    U = np.linalg.qr(rng.standard_normal((n, 10)))[0]
    A = bulk + U @ np.diag(np.linspace(30.0, 3.0, 10)) @ U.T
    return torch.tensor(0.5 * (A + A.T))


@pytest.fixture(scope="module")
def problem():
    A = hessian_like(1000)
    evals = torch.linalg.eigvalsh(A).flip(0).numpy()
    res = lanczos(lambda V: A @ V, rademacher_probes(1000, 10, 1), 20, keep_basis=True)
    return A, evals, res


def true_residuals(A: torch.Tensor, pairs) -> np.ndarray:
    Y = pairs.vectors
    return torch.linalg.vector_norm(A @ Y - Y * torch.tensor(pairs.values), dim=0).numpy()


def test_union_pairs_are_true_eigenpair_approximations(problem):
    A, evals, res = problem
    pairs = union_ritz_pairs(res, 20)
    norm = float(np.abs(evals).max())
    # Residuals from the Lanczos relations are the true residuals (measured: 1e-16 relative).
    np.testing.assert_allclose(pairs.residuals, true_residuals(A, pairs), rtol=0, atol=1e-12 * norm)
    Y = pairs.vectors
    np.testing.assert_allclose((Y.T @ Y).numpy(), np.eye(20), atol=1e-8)  # orthonormal to eps / RANK_TOL
    assert np.all(np.diff(pairs.values) <= 0)
    # Every Ritz value is within its residual of an eigenvalue (symmetric A: |lambda - theta| <= r) ...
    nearest = np.abs(pairs.values[:, None] - evals[None, :]).min(axis=1)
    assert np.all(nearest <= pairs.residuals * (1 + 1e-8) + 1e-12 * norm)
    # ... and each converged one is the eigenvalue of its rank (none was skipped above it).
    done = pairs.converged
    assert done[:10].all() and done.sum() >= 14
    np.testing.assert_allclose(pairs.values[done], evals[:20][done], rtol=0, atol=RESIDUAL_TOL * norm)
    np.testing.assert_array_equal(pairs.converged, pairs.residuals <= RESIDUAL_TOL * np.abs(pairs.values).max())


def test_union_converges_more_top_pairs_than_probe_0_alone(problem):
    """Measured at m = 20, p = 10, n = 1000: 17 of the top 20 pairs converged over the union, 11 for probe 0."""
    A, evals, res = problem
    union, single = union_ritz_pairs(res, 20), ritz_pairs(res, 20, chain=0)
    assert int(union.converged.sum()) >= int(single.converged.sum()) + 5
    # The union's Ritz values are closer to the truth everywhere in the top 20 (Rayleigh-Ritz in a larger space
    # containing probe 0's: Cauchy interlacing), up to the rounding of the Gram route (measured: 2e-12 at |A| = 30).
    assert np.all(np.abs(union.values - evals[:20]) <= np.abs(single.values - evals[:20]) + 1e-12 * evals[0])
    # Probe 0's flags follow the same criterion (its own ||A|| estimate) and agree with the true residuals.
    np.testing.assert_allclose(single.residuals, true_residuals(A, single), rtol=1e-6, atol=1e-12 * evals[0])


def test_float32_host_basis_in_small_chunks_gives_the_same_pairs(problem, monkeypatch):
    A, _, res = problem
    reference = union_ritz_pairs(res, 12)
    monkeypatch.setattr(ritz, "_CHUNK_BYTES", 8 * 200 * 37)  # chunks of 37 columns
    chunked = union_ritz_pairs(res, 12)
    np.testing.assert_allclose(chunked.values, reference.values, rtol=1e-13)
    np.testing.assert_allclose(chunked.residuals, reference.residuals, rtol=1e-6, atol=1e-12)
    res32 = lanczos(lambda V: A @ V, rademacher_probes(1000, 10, 1), 20, keep_basis=True, basis_dtype=torch.float32)
    single = union_ritz_pairs(res32, 12)
    # A float32 basis holds the Lanczos relation to ~1e-7 relative: converged values agree to that.
    count = int(reference.converged.sum())
    np.testing.assert_allclose(single.values[:count], reference.values[:count], rtol=1e-5)
    np.testing.assert_array_equal(single.converged[:count], reference.converged[:count])


def test_union_of_more_vectors_than_dimensions_is_exact():
    # p * m = 120 > n = 50: the union spans the whole space (rank truncation of the Gram matrix), so every Ritz
    # pair is an eigenpair.
    A = hessian_like(50, seed=3)
    evals = torch.linalg.eigvalsh(A).flip(0).numpy()
    res = lanczos(lambda V: A @ V, rademacher_probes(50, 6, 2), 20, keep_basis=True)
    pairs = union_ritz_pairs(res, 25)
    np.testing.assert_allclose(pairs.values, evals[:25], atol=1e-10 * evals[0])
    assert pairs.converged.all() and pairs.residuals.max() <= 1e-9 * evals[0]
    with pytest.raises(ValueError, match="dimension of the union"):
        union_ritz_pairs(res, 51)
    with pytest.raises(ValueError, match="keep_basis"):
        union_ritz_pairs(lanczos(lambda V: A @ V, rademacher_probes(50, 2, 2), 5), 2)


def test_converged_pairs_criterion():
    flags = converged_pairs(np.array([1e-6, 0.009, 0.011, np.nan]), 10.0)
    assert flags.tolist() == [True, True, False, False]
