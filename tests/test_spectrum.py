"""Quadrature, density, trace and outliers on matrices with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from hessspec.analysis import rademacher_probes
from hessspec.linalg import spectrum
from hessspec.linalg.lanczos import lanczos
from tests import reference as ref


def test_single_node_density_is_the_papers_gaussian():
    nodes = np.array([[0.0, 3.0]])
    weights = np.array([[0.25, 0.75]])
    d = spectrum.density(nodes, weights, sigma2=1e-3, num_points=20001)
    s2 = 1e-3 * max(1.0, 3.0)  # the paper's convention: sigma^2 * max(1, width)
    assert d.sigma2 == pytest.approx(s2)
    expected = (0.25 * np.exp(-0.5 * d.grid**2 / s2) + 0.75 * np.exp(-0.5 * (d.grid - 3) ** 2 / s2)) / np.sqrt(
        2 * np.pi * s2
    )
    # The grid covers >= 5 kernel widths on each side, so the normalisation changes the values by < 1e-6.
    np.testing.assert_allclose(d.values, expected, rtol=1e-6, atol=1e-12)
    assert np.trapezoid(d.values, d.grid) == pytest.approx(1.0, abs=1e-12)


def test_narrow_width_uses_unit_floor():
    d = spectrum.density(np.array([[0.1, 0.2]]), np.array([[0.5, 0.5]]))
    assert d.sigma2 == pytest.approx(1e-5)


def test_moments_and_trace_are_exact_per_probe():
    ev = np.linspace(-2, 5, 80)
    A, _ = ref.symmetric_with_spectrum(ev, seed=2)
    g = torch.Generator().manual_seed(0)
    Z = (torch.randint(0, 2, (80, 4), generator=g) * 2 - 1).double()
    res = lanczos(lambda V: A @ V, Z / np.sqrt(80), 10)
    q = spectrum.quadrature(res.alpha.numpy(), res.beta.numpy())
    hutch = torch.einsum("ip,ij,jp->p", Z, A, Z).numpy()  # z^T A z per probe
    tr, se = spectrum.trace_estimate(q.nodes, q.weights, 80)
    assert tr == pytest.approx(hutch.mean(), rel=1e-12)
    assert se == pytest.approx(hutch.std(ddof=1) / 2, rel=1e-10)
    mean, _ = spectrum.moments(q.nodes, q.weights, orders=3)
    A2 = torch.einsum("ip,ij,jp->p", Z, A @ A, Z).numpy() / 80
    assert mean[1] == pytest.approx(A2.mean(), rel=1e-12)


def test_negative_mass():
    nodes = np.array([[-1.0, 0.0, 2.0], [-0.5, 1.0, 3.0]])
    weights = np.array([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    assert spectrum.negative_mass(nodes, weights) == pytest.approx(0.3)
    assert spectrum.negative_mass(nodes, weights, threshold=0.7) == pytest.approx(0.1)
    # Below -0.01 * ||H|| = -0.03: probe 0 has -1.0 (0.2), probe 1 has -0.5 (0.4).
    assert spectrum.clear_negative_mass(nodes, weights) == pytest.approx(0.3)
    # At 0: probe 0 has 0.2 below, nearest below -1.0 (0.2), nearest above 0.0 (0.3): [0, 0.5]; probe 1: [0, 0.8].
    assert spectrum.negative_mass_bounds(nodes, weights) == pytest.approx((0.0, 0.65))


def _cluster_at_zero(shift: float, n: int = 3000, seed: int = 0) -> np.ndarray:
    """Eigenvalues of a network-like Hessian: 2/3 of them in a cluster of width 1e-4 at ``shift``, a negative
    tail (13%), a positive bulk and 10 outliers up to 20."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            shift + 1e-4 * rng.uniform(0, 1, 2000),
            -rng.uniform(0.05, 1.0, 400),
            rng.uniform(0.05, 2.0, 590),
            np.geomspace(20.0, 3.0, 10),
        ]
    )


def test_clear_negative_mass_is_stable_where_the_mass_below_zero_flips():
    """One quadrature node holds the cluster at 0 (~68% of the weight): moving the cluster from +0.002 to -0.002
    moves that node across 0, and the mass below 0 jumps from ~0.12 to ~0.80. The mass below -0.01 ||H|| does not
    move, and it and the Chebyshev-Markov-Stieltjes bounds contain the exact fractions of these diagonal
    matrices (whose Rademacher spectral measures are exactly uniform over the eigenvalues)."""
    probes = rademacher_probes(3000, 5, 0)
    figures = {}
    for shift in (0.002, -0.002):
        eigenvalues = _cluster_at_zero(shift)
        diagonal = torch.tensor(eigenvalues)
        res = lanczos(lambda V, d=diagonal: d[:, None] * V, probes, 30)
        q = spectrum.quadrature(res.alpha.numpy(), res.beta.numpy())
        threshold = 0.01 * np.abs(eigenvalues).max()
        below_zero, clearly_below = np.mean(eigenvalues < 0), np.mean(eigenvalues < -threshold)
        lower, upper = spectrum.negative_mass_bounds(q.nodes, q.weights, threshold=threshold)
        assert lower <= clearly_below <= upper
        lower, upper = spectrum.negative_mass_bounds(q.nodes, q.weights)
        assert lower - 1e-12 <= below_zero <= upper + 1e-12
        figures[shift] = (spectrum.negative_mass(q.nodes, q.weights), spectrum.clear_negative_mass(q.nodes, q.weights))
        assert spectrum.clear_negative_mass(q.nodes, q.weights) == pytest.approx(clearly_below, abs=0.02)
    (old_up, new_up), (old_down, new_down) = figures[0.002], figures[-0.002]
    assert abs(old_up - old_down) > 0.5  # the figure the issue saw flip
    assert abs(new_up - new_down) < 1e-3


@pytest.fixture(scope="module")
def spiked_wishart():
    """Sample covariance of n = 1000 variables from N = 4000 draws, three population spikes.

    Known spectrum: a Marchenko-Pastur bulk on [(1 - sqrt(g))^2, (1 + sqrt(g))^2] with g = n/N = 0.25, and for a
    spike l > sqrt(g) an outlier at (1 + l)(1 + g/l) (Baik, Ben Arous & Peche 2005) with finite-N standard
    deviation sqrt(2 (1 + l)^2 (1 - g/l^2) / N) (Paul 2007).
    """
    n, N = 1000, 4000
    spikes = np.array([3.0, 6.0, 10.0])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, N, dtype=torch.float64, generator=g)
    X[:3] *= torch.tensor(np.sqrt(1 + spikes))[:, None]
    S = X @ X.T / N
    Z = (torch.randint(0, 2, (n, 10), generator=g) * 2 - 1).double() / np.sqrt(n)
    res = lanczos(lambda V: S @ V, Z, 90)
    q = spectrum.quadrature(res.alpha.numpy(), res.beta.numpy())
    return S, spikes, n / N, q


def test_spiked_wishart_outliers_are_recovered(spiked_wishart):
    S, spikes, gamma, q = spiked_wishart
    n = S.shape[0]
    exact = np.linalg.eigvalsh(S.numpy())
    top = np.sort(q.nodes[0])[::-1][:3]
    # Converged outliers: equal to the exact eigenvalues of this matrix to rounding.
    np.testing.assert_allclose(top, exact[::-1][:3], rtol=1e-10)
    # And to the analytic positions within 4 finite-N standard deviations.
    analytic = ((1 + spikes) * (1 + gamma / spikes))[::-1]
    sd = np.sqrt(2 * (1 + spikes) ** 2 * (1 - gamma / spikes**2) / S.shape[1])[::-1]
    assert np.all(np.abs(top - analytic) <= 4 * sd)
    edge = spectrum.bulk_edge(q.nodes, q.weights, n)
    # The edge-finding kernel is a quarter of the mean Ritz spacing wide; one eigenvalue's Gaussian falls to 1% of
    # its peak (the level) sqrt(2 ln 100) = 3.03 widths away, so the edge lies within [0, 3.03] widths above the
    # largest bulk eigenvalue of this very matrix (measured: 2.86), and ~0.08 above the asymptotic MP edge 2.25.
    width = 0.25 * (q.nodes.max() - q.nodes.min()) / q.nodes.shape[1]
    assert 0.0 <= edge - exact[-4] <= np.sqrt(2 * np.log(100)) * width
    assert (1 + np.sqrt(gamma)) ** 2 < edge < exact[-3]
    assert spectrum.count_outliers(np.sort(q.nodes[0])[::-1][:10], q.nodes, q.weights, n) == 3


def test_spiked_wishart_density_matches_marchenko_pastur(spiked_wishart):
    S, spikes, gamma, q = spiked_wishart
    n = S.shape[0]
    exact = np.linalg.eigvalsh(S.numpy())
    width = exact[-1] - exact[0]
    w1 = ref.wasserstein1(q.nodes, q.weights, exact, np.ones(n))
    assert w1 <= 0.01 * width  # the bound; measured 7e-4 of the width
    a, b = (1 - np.sqrt(gamma)) ** 2, (1 + np.sqrt(gamma)) ** 2
    x = np.linspace(a, b, 200_001)
    cdf = np.cumsum(np.sqrt(np.maximum((b - x) * (x - a), 0)) / (2 * np.pi * gamma * x))
    quantiles = np.interp((np.arange(n - 3) + 0.5) / (n - 3), cdf / cdf[-1], x)
    law = np.concatenate([quantiles, (1 + spikes) * (1 + gamma / spikes)])
    assert ref.wasserstein1(q.nodes, q.weights, law, np.ones(n)) <= 0.01 * width
    tr, se = spectrum.trace_estimate(q.nodes, q.weights, n)
    assert abs(tr - float(torch.trace(S))) <= 4 * se


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        spectrum.density(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        spectrum.density(np.array([[np.nan]]), np.array([[1.0]]))
    with pytest.raises(ValueError, match="positive"):
        spectrum.density(np.array([[0.0]]), np.array([[1.0]]), sigma2=0)
    with pytest.raises(ValueError, match="alpha"):
        spectrum.tridiagonal_eigh(np.zeros(3), np.zeros(3))


def test_outliers_above_a_smoothly_decaying_bulk():
    """A bulk whose density decays smoothly into a sparse tail (quantiles of Beta(1, 6) on [0, 10], like the tail of
    a trained network's spectrum) plus three spikes. With the paper's narrow kernel alone, the density between the
    tail's Ritz values is a comb and the edge falls at 6.8, counting 6 outliers; the edge kernel (a quarter of the
    mean Ritz spacing) finds exactly the three spikes."""
    n = 3000
    bulk = 10 * scipy.stats.beta(1, 6).ppf((np.arange(n - 3) + 0.5) / (n - 3))
    eigenvalues = np.concatenate([bulk, [25.0, 35.0, 50.0]])
    D = torch.tensor(eigenvalues)
    g = torch.Generator().manual_seed(0)
    Z = (torch.randint(0, 2, (n, 5), generator=g) * 2 - 1).double() / np.sqrt(n)
    res = lanczos(lambda V: D[:, None] * V, Z, 60)
    q = spectrum.quadrature(res.alpha.numpy(), res.beta.numpy())
    top = np.sort(eigenvalues)[::-1][:20]
    edge = spectrum.bulk_edge(q.nodes, q.weights, n)
    assert bulk.max() < edge < 25.0
    assert spectrum.count_outliers(top, q.nodes, q.weights, n) == 3
    assert spectrum.count_outliers(top, q.nodes, q.weights, n, resolution=0.0) > 3  # the comb, for contrast


def test_js_distance_definition_and_limits():
    from scipy.spatial.distance import jensenshannon

    from hessspec.linalg.spectrum import default_grid, density, js_distance, pairwise_js_distances

    rng = np.random.default_rng(0)
    a_nodes, a_weights = rng.normal(0, 1, (3, 20)), rng.dirichlet(np.ones(20), 3)
    b_nodes, b_weights = rng.normal(0.5, 2, (3, 20)), rng.dirichlet(np.ones(20), 3)
    assert js_distance(a_nodes, a_weights, a_nodes, a_weights) == pytest.approx(0.0, abs=1e-7)
    d = js_distance(a_nodes, a_weights, b_nodes, b_weights)
    assert 0 < d < 1 and d == pytest.approx(js_distance(b_nodes, b_weights, a_nodes, a_weights), rel=1e-12)
    # The definition, evaluated independently: scipy's Jensen-Shannon distance (base 2) of the two densities
    # smoothed with the kernel of the union's width on the union's grid.
    union = np.concatenate([a_nodes.ravel(), b_nodes.ravel()])
    s2 = 1e-5 * np.ptp(union)
    grid = default_grid(union, 1e-5)
    pa = density(a_nodes, a_weights, sigma2=s2 / np.ptp(a_nodes), grid=grid).values
    pb = density(b_nodes, b_weights, sigma2=s2 / np.ptp(b_nodes), grid=grid).values
    pa, pb = np.where(pa > 1e-300, pa, 0.0), np.where(pb > 1e-300, pb, 0.0)  # scipy's m underflows on denormals
    assert d == pytest.approx(float(jensenshannon(pa, pb, base=2)), rel=1e-9)
    # Far apart (disjoint supports): 1; nearer: smaller.
    far = js_distance(a_nodes, a_weights, a_nodes + 100.0, a_weights)
    near = js_distance(a_nodes, a_weights, a_nodes + 0.01, a_weights)
    assert far == pytest.approx(1.0, abs=1e-9) and near < far
    matrix = pairwise_js_distances([(a_nodes, a_weights), (b_nodes, b_weights), (a_nodes + 100.0, a_weights)])
    assert matrix.shape == (3, 3) and np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    assert matrix[0, 1] == pytest.approx(d, rel=1e-12)
