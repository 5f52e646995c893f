"""Gauss quadrature from Lanczos tridiagonals, and what derives from it.

Everything here is NumPy/SciPy: nodes and weights are small ([p, m]); the store and the plots use these functions
without importing torch.

For one probe ``v`` (unit norm) and Lanczos tridiagonal ``T`` of size ``m``, the ``m``-point Gauss quadrature of
the spectral measure ``mu_v = sum_i (u_i^T v)^2 delta(lambda - lambda_i)`` has nodes ``theta_j`` (eigenvalues of
``T``) and weights ``tau_j = s_{1j}^2`` (squared first components of ``T``'s eigenvectors) [Golub & Meurant 2010;
Ghorbani, Krishnan & Xiao 2019, Sec. 2]. Averaging over random probes estimates the eigenvalue density
``phi(lambda) = (1/n) sum_i delta(lambda - lambda_i)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

# Ghorbani, Krishnan & Xiao (2019), Sec. 2: Gaussian kernel with variance sigma^2 * max(1, lambda_max - lambda_min)
# and sigma^2 = 1e-5; google/spectral-density uses the same.
DEFAULT_SIGMA2 = 1e-5


class Quadrature(NamedTuple):
    """Gauss quadrature of each probe's spectral measure.

    Attributes:
        nodes: float64 [p, m], eigenvalues of each tridiagonal (ascending).
        weights: float64 [p, m], squared first components of the eigenvectors; each row sums to 1.
    """

    nodes: np.ndarray
    weights: np.ndarray


class Density(NamedTuple):
    """A smoothed eigenvalue density on a grid.

    Attributes:
        grid: float64 [g], eigenvalue grid (ascending).
        values: float64 [g], density values; ``trapz(values, grid) == 1``.
        sigma2: the kernel variance actually used (sigma^2 * max(1, lambda_max - lambda_min)).
    """

    grid: np.ndarray
    values: np.ndarray
    sigma2: float


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of one symmetric tridiagonal matrix.

    Args:
        alpha: [m] diagonal.
        beta: [m-1] off-diagonal.

    Returns:
        ``(theta, S)``: eigenvalues ascending [m] and orthonormal eigenvectors as columns [m, m].
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.ndim != 1 or beta.shape != (max(len(alpha) - 1, 0),):
        msg = f"expected alpha [m] and beta [m-1]; got {alpha.shape} and {beta.shape}"
        raise ValueError(msg)
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    # LAPACK's stemr (MRRR) gives orthogonal eigenvectors of a symmetric tridiagonal in O(m^2).
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta, lapack_driver="stemr")
    return theta, S


def quadrature(alpha: np.ndarray, beta: np.ndarray) -> Quadrature:
    """Gauss quadrature nodes and weights from a batch of tridiagonals.

    Args:
        alpha: float [p, m] diagonals.
        beta: float [p, m-1] off-diagonals.

    Returns:
        :class:`Quadrature` with nodes and weights of shape [p, m].
    """
    alpha = np.atleast_2d(np.asarray(alpha, dtype=np.float64))
    beta = np.asarray(beta, dtype=np.float64).reshape(alpha.shape[0], -1)
    nodes = np.empty_like(alpha)
    weights = np.empty_like(alpha)
    for i in range(alpha.shape[0]):
        theta, S = tridiagonal_eigh(alpha[i], beta[i])
        nodes[i] = theta
        weights[i] = S[0] ** 2
    return Quadrature(nodes, weights)


def _check_quadrature(nodes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if nodes.shape != weights.shape:
        msg = f"nodes and weights must have the same shape; got {nodes.shape} and {weights.shape}"
        raise ValueError(msg)
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        msg = "nodes and weights must be finite"
        raise ValueError(msg)
    return nodes, weights


def kernel_variance(nodes: np.ndarray, sigma2: float = DEFAULT_SIGMA2) -> float:
    """The paper's kernel variance: ``sigma2 * max(1, lambda_max - lambda_min)`` over all nodes."""
    nodes = np.asarray(nodes)
    return float(sigma2 * max(1.0, float(nodes.max() - nodes.min())))


def default_grid(nodes: np.ndarray, sigma2: float = DEFAULT_SIGMA2, num_points: int = 10_000) -> np.ndarray:
    """A grid covering all nodes with a margin of 1% of the width plus five kernel widths on either side."""
    lo, hi = float(np.min(nodes)), float(np.max(nodes))
    margin = 0.01 * (hi - lo) + 5.0 * np.sqrt(kernel_variance(nodes, sigma2))
    return np.linspace(lo - margin, hi + margin, num_points)


def density(
    nodes: np.ndarray,
    weights: np.ndarray,
    sigma2: float = DEFAULT_SIGMA2,
    grid: np.ndarray | None = None,
    num_points: int = 10_000,
) -> Density:
    """Eigenvalue density as a mixture of Gaussians centred on the quadrature nodes.

    ``phi(t) = (1/p) sum_probes sum_j tau_j N(t; theta_j, s^2)`` with ``s^2 = sigma2 * max(1, width)``, the
    convention of Ghorbani et al. (2019, Sec. 2), normalised so that it integrates to 1 on the grid.

    Args:
        nodes: [p, m] or [m] quadrature nodes.
        weights: same shape, quadrature weights.
        sigma2: relative kernel variance (default 1e-5, as in the paper).
        grid: evaluation points (ascending); default :func:`default_grid`.
        num_points: size of the default grid.

    Returns:
        :class:`Density`.
    """
    nodes, weights = _check_quadrature(nodes, weights)
    if sigma2 <= 0:
        msg = f"sigma2 must be positive; got {sigma2}"
        raise ValueError(msg)
    s2 = kernel_variance(nodes, sigma2)
    grid = default_grid(nodes, sigma2, num_points) if grid is None else np.asarray(grid, dtype=np.float64)
    values = np.zeros_like(grid)
    w = weights.ravel() / nodes.shape[0]
    x = nodes.ravel()
    norm = 1.0 / np.sqrt(2.0 * np.pi * s2)
    # Chunk the nodes so that memory stays O(len(grid) * chunk).
    chunk = max(1, 2_000_000 // max(1, len(grid)))
    for start in range(0, len(x), chunk):
        d = grid[:, None] - x[None, start : start + chunk]
        values += (np.exp(-0.5 * d * d / s2) * w[None, start : start + chunk]).sum(axis=1) * norm
    total = np.trapezoid(values, grid) if hasattr(np, "trapezoid") else np.trapz(values, grid)  # noqa: NPY201
    if total > 0:
        values = values / total
    return Density(grid, values, s2)


def moments(nodes: np.ndarray, weights: np.ndarray, orders: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectral moments ``tr(H^j)/n`` for ``j = 1..orders``, with standard errors across probes.

    Each probe's quadrature is exact for polynomials of degree ``<= 2m-1``, so for ``j < 2m`` the only error is
    the Hutchinson sampling error [Ubaru, Chen & Saad 2017].

    Returns:
        ``(mean, stderr)`` of shape [orders].
    """
    nodes, weights = _check_quadrature(nodes, weights)
    per_probe = np.stack([(weights * nodes**j).sum(axis=1) for j in range(1, orders + 1)], axis=1)
    mean = per_probe.mean(axis=0)
    p = per_probe.shape[0]
    stderr = per_probe.std(axis=0, ddof=1) / np.sqrt(p) if p > 1 else np.full(orders, np.nan)
    return mean, stderr


def trace_estimate(nodes: np.ndarray, weights: np.ndarray, n: int) -> tuple[float, float]:
    """Hutchinson estimate of ``tr(H)`` and its standard error across probes.

    With unit probes ``v = z / sqrt(n)`` (Rademacher ``z``), ``n * v^T H v = z^T H z`` is an unbiased estimate of
    the trace, and ``v^T H v = sum_j tau_j theta_j`` exactly.
    """
    mean, stderr = moments(nodes, weights, orders=1)
    return float(n * mean[0]), float(n * stderr[0])


# Eigenvalues count as "clearly negative" below -NEGATIVE_MASS_TAU * ||H||. A network Hessian's spectrum has a
# dense cluster at 0 that m-node Gauss quadrature cannot resolve: one node holding most of the weight sits within
# a tiny distance of 0 on either side, so the quadrature mass below 0 itself jumps by that node's weight between
# checkpoints. Below a threshold well outside the cluster the mass is stable (nodes there carry small weights).
NEGATIVE_MASS_TAU = 0.01


def negative_mass(nodes: np.ndarray, weights: np.ndarray, threshold: float = 0.0) -> float:
    """Estimated fraction of eigenvalues below ``-threshold`` (quadrature mass, averaged over probes).

    For each probe the exact value lies within the weights of the two nodes around ``-threshold`` of this mass
    (:func:`negative_mass_bounds`): near the dense cluster at 0 of a network Hessian those nodes can hold most of
    the weight and this figure jumps with the sign of one node. :func:`clear_negative_mass` is the stable figure.
    """
    nodes, weights = _check_quadrature(nodes, weights)
    return float((weights * (nodes < -threshold)).sum(axis=1).mean())


def negative_mass_bounds(nodes: np.ndarray, weights: np.ndarray, threshold: float = 0.0) -> tuple[float, float]:
    """Bounds on the fraction of eigenvalues below ``-threshold`` that hold whatever the nodes' exact positions.

    Chebyshev-Markov-Stieltjes inequalities [Golub & Meurant 2010, Thm. 7.3]: for ``x`` between the Gauss nodes
    ``theta_k < x < theta_{k+1}`` of a probe's measure ``mu_v``, ``sum_{j < k} tau_j <= mu_v((-inf, x)) <=
    sum_{j <= k+1} tau_j``: the quadrature mass below ``x`` minus the weight of the nearest node below, and plus
    the weight of the nearest node above. Averaged over probes, these bracket the averaged measure's mass, the
    Hutchinson estimate of the fraction of eigenvalues below ``x``; only the sampling error of the probes remains.

    Args:
        nodes, weights: quadrature [p, m].
        threshold: ``x = -threshold``.

    Returns:
        ``(lower, upper)``.
    """
    nodes, weights = _check_quadrature(nodes, weights)
    x = -float(threshold)
    lower, upper = [], []
    for theta, tau in zip(nodes, weights, strict=True):
        below = theta < x
        mass = float(tau[below].sum())
        nearest_below = float(tau[below][np.argmax(theta[below])]) if below.any() else 0.0
        nearest_above = float(tau[~below][np.argmin(theta[~below])]) if (~below).any() else 0.0
        lower.append(max(0.0, mass - nearest_below))
        upper.append(min(1.0, mass + nearest_above))
    return float(np.mean(lower)), float(np.mean(upper))


def spectral_norm_estimate(nodes: np.ndarray) -> float:
    """``||H||`` estimated by the largest ``|node|`` (extreme Ritz values converge first; for a network Hessian
    this is ``lambda_1``)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    return float(np.max(np.abs(nodes))) if nodes.size else float("nan")


def clear_negative_mass(nodes: np.ndarray, weights: np.ndarray, tau: float = NEGATIVE_MASS_TAU) -> float:
    """Estimated fraction of eigenvalues below ``-tau * ||H||`` (``||H||`` from :func:`spectral_norm_estimate`).

    The stable measure of negative curvature: unlike the mass below 0 it does not depend on which side of 0 the
    heavy node of the cluster at 0 falls (see :data:`NEGATIVE_MASS_TAU`).
    """
    nodes, weights = _check_quadrature(nodes, weights)
    return negative_mass(nodes, weights, threshold=tau * spectral_norm_estimate(nodes))


def bulk_edge(
    nodes: np.ndarray,
    weights: np.ndarray,
    n: int,
    sigma2: float = DEFAULT_SIGMA2,
    level: float = 0.01,
    resolution: float = 0.25,
) -> float:
    """Upper edge of the bulk of the spectrum, where the smoothed density first falls into a gap.

    The bulk is the connected region around the density's maximum where the smoothed density stays above
    ``level`` times the peak height of a single isolated eigenvalue, ``1 / (n * sqrt(2 pi s^2))``. Outliers are
    separated from it by a valley far below that height, which is what the eye sees on the log-scale density plot.

    The kernel is the paper's or, when wider, one of standard deviation ``resolution * (lambda_max -
    lambda_min) / m``: a quarter of the mean spacing of one probe's ``m`` Ritz values. ``m`` nodes cannot resolve
    the spectrum more finely than that, and with the paper's narrow kernel alone the density between the Ritz values
    of a continuous tail is a comb whose dips read as gaps (on the digits MLPs of the demo that counted 13-20 of the
    20 top eigenvalues as outliers, with or without BN). Measured with this kernel: on a Marchenko-Pastur bulk
    (n = 1000, 90 steps, 10 probes) the edge lies 2.9 kernel widths above the largest bulk eigenvalue (one
    eigenvalue's Gaussian falls to 1% at 3.03 widths), with all three outliers above it; on the demo MLP without BN,
    trained on 10 classes, it separates 9 outliers at every checkpoint from step 10 to 3,000, the c - 1 outliers of
    a c-class problem that Papyan (2019) describes.

    Args:
        nodes, weights: quadrature [p, m].
        n: dimension of the matrix (number of parameters).
        sigma2: relative kernel variance of the paper's kernel (as in :func:`density`).
        level: fraction of a single eigenvalue's peak height that counts as "inside the bulk".
        resolution: the kernel's minimum standard deviation, in units of the mean Ritz-value spacing.

    Returns:
        The edge (the largest grid point of the bulk region).
    """
    nodes, weights = _check_quadrature(nodes, weights)
    span = float(nodes.max() - nodes.min())
    s2 = max(kernel_variance(nodes, sigma2), (resolution * span / nodes.shape[1]) ** 2)
    d = density(nodes, weights, sigma2=s2 / max(1.0, span), num_points=20_000)
    single = 1.0 / (n * np.sqrt(2.0 * np.pi * d.sigma2))
    inside = d.values >= level * single
    j = int(np.argmax(d.values))
    gaps = np.nonzero(~inside[j:])[0]
    return float(d.grid[-1] if len(gaps) == 0 else d.grid[j + gaps[0] - 1])


def count_outliers(
    top_eigenvalues: np.ndarray,
    nodes: np.ndarray,
    weights: np.ndarray,
    n: int,
    sigma2: float = DEFAULT_SIGMA2,
    resolution: float = 0.25,
) -> int:
    """Number of top eigenvalues above the bulk edge (see :func:`bulk_edge` for ``sigma2`` and ``resolution``)."""
    edge = bulk_edge(nodes, weights, n, sigma2, resolution=resolution)
    return int(np.sum(np.asarray(top_eigenvalues) > edge))


def js_distance(
    nodes_a: np.ndarray,
    weights_a: np.ndarray,
    nodes_b: np.ndarray,
    weights_b: np.ndarray,
    sigma2: float = DEFAULT_SIGMA2,
    num_points: int = 10_000,
) -> float:
    """Jensen-Shannon distance between two smoothed eigenvalue densities on a shared grid.

    Both quadratures are smoothed with the same Gaussian kernel, of variance ``sigma2 * max(1, lambda_max -
    lambda_min)`` over the nodes of both (the paper's convention of :func:`density`, applied to their union), on
    one uniform grid covering both (:func:`default_grid` of the union). With ``p`` and ``q`` the two densities
    normalised to probability vectors on the grid points and ``m = (p + q) / 2``,

    ``JS(p, q) = sqrt( (KL(p || m) + KL(q || m)) / 2 )`` with ``KL(p || m) = sum_i p_i log2(p_i / m_i)``,

    so 0 for identical densities and 1 for densities with disjoint supports. Zhang et al. (2024, "Why Transformers
    Need Adam: A Hessian Perspective") compare the spectra of the Hessian's diagonal blocks with it. It depends on
    the kernel: narrow kernels separate spectra whose nodes merely interleave, so compare values computed with the
    same ``sigma2``.

    Args:
        nodes_a, weights_a: quadrature [p, m] (or [m]) of the first spectrum.
        nodes_b, weights_b: of the second.
        sigma2: relative kernel variance (default 1e-5, as in Ghorbani et al. 2019).
        num_points: grid size.

    Returns:
        The distance, in [0, 1].
    """
    nodes_a, weights_a = _check_quadrature(nodes_a, weights_a)
    nodes_b, weights_b = _check_quadrature(nodes_b, weights_b)
    union = np.concatenate([nodes_a.ravel(), nodes_b.ravel()])
    s2 = kernel_variance(union, sigma2)
    grid = default_grid(union, sigma2, num_points)
    # density() scales sigma2 by max(1, width of its own nodes): pass the variance that gives s2 for each.
    pa = density(nodes_a, weights_a, sigma2=s2 / max(1.0, float(np.ptp(nodes_a))), grid=grid).values
    pb = density(nodes_b, weights_b, sigma2=s2 / max(1.0, float(np.ptp(nodes_b))), grid=grid).values
    pa, pb = pa / pa.sum(), pb / pb.sum()  # the grid is uniform: probability vectors on its points
    m = 0.5 * (pa + pb)

    def kl(p: np.ndarray) -> float:
        keep = (p > 0) & (m > 0)  # m >= p / 2 > 0, except where p / 2 underflows (and p log(p / m) is ~0)
        return float(np.sum(p[keep] * np.log2(p[keep] / m[keep])))

    return float(np.sqrt(max(0.0, 0.5 * (kl(pa) + kl(pb)))))


def pairwise_js_distances(spectra: list[tuple[np.ndarray, np.ndarray]], sigma2: float = DEFAULT_SIGMA2) -> np.ndarray:
    """Jensen-Shannon distances (:func:`js_distance`) between all pairs of spectra, e.g. the blocks of a network.

    Args:
        spectra: ``(nodes, weights)`` quadratures.
        sigma2: relative kernel variance.

    Returns:
        float64 [k, k] symmetric matrix with a zero diagonal.
    """
    k = len(spectra)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = js_distance(*spectra[i], *spectra[j], sigma2=sigma2)
    return out
