"""Eigenvalue densities at chosen steps (:func:`plot_density`) and the smoothing they are drawn with."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hessspec.linalg import spectrum
from hessspec.plots._style import (
    PALETTE,
    SMALL_FONT_SIZE,
    RunLike,
    checkpoint_at,
    describe_kind,
    finish_axes,
    results_of,
    step_colors,
    styled,
)
from hessspec.results import WHOLE_HESSIAN, CheckpointResult

# A panel of steps is drawn on a log (or symlog) axis when the largest step is this many times the smallest positive.
LOG_STEP_RATIO = 20.0
# The display kernel's smallest standard deviation, in units of the mean spacing of one probe's m Ritz values
# (span / m), as in hessspec.linalg.spectrum.bulk_edge: m nodes cannot resolve the spectrum more finely, and a
# narrower kernel draws the gaps between Ritz values of a continuous bulk as a comb.
DEFAULT_RESOLUTION = 0.25
OUTLIER_TEXT = "top eigenvalues above the bulk edge"


def default_steps(steps: Sequence[int], max_count: int = 5) -> list[int]:
    """Up to ``max_count`` steps spread over a run: the first, the last, and steps log-spaced in between.

    When the positive steps span less than a factor 20 (the rule that puts :func:`plot_evolution`'s step axis on a
    log scale), the ones in between are spread evenly in index instead.

    Args:
        steps: the steps a run holds (any order, duplicates ignored).
        max_count: the most steps to return (at least 2).

    Returns:
        The chosen steps, ascending.
    """
    available = sorted(set(int(s) for s in steps))
    if max_count < 2:
        msg = f"max_count must be at least 2; got {max_count}"
        raise ValueError(msg)
    if len(available) <= max_count:
        return available
    chosen = {available[0], available[-1]}
    positive = [s for s in available if s > 0]
    if positive[-1] / positive[0] >= LOG_STEP_RATIO:
        # Targets log-spaced from the smallest positive step to the last; with step 0 (chosen already) in the
        # run, the smallest positive step is a target too.
        with_zero = available[0] <= 0
        targets = np.geomspace(positive[0], positive[-1], max_count - 1 if with_zero else max_count)
        for target in targets[:-1] if with_zero else targets[1:-1]:
            candidates = [s for s in positive if s not in chosen]
            chosen.add(min(candidates, key=lambda s: abs(math.log(s / target))))
    else:
        for index in np.linspace(0, len(available) - 1, max_count)[1:-1]:
            candidates = [i for i in range(len(available)) if available[i] not in chosen]
            chosen.add(available[min(candidates, key=lambda i: abs(i - index))])
    return sorted(chosen)


def display_variance(checkpoint: CheckpointResult, sigma2: float, resolution: float) -> float:
    """The drawing kernel's variance: the paper's ``sigma2 * max(1, width)``, or when wider, that of a standard
    deviation of ``resolution`` times the mean Ritz-value spacing ``width / m`` (``width`` the nodes' span)."""
    nodes = checkpoint.nodes
    span = float(nodes.max() - nodes.min())
    return max(spectrum.kernel_variance(nodes, sigma2), (resolution * span / nodes.shape[-1]) ** 2)


def display_density(
    checkpoint: CheckpointResult, sigma2: float, resolution: float, grid: np.ndarray | None = None
) -> spectrum.Density:
    """The density a figure draws: :func:`hessspec.linalg.spectrum.density` with :func:`display_variance`, on a
    grid of at least 4 points per kernel standard deviation (so an isolated outlier's peak is resolved). The stored
    quadrature is not changed."""
    nodes, weights = checkpoint.nodes, checkpoint.weights
    s2 = display_variance(checkpoint, sigma2, resolution)
    span = float(nodes.max() - nodes.min())
    relative = s2 / max(1.0, span)  # density() multiplies by max(1, span)
    if grid is None:
        scale = math.sqrt(s2)
        points = int(min(max(10_000, 4.0 * (1.02 * span + 10.0 * scale) / scale), 200_000))
        grid = spectrum.default_grid(nodes, relative, points)
    return spectrum.density(nodes, weights, sigma2=relative, grid=grid)


def density_ylim(
    checkpoints: Sequence[CheckpointResult], densities: Sequence[spectrum.Density], log: bool
) -> tuple[float, float]:
    peak = max(float(d.values.max()) for d in densities)
    if not log:
        return 0.0, 1.05 * peak
    # One isolated eigenvalue out of n has weight ~1/n and a peak 1/(n sqrt(2 pi s^2)) high: put the floor two
    # decades below that, so each outlier shows as a whole peak, and within [1e-12, 1e-3] of the bulk's peak.
    floors = [
        0.01 / (c.n_params * math.sqrt(2.0 * math.pi * d.sigma2))
        for c, d in zip(checkpoints, densities, strict=True)
        if c.n_params > 0
    ]
    floor = min(floors) if floors else 1e-8 * peak
    floor = min(max(floor, 1e-12 * peak), 1e-3 * peak)
    return floor, 2.0 * peak


def outliers(checkpoint: CheckpointResult) -> np.ndarray:
    """Top eigenvalues above the bulk edge (:func:`hessspec.linalg.spectrum.bulk_edge`)."""
    top = np.asarray(checkpoint.top_eigenvalues, dtype=np.float64)
    if len(top) == 0 or checkpoint.n_params <= 0:
        return top[:0]
    edge = spectrum.bulk_edge(checkpoint.nodes, checkpoint.weights, checkpoint.n_params)
    return top[top > edge]


def draw_density_panel(ax: Axes, c: CheckpointResult, d: spectrum.Density, found: np.ndarray, color) -> None:
    """One density line with the outliers as ticks along the top of the panel."""
    ax.plot(d.grid, d.values, color=color, linewidth=1.2, label=f"step {c.step}")
    if len(found):
        ax.vlines(found, 0.92, 1.0, transform=ax.get_xaxis_transform(), colors=[color], linewidth=1.2)


def outlier_count(found: np.ndarray) -> str:
    return f"  ({len(found)} outlier{'s' if len(found) > 1 else ''})" if len(found) else ""


def outlier_legend(fig: Figure) -> None:
    rug = Line2D(
        [], [], color="0.3", marker="|", linestyle="none", markersize=9, markeredgewidth=1.2, label=OUTLIER_TEXT
    )
    fig.legend(handles=[rug], loc="outside lower right")


def finish_density_axes(axes: Sequence[Axes], log: bool, ylim: tuple[float, float]) -> None:
    for ax in axes:
        ax.set_yscale("log" if log else "linear")
        ax.set_ylim(*ylim)
        finish_axes(ax)


def _as_runs(runs: RunLike | Sequence[RunLike]) -> list[RunLike]:
    return [runs] if hasattr(runs, "checkpoints") else list(runs)


def _title(label: str, curvature: str, block: str) -> str:
    kind = describe_kind(curvature, block)
    return f"{label} ({kind})" if kind else label


@styled
def plot_density(
    runs: RunLike | Sequence[RunLike],
    steps: Sequence[int] | None = None,
    sigma2: float = spectrum.DEFAULT_SIGMA2,
    log: bool = True,
    layout: str = "grid",
    resolution: float = DEFAULT_RESOLUTION,
    sharex: bool = False,
    curvature: str = WHOLE_HESSIAN[0],
    block: str = WHOLE_HESSIAN[1],
) -> Figure:
    """Smoothed eigenvalue densities of one or more runs at a few checkpoints.

    Each curve is the quadrature smoothed with Gaussian kernels (:func:`display_density`): the paper's variance
    ``sigma2 * max(1, width)`` (Ghorbani et al. 2019), widened where needed to a standard deviation of
    ``resolution`` times the mean spacing of one probe's Ritz values, which is as fine as ``m`` nodes resolve;
    the stored data are raw. Curves are coloured by step (viridis, early dark). Short ticks mark the top
    eigenvalues above the bulk edge (:func:`hessspec.linalg.spectrum.bulk_edge`), the outliers.

    Args:
        runs: one run, or several (e.g. without and with BatchNorm) drawn side by side.
        steps: steps to draw; default :func:`default_steps` of the steps all runs hold (up to 5, or 4 with several
            runs).
        sigma2: relative kernel variance (default 1e-5, the paper's).
        log: draw the density on a log y-axis (the paper's view), floored two decades below the peak of one
            isolated eigenvalue, so that every outlier shows.
        layout: ``"grid"`` (default: one panel per step and run, each with its own eigenvalue axis, so that an
            early narrow spectrum is as legible as a late wide one; a single run wraps into rows of up to 3
            panels, several runs take one row each) or ``"overlay"`` (one panel per run, the steps overlaid,
            earlier steps drawn on top, the outliers in a strip above with one row per step).
        resolution: the display kernel's least standard deviation in mean Ritz spacings (0: the paper's kernel).
        sharex: give every grid panel the same eigenvalue axis.
        curvature: the curvature to draw (default the Hessian); needs ``run.select``.
        block: the parameter block (default "all").

    Returns:
        The figure. Grid: ``fig.axes`` are the panels, run by run, in step order, one density line each.
        Overlay: per run, the panel (one line per step, in step order) then, when there are outliers, its strip.

    Raises:
        ValueError: no runs, a run holds no results (of that curvature and block), a requested step is not in a run,
            ``steps`` is empty, ``layout`` is unknown or ``resolution`` is negative.
    """
    if layout not in ("overlay", "grid"):
        msg = f"layout must be 'overlay' or 'grid'; got {layout!r}"
        raise ValueError(msg)
    if resolution < 0:
        msg = f"resolution must be >= 0; got {resolution}"
        raise ValueError(msg)
    run_list = _as_runs(runs)
    if not run_list:
        msg = "no runs to plot"
        raise ValueError(msg)
    results = [results_of(run, curvature, block) for run in run_list]
    if steps is None:
        common = set.intersection(*({c.step for c in found} for found in results))
        pool = common or {c.step for c in results[0]}
        steps = default_steps(sorted(pool), max_count=5 if len(run_list) == 1 else 4)
    elif len(steps) == 0:
        msg = "steps is empty; pass None for a default choice"
        raise ValueError(msg)
    chosen = [[checkpoint_at(run, found, int(s)) for s in steps] for run, found in zip(run_list, results, strict=True)]
    densities = [[display_density(c, sigma2, resolution) for c in row] for row in chosen]
    found = [[outliers(c) for c in row] for row in chosen]
    colors = step_colors([int(s) for s in steps])
    flat_c = [c for row in chosen for c in row]
    flat_d = [d for row in densities for d in row]
    ylim = density_ylim(flat_c, flat_d, log)
    union = (min(float(d.grid[0]) for d in flat_d), max(float(d.grid[-1]) for d in flat_d))
    n, rows = len(steps), len(run_list)
    if layout == "overlay":
        panels = _overlay(run_list, chosen, densities, found, colors, curvature, block)
        finish_density_axes(panels, log, ylim)
        return panels[0].figure

    ncols = (n if n <= 3 else (2 if n == 4 else 3)) if rows == 1 else n
    nrows = math.ceil(n / ncols) if rows == 1 else rows
    fig = Figure(figsize=(2.6 * ncols + 0.8, 2.2 * nrows + 0.7), layout="constrained")
    panels = fig.subplots(nrows, ncols, sharex=sharex, sharey=True, squeeze=False).ravel()
    for extra in panels[n * rows :]:
        fig.delaxes(extra)
    axes = list(panels[: n * rows])
    for r, run in enumerate(run_list):
        for i in range(n):
            index = r * n + i
            ax, c, d, out = axes[index], chosen[r][i], densities[r][i], found[r][i]
            draw_density_panel(ax, c, d, out, colors[i])
            ax.set_title(f"step {c.step}{outlier_count(out)}")
            ax.set_xlim(*(union if sharex else (float(d.grid[0]), float(d.grid[-1]))))
            if (rows == 1 and index + ncols >= n) or (rows > 1 and r == rows - 1) or not sharex:
                ax.xaxis.set_tick_params(labelbottom=True)
            if (rows == 1 and index + ncols >= n) or (rows > 1 and r == rows - 1):
                ax.set_xlabel("eigenvalue λ")
            if index % ncols == 0:
                ax.set_ylabel("density" if rows == 1 else f"{run.label}\ndensity")
    if any(len(o) for row in found for o in row):
        outlier_legend(fig)
    kind = describe_kind(curvature, block)
    fig.suptitle(_title(run_list[0].label, curvature, block) if rows == 1 else kind)
    finish_density_axes(axes, log, ylim)
    return fig


def _overlay(run_list, chosen, densities, found, colors, curvature: str, block: str) -> list[Axes]:
    """The overlay layout; returns the density panels (the strips are in ``fig.axes`` after each panel)."""
    n, rows = len(chosen[0]), len(run_list)
    has_strip = any(len(o) for row in found for o in row)
    strip_height = 0.17 * n + 0.15
    width = 6.4 if rows == 1 else 4.2 * rows + 0.8
    fig = Figure(figsize=(width, 3.2 + (strip_height if has_strip else 0.0)), layout="constrained")
    grid = fig.add_gridspec(2 if has_strip else 1, rows, height_ratios=[strip_height, 3.0] if has_strip else None)
    panels: list[Axes] = []
    first = None
    for r, run in enumerate(run_list):
        ax = fig.add_subplot(grid[1 if has_strip else 0, r], sharey=first)
        first = first or ax
        for i, (c, d, color) in enumerate(zip(chosen[r], densities[r], colors, strict=True)):
            # Earlier steps on top: a late, wide spectrum must not hide the narrow early ones.
            ax.plot(d.grid, d.values, color=color, linewidth=1.2, label=f"step {c.step}", zorder=3 + n - i)
        if r == rows - 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
        ax.set_xlim(min(float(d.grid[0]) for d in densities[r]), max(float(d.grid[-1]) for d in densities[r]))
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density")
        title = _title(run.label, curvature, block)
        panels.append(ax)
        if has_strip:
            strip = fig.add_subplot(grid[0, r], sharex=ax)
            for row, (out, color) in enumerate(zip(found[r], colors, strict=True)):
                strip.vlines(out, row - 0.38, row + 0.38, colors=[color], linewidth=1.3)
            strip.set_ylim(n - 0.5, -0.5)
            strip.set_yticks(range(n), [str(c.step) for c in chosen[r]])
            strip.set_ylabel("step", rotation=0, ha="right", va="center")
            strip.tick_params(axis="x", labelbottom=False)
            strip.tick_params(axis="y", length=0)
            if r == rows - 1:
                strip.set_title(OUTLIER_TEXT, loc="right", color="0.3", fontsize=SMALL_FONT_SIZE)
            strip.set_title(title, loc="left")
            finish_axes(strip, grid=False)
        else:
            ax.set_title(title, loc="left")
    return panels


__all__ = ["DEFAULT_RESOLUTION", "PALETTE", "default_steps", "display_density", "plot_density"]
