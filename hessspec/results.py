"""Typed, immutable results of an analysis.

These objects hold NumPy arrays only (no torch tensors), so the store, the plots and the CLI can use them
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hessspec.linalg import spectrum

# The (curvature, block) of the classic result: the Hessian of the whole selected parameter set.
WHOLE_HESSIAN = ("hessian", "all")


class HessspecWarning(UserWarning):
    """Something a user should know that does not stop the work (the command line shows it as one line)."""


@dataclass(frozen=True)
class CheckpointResult:
    """Everything hessspec measured on one checkpoint.

    Shapes: ``p`` probes, ``m`` Lanczos steps, ``k`` top eigenpairs, ``K`` overlap ranks.

    Attributes:
        step: training step of the checkpoint.
        source: path of the checkpoint file ("" when analysed from memory).
        sha256: hex digest of the checkpoint file ("" when analysed from memory).
        model: name of the model (zoo name, factory or class name).
        n_params: number of parameters in the analysed Hessian.
        n_samples: number of examples in the analysed set.
        bn_mode: "train", "eval" or "population".
        dtype: dtype the model was evaluated in ("float32" / "float64"); Lanczos is always float64.
        device: device the HVPs ran on.
        seed: seed of the probe generator.
        lanczos_steps: m.
        probes: p.
        loss: mean loss over the analysed set.
        grad_norm: Euclidean norm of the full-data gradient.
        trace: Hutchinson estimate of tr(H) from the quadrature.
        trace_stderr: its standard error across probes.
        elapsed_s: wall-clock seconds for the whole analysis of this checkpoint.
        nodes: float64 [p, m], quadrature nodes (Ritz values) of each probe.
        weights: float64 [p, m], quadrature weights; each row sums to 1.
        top_eigenvalues: float64 [k], top Ritz values over the union of all chains' Krylov spaces, descending
            (:func:`hessspec.linalg.ritz.union_ritz_pairs`; files written before it hold probe 0's).
        top_residuals: float64 [k], ``||H y - lambda y||`` of each Ritz pair (``y`` of unit norm).
        top_converged: bool [k], whether each pair is converged (residual <= 1e-3 ||H||, see
            :func:`hessspec.linalg.ritz.converged_pairs`), or None when unknown (files written before the flag).
        overlap_k: int64 [K], the ranks k at which the overlap is reported.
        overlap_ratio: float64 [K], ``||P_k g||^2 / ||g||^2`` with P_k the projector on the top-k Ritz vectors.
        cos2: float64 [k], ``(y_i^T g)^2 / ||g||^2`` for each top Ritz vector.
        gradient_nodes: float64 [m] or None, nodes of the Lanczos chain started from g (cross-check).
        gradient_weights: float64 [m] or None, its weights: the spectral measure of g / ||g||.
        timings: seconds spent in named phases ("hvp", "lanczos", "gradient", ...).
        settings: JSON-serialisable analysis settings.
        curvature: the matrix analysed: "hessian", "ggn", "empirical-fisher", "gradient-covariance" or "residual"
            (see :mod:`hessspec.curvature.gauss_newton`).
        block: "all" for the whole selected parameter set, else the name of the parameter block whose diagonal
            block of the matrix was analysed (see :mod:`hessspec.curvature.blocks`); ``n_params`` is then the
            block's size, ``grad_norm``, ``overlap_ratio`` and ``cos2`` refer to the block's part of the gradient,
            and ``trace`` to the diagonal block.
    """

    step: int
    loss: float
    grad_norm: float
    trace: float
    trace_stderr: float
    nodes: np.ndarray
    weights: np.ndarray
    top_eigenvalues: np.ndarray
    top_residuals: np.ndarray
    overlap_k: np.ndarray
    overlap_ratio: np.ndarray
    cos2: np.ndarray
    n_params: int
    n_samples: int
    bn_mode: str
    dtype: str
    device: str
    seed: int
    lanczos_steps: int
    probes: int
    elapsed_s: float
    source: str = ""
    sha256: str = ""
    model: str = ""
    gradient_nodes: np.ndarray | None = None
    gradient_weights: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    curvature: str = WHOLE_HESSIAN[0]
    block: str = WHOLE_HESSIAN[1]
    top_converged: np.ndarray | None = None

    def __repr__(self) -> str:
        # Short: the arrays are in the fields, not in the repr.
        converged = "?" if self.top_converged is None else int(np.sum(self.top_converged))
        return (
            f"CheckpointResult(step={self.step}, curvature={self.curvature!r}, block={self.block!r}, "
            f"n_params={self.n_params}, loss={self.loss:.6g}, lambda_max={self.lambda_max:.6g}, "
            f"trace={self.trace:.6g}, probes={self.probes}, lanczos_steps={self.lanczos_steps}, "
            f"converged={converged}/{len(self.top_eigenvalues)}, source={self.source!r})"
        )

    @property
    def kind(self) -> tuple[str, str]:
        """``(curvature, block)``: what this result is a spectrum of."""
        return (self.curvature, self.block)

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value (the top eigenvalue estimate)."""
        return float(self.top_eigenvalues[0]) if len(self.top_eigenvalues) else float("nan")

    def density(
        self, sigma2: float = spectrum.DEFAULT_SIGMA2, grid: np.ndarray | None = None, num_points: int = 10_000
    ) -> spectrum.Density:
        """Smoothed eigenvalue density; see :func:`hessspec.linalg.spectrum.density`."""
        return spectrum.density(self.nodes, self.weights, sigma2=sigma2, grid=grid, num_points=num_points)

    def negative_mass(self, threshold: float = 0.0) -> float:
        """Estimated fraction of eigenvalues below ``-threshold``; see :func:`spectrum.negative_mass`.

        At ``threshold=0`` this jumps with the sign of the heavy node of the cluster at 0; see
        :meth:`clear_negative_mass` and :meth:`negative_mass_bounds`.
        """
        return spectrum.negative_mass(self.nodes, self.weights, threshold=threshold)

    def clear_negative_mass(self, tau: float = spectrum.NEGATIVE_MASS_TAU) -> float:
        """Estimated fraction of eigenvalues below ``-tau * ||H||``; see :func:`spectrum.clear_negative_mass`."""
        return spectrum.clear_negative_mass(self.nodes, self.weights, tau=tau)

    def negative_mass_bounds(self, threshold: float = 0.0) -> tuple[float, float]:
        """Bounds on the fraction of eigenvalues below ``-threshold``; see :func:`spectrum.negative_mass_bounds`."""
        return spectrum.negative_mass_bounds(self.nodes, self.weights, threshold=threshold)

    def converged_count(self) -> int | None:
        """How many of the top pairs are converged, or None when unknown (files without ``top/converged``)."""
        return None if self.top_converged is None else int(np.sum(self.top_converged))

    def trusted_rank(self) -> int:
        """The largest ``k`` such that the top ``k`` pairs are all converged (all ``k`` when unknown)."""
        if self.top_converged is None:
            return len(self.top_eigenvalues)
        bad = np.nonzero(~np.asarray(self.top_converged, dtype=bool))[0]
        return int(bad[0]) if len(bad) else len(self.top_converged)

    def overlap_at(self, k: int) -> float:
        """``||P_k g||^2 / ||g||^2`` at rank ``k`` (must be one of ``overlap_k``)."""
        hits = np.nonzero(self.overlap_k == k)[0]
        if len(hits) == 0:
            msg = f"overlap was not computed at k={k}; available: {self.overlap_k.tolist()}"
            raise KeyError(msg)
        return float(self.overlap_ratio[hits[0]])

    def num_outliers(self) -> int:
        """Number of converged top eigenvalues above the bulk edge (all top eigenvalues when the flags are unknown);
        see :func:`hessspec.linalg.spectrum.count_outliers`."""
        top = np.asarray(self.top_eigenvalues)
        if self.top_converged is not None:
            top = top[np.asarray(self.top_converged, dtype=bool)]
        return spectrum.count_outliers(top, self.nodes, self.weights, self.n_params)
