"""SLQ end to end on a few-thousand-parameter network, against its exact Hessian spectrum."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hessspec.analysis import AnalysisSettings, analyze, check_memory, rademacher_probes
from hessspec.curvature.hessian import HessianOperator
from hessspec.linalg.overlap import measure_mass_above
from tests import reference as ref


@pytest.fixture(scope="module")
def digits_problem():
    """A 64-32-32-10 tanh MLP (3,466 parameters) after 200 SGD steps on scikit-learn's digits, batches of 500.

    The exact Hessian (3,466^2, from the operator validated in test_operators) is diagonalised once.
    """
    model, x, y = ref.trained_digits_mlp(32)
    op = HessianOperator(model, ref.make_batches(x, y, 500))
    H = op.to_dense()
    evals, evecs = torch.linalg.eigh(H)
    result = analyze(op, AnalysisSettings(lanczos_steps=90, probes=10, top_k=20, seed=0))
    gradient = op.loss_and_gradient().gradient
    return model, op, H, evals.flip(0), evecs.flip(1), gradient, result


def test_top_eigenvalues_match_exact(digits_problem):
    *_, evals, _, _, r = digits_problem
    # Outliers converge geometrically in Lanczos; at m = 90 the top 10 agree to rounding (measured: < 5e-15).
    np.testing.assert_allclose(r.top_eigenvalues[:10], evals[:10].numpy(), rtol=1e-8)
    assert np.all(np.diff(r.top_eigenvalues) <= 0)
    converged = r.top_residuals[:10] <= 1e-8 * r.top_eigenvalues[0]
    assert converged.all()


def test_residuals_are_true_residuals(digits_problem):
    model, op, H, *_ = digits_problem
    from hessspec.linalg.lanczos import lanczos
    from hessspec.linalg.overlap import ritz_pairs

    res = lanczos(lambda V: H @ V, rademacher_probes(op.n, 1, 0), 30, keep_basis=True)
    pairs = ritz_pairs(res, 10)
    true = torch.linalg.vector_norm(H @ pairs.vectors - pairs.vectors * torch.tensor(pairs.values), dim=0)
    # The residual estimate beta_m |s_mi| equals the true residual up to rounding of the products.
    np.testing.assert_allclose(pairs.residuals, true.numpy(), rtol=1e-6, atol=1e-13 * pairs.values[0])


def test_overlap_matches_exact(digits_problem):
    *_, evals, evecs, g, r = digits_problem
    exact_cos2 = ((evecs[:, :20].T @ g) ** 2 / (g @ g)).numpy()
    exact_ratio = np.cumsum(exact_cos2)
    np.testing.assert_allclose(r.overlap_ratio[:10], exact_ratio[:10], atol=1e-6)
    np.testing.assert_allclose(r.cos2[:10], exact_cos2[:10], atol=1e-6)
    assert r.overlap_k.tolist() == list(range(1, 21))
    # Cross-check: the Lanczos chain started from g puts the same mass on the converged outliers.
    for k in (1, 5, 10):
        threshold = 0.5 * (evals[k - 1] + evals[k]).item()
        assert measure_mass_above(r.gradient_nodes, r.gradient_weights, threshold) == pytest.approx(
            exact_ratio[k - 1], abs=1e-6
        )


def test_density_and_trace_match_exact(digits_problem):
    _, op, H, evals, *_, r = digits_problem
    width = float(evals[0] - evals[-1])
    w1 = ref.wasserstein1(r.nodes, r.weights, evals.numpy(), np.ones(op.n))
    assert w1 <= 0.01 * width
    assert abs(r.trace - float(torch.trace(H))) <= 4 * r.trace_stderr
    np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, atol=1e-13)


def test_negative_mass_obeys_chebyshev_markov_stieltjes_bounds(digits_problem):
    """Gauss quadrature brackets each probe's distribution function (Chebyshev-Markov-Stieltjes): for x between
    the nodes theta_k < x < theta_{k+1}, sum_{j<k} tau_j <= F_v(x) <= sum_{j<=k+1} tau_j. The quadrature's negative
    mass is therefore exact up to the weights of the two nodes around 0 (where a network Hessian's cluster sits)."""
    _, op, _, evals, evecs, _, r = digits_problem
    V = rademacher_probes(op.n, 10, 0)
    exact = ((evecs[:, evals < 0].T @ V) ** 2).sum(0).numpy()  # F_v(0-) for each probe
    for nodes, weights, f in zip(r.nodes, r.weights, exact, strict=True):
        negative = nodes < 0
        mass = weights[negative].sum()
        lower = mass - (weights[negative][np.argmax(nodes[negative])] if negative.any() else 0.0)
        upper = mass + (weights[~negative][np.argmin(nodes[~negative])] if (~negative).any() else 0.0)
        assert lower - 1e-12 <= f <= upper + 1e-12
    assert r.negative_mass() == float((r.weights * (r.nodes < 0)).sum(axis=1).mean())


def test_result_metadata(digits_problem):
    model, op, *_, r = digits_problem
    assert r.nodes.shape == r.weights.shape == (10, 90)
    assert r.n_params == op.n == 3466 and r.n_samples == 1797
    assert r.bn_mode == "train" and r.dtype == "float64" and r.device == "cpu"
    assert r.loss > 0 and r.grad_norm > 0
    assert set(r.timings) >= {"gradient", "lanczos", "hvp"} and r.elapsed_s > 0
    assert r.settings["lanczos_steps"] == 90 and r.settings["probes"] == 10
    assert r.settings["block_strategy"] == "vmap"  # resolved from "auto" (an MLP)


def test_same_seed_is_bit_identical_and_model_untouched():
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    torch.manual_seed(1)
    model = ref.tiny_mlp(True)
    ref.warm_running_stats(model, x)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    settings = AnalysisSettings(lanczos_steps=20, probes=3, top_k=5, seed=7)
    a = analyze(HessianOperator(model, ref.make_batches(x, y, 16)), settings)
    b = analyze(HessianOperator(model, ref.make_batches(x, y, 16)), settings)
    for field in ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.trace == b.trace and a.seed == 7
    c = analyze(HessianOperator(model, ref.make_batches(x, y, 16)), AnalysisSettings(20, 3, 5, seed=8))
    assert not np.array_equal(a.nodes, c.nodes)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_settings():
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = HessianOperator(ref.tiny_mlp(False), [(x, y)])
    with pytest.raises(ValueError, match="lanczos_steps"):
        analyze(op, AnalysisSettings(lanczos_steps=op.n + 1))
    with pytest.raises(ValueError, match="probes"):
        analyze(op, AnalysisSettings(lanczos_steps=10, probes=0))
    with pytest.raises(ValueError, match="top_k"):
        analyze(op, AnalysisSettings(lanczos_steps=10, top_k=11))
    with pytest.raises(ValueError, match="basis_dtype"):
        analyze(op, AnalysisSettings(lanczos_steps=10, top_k=5, basis_dtype="float16"))
    with pytest.raises(MemoryError, match="GiB"):
        check_memory(10**9, AnalysisSettings(), 11, torch.device("cpu"))
