"""Ritz pairs and the overlap of the gradient with the top eigenspace.

For a Lanczos chain with basis ``Q`` ([n, m]) and tridiagonal ``T = S diag(theta) S^T``, the Ritz vectors are
``Y = Q S`` and, from the Lanczos relation ``H Q = Q T + r e_m^T``, the residual of the pair ``(theta_i, y_i)`` is
``||H y_i - theta_i y_i|| = ||r|| * |S[m-1, i]|``: no extra Hessian product is needed [Parlett 1998, Sec. 13.1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from hessspec.linalg.lanczos import LanczosResult
from hessspec.linalg.ritz import RitzPairs, converged_pairs
from hessspec.linalg.spectrum import tridiagonal_eigh


class GradientOverlap(NamedTuple):
    """How much of the gradient lies in the top eigenspace.

    Attributes:
        k: int64 [K] ranks.
        ratio: float64 [K] ``||P_k g||^2 / ||g||^2`` with ``P_k`` the projector onto the top-k Ritz vectors.
        cos2: float64 [k] ``(y_i^T g)^2 / ||g||^2`` for each Ritz vector, descending eigenvalue order.
    """

    k: np.ndarray
    ratio: np.ndarray
    cos2: np.ndarray


def ritz_pairs(result: LanczosResult, k: int, chain: int = 0) -> RitzPairs:
    """Top-``k`` Ritz pairs of one chain of a Lanczos run (:func:`hessspec.linalg.ritz.union_ritz_pairs` uses all).

    Args:
        result: output of :func:`hessspec.linalg.lanczos.lanczos` (with ``keep_basis=True`` for vectors).
        k: number of pairs (at most the number of steps).
        chain: which chain (probe) to use.

    Returns:
        :class:`hessspec.linalg.ritz.RitzPairs`, with the converged flags of
        :func:`hessspec.linalg.ritz.converged_pairs` (``||A||`` estimated by this chain's largest ``|theta|``).
    """
    m = result.alpha.shape[1]
    if not 1 <= k <= m:
        msg = f"k must be between 1 and the number of Lanczos steps ({m}); got {k}"
        raise ValueError(msg)
    theta, S = tridiagonal_eigh(result.alpha[chain].numpy(), result.beta[chain].numpy())
    order = np.argsort(theta)[::-1][:k]
    values = theta[order]
    # beta_m |s_mi| can underflow to 0 for converged pairs; the computed pair is never better than rounding
    # of the float64 recurrence allows, so report at least eps * ||T||.
    floor = np.finfo(np.float64).eps * float(np.max(np.abs(theta)))
    residuals = np.maximum(float(result.residual_norms[chain]) * np.abs(S[-1, order]), floor)
    vectors = None
    if result.basis is not None:
        Q = result.basis[chain]  # [m, n]
        Sk = torch.as_tensor(np.ascontiguousarray(S[:, order]), dtype=torch.float64, device=Q.device)
        vectors = (Q.to(torch.float64).T @ Sk) if Q.dtype != torch.float64 else Q.T @ Sk
    return RitzPairs(values, residuals, vectors, converged_pairs(residuals, float(np.max(np.abs(theta)))))


def default_overlap_ranks(k: int) -> list[int]:
    """All ranks 1..k (the overlap is cheap once the Ritz vectors exist)."""
    return list(range(1, k + 1))


def gradient_overlap(
    vectors: torch.Tensor, gradient: torch.Tensor, ranks: Sequence[int] | None = None
) -> GradientOverlap:
    """Overlap of ``gradient`` with the span of the leading columns of ``vectors``.

    Args:
        vectors: [n, k] orthonormal vectors, ordered by decreasing eigenvalue.
        gradient: [n] gradient.
        ranks: the k's at which to report ``||P_k g||^2 / ||g||^2`` (default 1..k).

    Returns:
        :class:`GradientOverlap`.

    Raises:
        ValueError: shape mismatch, zero gradient, ranks out of range.
    """
    if vectors.ndim != 2 or gradient.ndim != 1 or vectors.shape[0] != gradient.shape[0]:
        msg = f"expected vectors [n, k] and gradient [n]; got {tuple(vectors.shape)} and {tuple(gradient.shape)}"
        raise ValueError(msg)
    k = vectors.shape[1]
    ranks = default_overlap_ranks(k) if ranks is None else list(ranks)
    if any(not 1 <= r <= k for r in ranks):
        msg = f"overlap ranks must lie in 1..{k}; got {ranks}"
        raise ValueError(msg)
    g = gradient.to(device=vectors.device, dtype=torch.float64)
    g2 = float(g @ g)
    if g2 == 0.0:
        msg = "the gradient is zero: its overlap with an eigenspace is undefined"
        raise ValueError(msg)
    cos2 = ((vectors.to(torch.float64).T @ g) ** 2 / g2).cpu().numpy()
    cumulative = np.cumsum(cos2)
    return GradientOverlap(np.asarray(ranks, dtype=np.int64), cumulative[np.asarray(ranks) - 1], cos2)


def measure_mass_above(nodes: np.ndarray, weights: np.ndarray, threshold: float) -> float:
    """Mass of a spectral measure (e.g. the gradient's, from a Lanczos run started at ``g``) at nodes >= threshold.

    For the gradient's measure ``sum_i (u_i^T g)^2 / ||g||^2 delta(lambda - lambda_i)``, the mass above a
    threshold between the k-th and (k+1)-th eigenvalue equals ``||P_k g||^2 / ||g||^2`` once those outliers
    have converged: an independent cross-check of :func:`gradient_overlap`.
    """
    return float(np.sum(np.asarray(weights)[np.asarray(nodes) >= threshold]))
