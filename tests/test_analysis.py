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
    result = analyze(op, AnalysisSettings(lanczos_steps=90, probes=10, top_k=20, seed=0, gradient_crosscheck=True))
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


def test_short_run_flags_unconverged_pairs_and_keeps_them_out_of_r_k(digits_problem):
    """A short run (--lanczos-steps 10 --top-k 10): the pairs are flagged by their true residuals, the converged
    ones are the exact eigenvalues of their rank, and r_k over the converged leading pairs is exact.

    Measured here over the union of the 11 chains against probe 0's Krylov space alone (the top pairs before):
    converged top pairs 8/10 vs 1/10 at m = 10, 13/15 vs 5/15 at m = 15, 20/20 vs 8/20 at m = 20, 20/20 vs 11/20
    at m = 30, 20/20 vs 14/20 at m = 45."""
    _, op, H, evals, evecs, g, _ = digits_problem
    r = analyze(op, AnalysisSettings(lanczos_steps=10, probes=10, top_k=10, seed=0))
    assert r.top_converged.dtype == bool and r.top_converged.shape == (10,)
    exact = evals[:10].numpy()
    norm = float(evals.abs().max())
    np.testing.assert_array_equal(r.top_converged, r.top_residuals <= 1e-3 * np.abs(r.nodes).max())
    done = r.top_converged
    assert 6 <= done.sum() < 10 and done[0]
    np.testing.assert_allclose(r.top_eigenvalues[done], exact[done], rtol=0, atol=1e-3 * norm)
    nearest = np.abs(r.top_eigenvalues[:, None] - evals.numpy()[None, :]).min(axis=1)
    assert np.all(nearest <= r.top_residuals * (1 + 1e-6))  # |lambda - theta| <= ||H y - theta y||
    k = r.trusted_rank()
    assert 1 <= k < 10 and done[:k].all() and not done[k]
    exact_ratio = np.cumsum(((evecs[:, :k].T @ g) ** 2 / (g @ g)).numpy())
    np.testing.assert_allclose(r.overlap_ratio[:k], exact_ratio, atol=1e-3)


def test_top_k_the_krylov_spaces_cannot_resolve_is_refused():
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    op = HessianOperator(ref.tiny_mlp(False), [(x, y)])
    settings = AnalysisSettings(lanczos_steps=20, probes=1, top_k=20, gradient_crosscheck=False)
    with pytest.raises(ValueError, match=r"top_k must lie in 1\.\.10: 1 chain\(s\) of 20 Lanczos steps"):
        analyze(op, settings)
    assert analyze(
        op, AnalysisSettings(lanczos_steps=20, probes=1, top_k=10, gradient_crosscheck=False)
    ).top_converged.shape == (10,)


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
    assert r.settings["block_strategy"] == "traced"  # resolved from "auto" (an MLP)


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


def test_float32_model_keeps_the_top_eigenvalues(digits_problem):
    """The model in float32 (products accumulated and Lanczos in float64): the top-10 eigenvalues within 1e-5
    relative of the exact float64 ones (the README's precision table gives the measured errors)."""
    model, op, _, evals, *_ = digits_problem
    op32 = HessianOperator(model, op.batches, dtype=torch.float32)
    settings = AnalysisSettings(
        lanczos_steps=90, probes=1, top_k=10, gradient_crosscheck=False, determinism_check=False
    )
    r = analyze(op32, settings)
    assert r.dtype == "float32"
    np.testing.assert_allclose(r.top_eigenvalues, evals[:10].numpy(), rtol=1e-5)
