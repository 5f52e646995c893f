"""Figures of curvature spectra across training: densities, per-block densities, evolution, gradient overlap.

Every figure function takes results (a *run*: anything with a ``label`` and a sequence of
:class:`~hessspec.results.CheckpointResult` as ``checkpoints``, such as ``hessspec.store.RunResults``; figures of
another curvature or of parameter blocks also use its ``select``) and returns a :class:`matplotlib.figure.Figure`.
Figures are built with the object-oriented API (no pyplot, no backend selection), so they work headless and leave
matplotlib's global state alone; the house style is applied per figure through :func:`matplotlib.rc_context`.
Write them with :func:`save_figure`.

The densities follow Ghorbani, Krishnan & Xiao (2019, Sec. 2 and Fig. 1): Gaussian smoothing of the quadrature
(see :func:`hessspec.linalg.spectrum.density`) drawn on a log y-axis, where a bulk near 0 and isolated outliers far to
the right both stay visible; the kernel is widened to what ``m`` Ritz values resolve
(:func:`~hessspec.plots.density.display_density`).

Modules: :mod:`~hessspec.plots.density`, :mod:`~hessspec.plots.blocks`, :mod:`~hessspec.plots.evolution`,
:mod:`~hessspec.plots.overlap`; the style and :func:`save_figure` in ``_style``.
"""

from __future__ import annotations

from hessspec.plots._style import PALETTE, RunLike, save_figure
from hessspec.plots.blocks import plot_blocks
from hessspec.plots.density import DEFAULT_RESOLUTION, default_steps, display_density, plot_density
from hessspec.plots.evolution import DEFAULT_OVERLAP_RANKS, AnalysedStepLocator, default_overlap_ranks, plot_evolution
from hessspec.plots.overlap import plot_overlap

__all__ = [
    "DEFAULT_OVERLAP_RANKS",
    "DEFAULT_RESOLUTION",
    "AnalysedStepLocator",
    "PALETTE",
    "RunLike",
    "default_overlap_ranks",
    "default_steps",
    "display_density",
    "plot_blocks",
    "plot_density",
    "plot_evolution",
    "plot_overlap",
    "save_figure",
]
