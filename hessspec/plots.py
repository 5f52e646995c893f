"""Figures of Hessian spectra across training: densities, the evolution of the outliers, gradient overlap.

Every figure function takes results (a *run*: anything with a ``label`` and a sequence of
:class:`~hessspec.results.CheckpointResult` as ``checkpoints``, such as ``hessspec.store.RunResults``) and
returns a :class:`matplotlib.figure.Figure`. Figures are built with the object-oriented API (no pyplot, no backend
selection), so they work headless and leave matplotlib's global state alone; the house style is applied per figure
through :func:`matplotlib.rc_context`. Write them with :func:`save_figure`.

The densities follow Ghorbani, Krishnan & Xiao (2019, Sec. 2 and Fig. 1): Gaussian smoothing of the quadrature
(see :func:`hessspec.linalg.spectrum.density`) drawn on a log y-axis, where a bulk near 0 and isolated outliers far to
the right both stay visible.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from hessspec.linalg import spectrum
from hessspec.results import CheckpointResult

__all__ = ["PALETTE", "RunLike", "default_steps", "plot_density", "plot_evolution", "plot_overlap", "save_figure"]

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies and
# in greyscale by lightness. Their yellow (#F0E442) is left out: too pale on white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000")

_FONT_SIZE = 10.0
_SMALL_FONT_SIZE = 9.0  # ticks and legends; nothing is drawn smaller
_STYLE = {
    "font.size": _FONT_SIZE,
    "axes.titlesize": _FONT_SIZE,
    "axes.labelsize": _FONT_SIZE,
    "figure.titlesize": _FONT_SIZE + 1,
    "figure.labelsize": _FONT_SIZE,
    "legend.fontsize": _SMALL_FONT_SIZE,
    "legend.title_fontsize": _SMALL_FONT_SIZE,
    "legend.frameon": True,  # a borderless white box keeps grid lines out of in-panel legends
    "legend.framealpha": 0.9,
    "legend.edgecolor": "none",
    "legend.fancybox": False,
    "xtick.labelsize": _SMALL_FONT_SIZE,
    "ytick.labelsize": _SMALL_FONT_SIZE,
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlelocation": "left",
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "lines.linewidth": 1.5,
    "lines.markersize": 4.0,
    "figure.dpi": 100,
    "figure.facecolor": "white",
}
# A panel of steps is drawn on a log (or symlog) axis when the largest step is this many times the smallest positive.
_LOG_STEP_RATIO = 20.0
# Markers on the evolution curves while there are few enough checkpoints for them to stay apart.
_MAX_MARKED_POINTS = 40
_SAVE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
_PNG_DPI = 200


class RunLike(Protocol):
    """What the figure functions need from a run (``hessspec.store.RunResults`` is one)."""

    @property
    def label(self) -> str: ...

    @property
    def checkpoints(self) -> Sequence[CheckpointResult]: ...


_F = TypeVar("_F", bound=Callable[..., Figure])


def _styled(fn: _F) -> _F:
    """Build the figure inside the house style, without touching the global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _finish_axes(ax: Axes, grid: bool = True) -> None:
    # Tick labels are created lazily at draw time, possibly outside the rc_context: store their style on the axis.
    ax.tick_params(which="both", labelsize=_SMALL_FONT_SIZE, direction="out")
    ax.tick_params(which="major", length=3.5, width=0.8)
    ax.tick_params(which="minor", length=2.0, width=0.6)
    if grid:
        ax.grid(True, which="major", color="0.88", linewidth=0.6)
        ax.set_axisbelow(True)


def _checkpoints(run: RunLike) -> list[CheckpointResult]:
    checkpoints = sorted(run.checkpoints, key=lambda c: c.step)
    if not checkpoints:
        msg = f"run {run.label!r} holds no checkpoints; nothing to plot"
        raise ValueError(msg)
    return checkpoints


def _format_steps(steps: Sequence[int]) -> str:
    steps = list(steps)
    if len(steps) > 20:
        return f"[{', '.join(map(str, steps[:10]))}, ..., {', '.join(map(str, steps[-5:]))}] ({len(steps)} steps)"
    return str(steps)


def _checkpoint_at(run: RunLike, checkpoints: Sequence[CheckpointResult], step: int) -> CheckpointResult:
    for c in checkpoints:
        if c.step == step:
            return c
    msg = (
        f"run {run.label!r} holds no checkpoint at step {step}; "
        f"available steps: {_format_steps([c.step for c in checkpoints])}"
    )
    raise ValueError(msg)


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
    if positive[-1] / positive[0] >= _LOG_STEP_RATIO:
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


def _density_points(checkpoint: CheckpointResult, sigma2: float) -> int:
    # At least 4 grid points per kernel standard deviation, so that an isolated outlier's peak is resolved.
    nodes = checkpoint.nodes
    width = float(nodes.max() - nodes.min())
    scale = math.sqrt(spectrum.kernel_variance(nodes, sigma2))
    return int(min(max(10_000, 4.0 * (1.02 * width + 10.0 * scale) / scale), 200_000))


def _density_ylim(
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


def _step_colors(steps: Sequence[int]) -> list:
    """Colours in order of training step: viridis (perceptually uniform, CVD-safe), its pale yellow end cut."""
    if len(steps) == 1:
        return [PALETTE[0]]
    ramp = mpl.colormaps["viridis"](np.linspace(0.0, 0.8, len(steps)))
    rank = np.argsort(np.argsort(steps, kind="stable"), kind="stable")
    return [ramp[r] for r in rank]


def _outliers(checkpoint: CheckpointResult) -> np.ndarray:
    """Top eigenvalues above the bulk edge (:func:`hessspec.linalg.spectrum.bulk_edge`)."""
    top = np.asarray(checkpoint.top_eigenvalues, dtype=np.float64)
    if len(top) == 0 or checkpoint.n_params <= 0:
        return top[:0]
    edge = spectrum.bulk_edge(checkpoint.nodes, checkpoint.weights, checkpoint.n_params)
    return top[top > edge]


_OUTLIER_TEXT = "top eigenvalues above the bulk edge"


@_styled
def plot_density(
    run: RunLike,
    steps: Sequence[int] | None = None,
    sigma2: float = spectrum.DEFAULT_SIGMA2,
    log: bool = True,
    layout: str = "overlay",
) -> Figure:
    """Smoothed eigenvalue densities of a run at a few checkpoints.

    Each curve is :meth:`CheckpointResult.density` (Gaussian kernels of variance ``sigma2 * max(1, width)`` on the
    quadrature nodes, Ghorbani et al. 2019), coloured by step (viridis, early dark). Short ticks mark the top
    eigenvalues that lie above the bulk edge (:func:`hessspec.linalg.spectrum.bulk_edge`), the outliers: in the overlay
    layout in a strip above the densities, one row per step; in the grid layout along the top of each panel.

    Args:
        run: the results of one run (``label`` and ``checkpoints``).
        steps: steps to draw, in legend order; default :func:`default_steps` of the run (up to 5).
        sigma2: relative kernel variance (default 1e-5, the paper's).
        log: draw the density on a log y-axis (the paper's view), floored two decades below the peak of one
            isolated eigenvalue, so that every outlier shows.
        layout: ``"overlay"`` (one panel, step in the legend) or ``"grid"`` (one panel per step, shared axes).

    Returns:
        The figure. ``fig.axes[0]`` holds one density line per step in the overlay layout (then
        ``fig.axes[1]``, when there are outliers, is the strip of ticks); in the grid layout ``fig.axes[i]`` holds
        the one line of step ``steps[i]``.

    Raises:
        ValueError: the run holds no checkpoints, a requested step is not in the run, ``steps`` is empty or
            ``layout`` is unknown.
    """
    if layout not in ("overlay", "grid"):
        msg = f"layout must be 'overlay' or 'grid'; got {layout!r}"
        raise ValueError(msg)
    checkpoints = _checkpoints(run)
    if steps is None:
        steps = default_steps([c.step for c in checkpoints])
    elif len(steps) == 0:
        msg = "steps is empty; pass None for a default choice"
        raise ValueError(msg)
    chosen = [_checkpoint_at(run, checkpoints, int(s)) for s in steps]
    densities = [c.density(sigma2, num_points=_density_points(c, sigma2)) for c in chosen]
    outliers = [_outliers(c) for c in chosen]
    colors = _step_colors([c.step for c in chosen])
    xlim = (min(float(d.grid[0]) for d in densities), max(float(d.grid[-1]) for d in densities))
    ylim = _density_ylim(chosen, densities, log)

    n = len(chosen)
    if layout == "overlay":
        has_strip = any(len(o) for o in outliers)
        strip_height = 0.17 * n + 0.15
        fig = Figure(figsize=(6.4, 3.2 + (strip_height if has_strip else 0.0)), layout="constrained")
        grid = fig.add_gridspec(2, 1, height_ratios=[strip_height, 3.0]) if has_strip else None
        ax = fig.add_subplot(grid[1] if has_strip else 111)
        for c, d, color in zip(chosen, densities, colors, strict=True):
            ax.plot(d.grid, d.values, color=color, linewidth=1.2, label=f"step {c.step}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
        axes = [ax]
        if has_strip:
            strip = fig.add_subplot(grid[0], sharex=ax)
            for row, (found, color) in enumerate(zip(outliers, colors, strict=True)):
                strip.vlines(found, row - 0.38, row + 0.38, colors=[color], linewidth=1.3)
            strip.set_ylim(n - 0.5, -0.5)
            strip.set_yticks(range(n), [str(c.step) for c in chosen])
            strip.set_ylabel("step", rotation=0, ha="right", va="center")
            strip.tick_params(axis="x", labelbottom=False)
            strip.tick_params(axis="y", length=0)
            strip.set_title(_OUTLIER_TEXT, loc="right", color="0.3", fontsize=_SMALL_FONT_SIZE)
            strip.set_title(run.label, loc="left")
            _finish_axes(strip, grid=False)
        else:
            ax.set_title(run.label, loc="left")
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density")
    else:
        ncols = n if n <= 3 else (2 if n == 4 else 3)
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(2.5 * ncols + 0.7, 2.2 * nrows + 0.7), layout="constrained")
        panels = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for extra in panels[n:]:
            fig.delaxes(extra)
        axes = list(panels[:n])
        for i, (ax, c, d, found, color) in enumerate(zip(axes, chosen, densities, outliers, colors, strict=True)):
            ax.plot(d.grid, d.values, color=color, linewidth=1.2, label=f"step {c.step}")
            if len(found):
                ax.vlines(found, 0.92, 1.0, transform=ax.get_xaxis_transform(), colors=[color], linewidth=1.2)
            count = f"  ({len(found)} outlier{'s' if len(found) > 1 else ''})" if len(found) else ""
            ax.set_title(f"step {c.step}{count}")
            if i + ncols >= n:  # the lowest panel of its column
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("eigenvalue λ")
            if i % ncols == 0:
                ax.set_ylabel("density")
        if any(len(o) for o in outliers):
            rug = Line2D(
                [], [], color="0.3", marker="|", linestyle="none", markersize=9, markeredgewidth=1.2,
                label=_OUTLIER_TEXT,
            )  # fmt: skip
            fig.legend(handles=[rug], loc="outside lower right")
        fig.suptitle(run.label)

    for ax in axes:
        ax.set_yscale("log" if log else "linear")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        _finish_axes(ax)
    return fig


def _set_step_axis(ax: Axes, steps: np.ndarray) -> None:
    """Linear, log or symlog step axis: log scales when the steps span decades."""
    positive = steps[steps > 0]
    if len(positive) == 0 or positive.max() / positive.min() < _LOG_STEP_RATIO:
        return
    if steps.min() > 0:
        ax.set_xscale("log")
        return
    # Step 0 has no logarithm: linear below the first positive step, logarithmic above. Ticks at 0 and at the
    # decades above the linear part only, so that the labels of 0 and 10^0 cannot collide.
    linthresh = float(positive.min())
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    first, last = math.ceil(math.log10(linthresh) - 1e-9), math.floor(math.log10(positive.max()) + 1e-9)
    ax.xaxis.set_major_locator(FixedLocator([0.0, *(10.0**k for k in range(first, last + 1))]))
    minor = [m * 10.0**k for k in range(first - 1, last + 1) for m in range(2, 10)]
    ax.xaxis.set_minor_locator(FixedLocator([t for t in minor if linthresh <= t <= positive.max()]))


def _set_value_scale(ax: Axes, values: np.ndarray) -> None:
    """Log y-axis when the (finite, positive) values span more than a factor 20, with 1-2-5 ticks over few decades."""
    finite = values[np.isfinite(values)]
    if not (len(finite) and finite.min() > 0 and finite.max() / finite.min() >= _LOG_STEP_RATIO):
        return
    ax.set_yscale("log")
    if math.log10(finite.max() / finite.min()) <= 2.5:
        ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _series(checkpoints: Sequence[CheckpointResult], k_eigs: int, ranks: Sequence[int]) -> dict[str, np.ndarray]:
    n = len(checkpoints)
    eigs = np.full((n, k_eigs), np.nan)
    overlaps = np.full((n, len(ranks)), np.nan)
    for i, c in enumerate(checkpoints):
        top = np.asarray(c.top_eigenvalues, dtype=np.float64)[:k_eigs]
        eigs[i, : len(top)] = top
        for j, k in enumerate(ranks):
            hits = np.nonzero(np.asarray(c.overlap_k) == k)[0]
            if len(hits):
                overlaps[i, j] = c.overlap_ratio[hits[0]]
    return {
        "steps": np.array([c.step for c in checkpoints], dtype=np.float64),
        "eigs": eigs,
        "overlaps": overlaps,
        "trace": np.array([c.trace for c in checkpoints], dtype=np.float64),
        "trace_stderr": np.array([c.trace_stderr for c in checkpoints], dtype=np.float64),
        "negative_mass": np.array([c.negative_mass() for c in checkpoints], dtype=np.float64),
    }


_OVERLAP_LABEL = r"$r_k = \|P_k\, g\|^2 / \|g\|^2$"
_RANK_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


DEFAULT_OVERLAP_RANKS = (1, 5, 10)


def default_overlap_ranks(runs: Sequence[RunLike]) -> list[int]:
    """Ranks 1, 5 and 10 where the runs hold them, plus the largest stored rank when it is below 10."""
    stored = {int(k) for run in runs for c in run.checkpoints for k in c.overlap_k}
    chosen = [k for k in DEFAULT_OVERLAP_RANKS if k in stored]
    if stored and max(stored) < max(DEFAULT_OVERLAP_RANKS) and max(stored) not in chosen:
        chosen.append(max(stored))  # e.g. r_3 when only 3 eigenpairs were kept
    return chosen


@_styled
def plot_evolution(runs: Sequence[RunLike], k_eigs: int = 5, overlap_ranks: Sequence[int] | None = None) -> Figure:
    """Four panels across training steps, one colour per run (e.g. with and without BatchNorm).

    (a) the top ``k_eigs`` eigenvalues (λ1 bold, the others thin and light), (b) the gradient overlap
    ``r_k = ||P_k g||^2 / ||g||^2`` at the given ranks, (c) the Hutchinson trace with a ±1 standard-error band,
    (d) the negative-eigenvalue mass (quadrature mass below 0). The step axis is logarithmic when the steps span
    decades (symlog, linear below the first positive step, when step 0 is present), linear otherwise.

    Args:
        runs: one or more runs (``label`` and ``checkpoints``).
        k_eigs: how many top eigenvalues to draw (fewer where fewer were computed).
        overlap_ranks: ranks ``k`` of ``r_k`` to draw; a rank a checkpoint lacks leaves a gap. Default:
            :func:`default_overlap_ranks`.

    Returns:
        The figure, axes in the order (a), (b), (c), (d). In (a) each run has lines λ1..λk, in (b) one line per
        rank, in (c) and (d) one line, in run order; each line's label names the run and the quantity.

    Raises:
        ValueError: no runs, a run without checkpoints, ``k_eigs < 1``, no ranks, or a rank no checkpoint holds.
    """
    if len(runs) == 0:
        msg = "no runs to plot"
        raise ValueError(msg)
    if k_eigs < 1:
        msg = f"k_eigs must be at least 1; got {k_eigs}"
        raise ValueError(msg)
    ranks = [int(k) for k in (default_overlap_ranks(runs) if overlap_ranks is None else overlap_ranks)]
    if not ranks:
        msg = "overlap_ranks is empty"
        raise ValueError(msg)
    series = [_series(_checkpoints(run), k_eigs, ranks) for run in runs]
    # The largest rank (the subspace the gradient ends up in) gets the solid line, smaller ranks lighter styles.
    by_size = sorted(range(len(ranks)), key=lambda j: -ranks[j])
    rank_styles = [_RANK_STYLES[by_size.index(j) % len(_RANK_STYLES)] for j in range(len(ranks))]
    for j, k in enumerate(ranks):
        if all(np.all(np.isnan(s["overlaps"][:, j])) for s in series):
            available = sorted({int(k) for run in runs for c in run.checkpoints for k in c.overlap_k})
            msg = f"no checkpoint holds the overlap at rank k={k}; available ranks: {available}"
            raise ValueError(msg)

    fig = Figure(figsize=(7.2, 5.6), layout="constrained")
    ax_eig, ax_overlap, ax_trace, ax_negative = fig.subplots(2, 2, sharex=True).ravel()
    for r, (run, s) in enumerate(zip(runs, series, strict=True)):
        color = PALETTE[r % len(PALETTE)]
        steps = s["steps"]
        marker = "o" if len(steps) <= _MAX_MARKED_POINTS else None
        for i in range(k_eigs - 1, -1, -1):  # λ1 last, so it is drawn on top
            if np.all(np.isnan(s["eigs"][:, i])):
                continue
            lead = i == 0
            ax_eig.plot(
                steps, s["eigs"][:, i], color=color, linewidth=1.8 if lead else 0.8, alpha=1.0 if lead else 0.45,
                marker=marker if lead else None, markersize=3.5, zorder=3 if lead else 2,
                label=f"{run.label}: λ{i + 1}",
            )  # fmt: skip
        for j, k in enumerate(ranks):
            style, rank_marker = rank_styles[j]
            ax_overlap.plot(
                steps, s["overlaps"][:, j], color=color, linestyle=style, linewidth=1.4,
                marker=rank_marker if marker else None, markersize=3.5, label=f"{run.label}: r{k}",
            )  # fmt: skip
        trace, stderr = s["trace"], s["trace_stderr"]
        ax_trace.fill_between(steps, trace - stderr, trace + stderr, color=color, alpha=0.2, linewidth=0)
        ax_trace.plot(steps, trace, color=color, marker=marker, markersize=3.5, label=f"{run.label}: trace")
        ax_negative.plot(
            steps, s["negative_mass"], color=color, marker=marker, markersize=3.5,
            label=f"{run.label}: negative mass",
        )  # fmt: skip

    _set_step_axis(ax_eig, np.concatenate([s["steps"] for s in series]))  # the axes share x
    _set_value_scale(ax_eig, np.concatenate([s["eigs"].ravel() for s in series]))
    _set_value_scale(ax_trace, np.concatenate([s["trace"] for s in series]))
    ax_overlap.set_ylim(0.0, 1.03)
    ax_negative.set_ylim(bottom=0.0)

    ax_eig.set_title("(a) top eigenvalues")
    ax_eig.set_ylabel(r"eigenvalue $\lambda_i$")
    more = rf"$\lambda_2 \ldots \lambda_{{{k_eigs}}}$" if k_eigs > 2 else r"$\lambda_2$"
    eig_handles = [Line2D([], [], color="0.2", linewidth=1.8, label=r"$\lambda_1$")]
    if k_eigs > 1:
        eig_handles.append(Line2D([], [], color="0.2", linewidth=0.8, alpha=0.45, label=more))
    ax_eig.legend(handles=eig_handles, loc="best")
    ax_overlap.set_title("(b) gradient overlap")
    ax_overlap.set_ylabel(_OVERLAP_LABEL)
    rank_handles = [
        Line2D([], [], color="0.2", linestyle=style, marker=m, markersize=3.5, label=f"k = {k}")
        for k, (style, m) in zip(ranks, rank_styles, strict=True)
    ]
    ax_overlap.legend(handles=rank_handles, loc="best")
    ax_trace.set_title("(c) trace (± 1 s.e.)")
    ax_trace.set_ylabel(r"$\mathrm{tr}(H)$")
    ax_negative.set_title("(d) negative eigenvalues")
    ax_negative.set_ylabel(r"mass of $\lambda < 0$")
    for ax in (ax_trace, ax_negative):
        ax.set_xlabel("training step")
    for ax in (ax_eig, ax_overlap, ax_trace, ax_negative):
        _finish_axes(ax)
    run_handles = [
        Line2D([], [], color=PALETTE[r % len(PALETTE)], linewidth=2.0, label=run.label) for r, run in enumerate(runs)
    ]
    fig.legend(handles=run_handles, loc="outside upper center", ncols=min(len(runs), 4))
    return fig


@_styled
def plot_overlap(run: RunLike, step: int | None = None) -> Figure:
    """How the gradient splits over the top eigenvectors at one checkpoint.

    Bars: ``cos^2`` of the angle between the gradient and each top Ritz vector (its share of ``||g||^2``), against
    the eigenvector index (descending eigenvalue), on the left axis. Line: the cumulative overlap ``r_k`` at the
    stored ranks, on the right axis (0 to 1).

    Args:
        run: the results of one run.
        step: the checkpoint's step; default the last.

    Returns:
        The figure; ``fig.axes[0]`` holds the bars, ``fig.axes[1]`` the ``r_k`` line.

    Raises:
        ValueError: the run holds no checkpoints, or none at ``step``.
    """
    checkpoints = _checkpoints(run)
    checkpoint = checkpoints[-1] if step is None else _checkpoint_at(run, checkpoints, int(step))
    cos2 = np.asarray(checkpoint.cos2, dtype=np.float64)
    index = np.arange(1, len(cos2) + 1)

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    bar_color, line_color = PALETTE[0], PALETTE[1]
    ax.bar(index, cos2, width=0.7, color=bar_color, label=r"$\cos^2(g, v_i)$ per eigenvector (left)")
    ax.set_xlabel(r"eigenvector $i$ (by descending $\lambda_i$)")
    ax.set_ylabel(r"$\cos^2(g, v_i)$", color=bar_color)
    ax.tick_params(axis="y", colors=bar_color)
    top = float(np.nanmax(cos2)) if len(cos2) else 1.0
    ax.set_ylim(0.0, 1.1 * top if top > 0 else 1.0)
    highest = max([len(cos2), *[int(k) for k in checkpoint.overlap_k]], default=1)
    ax.xaxis.set_major_locator(FixedLocator(range(1, highest + 1)) if highest <= 12 else MaxNLocator(integer=True))
    ax.set_xlim(0.4, highest + 0.6)

    twin = ax.twinx()
    twin.spines["right"].set_visible(True)
    twin.plot(
        checkpoint.overlap_k, checkpoint.overlap_ratio, color=line_color, marker="o", markersize=4,
        label=r"cumulative $r_k$ (right)",
    )  # fmt: skip
    twin.set_ylim(0.0, 1.03)
    twin.set_ylabel(_OVERLAP_LABEL, color=line_color)
    twin.tick_params(axis="y", colors=line_color)
    # No grid: the two y-axes' ticks do not line up.
    _finish_axes(ax, grid=False)
    _finish_axes(twin, grid=False)
    ax.legend(
        handles=[*ax.containers[:1], *twin.get_lines()], loc="lower right", bbox_to_anchor=(1.0, 1.0),
        ncols=2, borderaxespad=0.2,
    )  # fmt: skip
    ax.set_title(f"{run.label}: step {checkpoint.step}, " + rf"$\lambda_1$ = {checkpoint.lambda_max:.3g}", pad=22)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as PNG (200 dpi), PDF or SVG, chosen by the file suffix, cropped to its content.

    Fonts are embedded as TrueType in PDF (editable in vector editors); PDF and SVG carry no creation date, so
    the same figure gives the same bytes.

    Args:
        fig: the figure.
        path: destination ending in ``.png``, ``.pdf`` or ``.svg`` (any case); its folder must exist.

    Returns:
        The path written.

    Raises:
        ValueError: another suffix.
    """
    path = Path(path)
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        got = repr(path.suffix) if path.suffix else "no suffix"
        msg = f"cannot tell the image format of {str(path)!r} ({got}); use one of {', '.join(_SAVE_FORMATS)}"
        raise ValueError(msg)
    kwargs: dict = {"format": fmt, "bbox_inches": "tight", "pad_inches": 0.03}
    if fmt == "png":
        kwargs["dpi"] = _PNG_DPI
    elif fmt == "pdf":
        kwargs["metadata"] = {"CreationDate": None}
    else:
        kwargs["metadata"] = {"Date": None}
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "hessspec"}):
        fig.savefig(path, **kwargs)
    return path
