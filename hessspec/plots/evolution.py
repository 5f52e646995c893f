"""The spectrum across training (:func:`plot_evolution`): top eigenvalues, gradient overlap, trace, negative mass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, Locator, LogLocator, NullFormatter

from hessspec.plots._style import OVERLAP_LABEL, PALETTE, SMALL_FONT_SIZE, RunLike, finish_axes, results_of, styled
from hessspec.plots.density import LOG_STEP_RATIO
from hessspec.results import WHOLE_HESSIAN, CheckpointResult

# Markers on the evolution curves while there are few enough checkpoints for them to stay apart.
_MAX_MARKED_POINTS = 40
_RANK_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
DEFAULT_OVERLAP_RANKS = (1, 5, 10)


def _step_text(value: float, _position: object = None) -> str:
    return f"{int(round(value)):,}"


class AnalysedStepLocator(Locator):
    """Major ticks at analysed steps: the first and the last, and others wherever their labels fit between.

    Positions are decided at draw time, from the axis' real scale and width and the labels' widths (a digit is
    ~0.64 em wide, a comma ~0.32 em, in DejaVu Sans), so that no two labels touch whatever the figure size.
    """

    def __init__(self, steps: Sequence[float]) -> None:
        self.steps = np.unique(np.asarray(steps, dtype=float))

    def __call__(self) -> list[float]:
        steps = self.steps
        if len(steps) <= 2 or self.axis is None:
            return steps.tolist()
        axes = self.axis.axes
        x = axes.transData.transform(np.column_stack([steps, np.zeros_like(steps)]))[:, 0]
        em = SMALL_FONT_SIZE * axes.figure.dpi / 72.0
        half = np.array([0.5 * em * sum(0.32 if ch == "," else 0.64 for ch in _step_text(s)) for s in steps])

        def apart(i: int, j: int) -> bool:
            return abs(x[i] - x[j]) >= half[i] + half[j] + 0.4 * em

        chosen, last = [0], len(steps) - 1
        for i in range(1, last):
            if apart(i, chosen[-1]) and apart(i, last):
                chosen.append(i)
        chosen.append(last)
        return steps[chosen].tolist()

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        return self.steps.tolist()


def set_step_axis(ax: Axes, steps: np.ndarray) -> None:
    """Linear, log or symlog step axis (log scales when the steps span decades), labelled at analysed steps.

    On a log or symlog axis the major ticks are analysed steps, as many as fit without their labels touching
    (:class:`AnalysedStepLocator`), written in full ("0", "30", "3,000"); every analysed step has a minor tick, so
    the axis shows where the checkpoints are. A linear axis keeps matplotlib's round ticks.
    """
    positive = steps[steps > 0]
    if len(positive) == 0 or positive.max() / positive.min() < LOG_STEP_RATIO:
        return
    analysed = np.unique(steps)
    if steps.min() > 0:
        ax.set_xscale("log")
    else:
        # Step 0 has no logarithm: linear below the first positive step, logarithmic above.
        ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.5)
    ax.xaxis.set_major_locator(AnalysedStepLocator(analysed))
    ax.xaxis.set_major_formatter(FuncFormatter(_step_text))
    ax.xaxis.set_minor_locator(FixedLocator(analysed))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _set_value_scale(ax: Axes, values: np.ndarray) -> bool:
    """Log y-axis when the (finite, positive) values span more than a factor 20, with 1-2-5 ticks over few decades."""
    finite = values[np.isfinite(values)]
    if not (len(finite) and finite.min() > 0 and finite.max() / finite.min() >= LOG_STEP_RATIO):
        return False
    ax.set_yscale("log")
    if math.log10(finite.max() / finite.min()) <= 2.5:
        ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    return True


@dataclass(frozen=True)
class _Series:
    label: str
    color: str
    steps: np.ndarray
    eigs: np.ndarray
    overlaps: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray
    negative_mass: np.ndarray


def _series(label: str, color: str, checkpoints: Sequence[CheckpointResult], k_eigs: int, ranks) -> _Series:
    n = len(checkpoints)
    eigs = np.full((n, k_eigs), np.nan)
    overlaps = np.full((n, len(ranks)), np.nan)
    for i, c in enumerate(checkpoints):
        # Unconverged pairs, and overlaps over them, leave gaps (CheckpointResult.top_converged).
        top = np.asarray(c.top_eigenvalues, dtype=np.float64)[:k_eigs].copy()
        if c.top_converged is not None:
            top[~np.asarray(c.top_converged, dtype=bool)[:k_eigs]] = np.nan
        eigs[i, : len(top)] = top
        for j, k in enumerate(ranks):
            hits = np.nonzero(np.asarray(c.overlap_k) == k)[0]
            if len(hits) and k <= c.trusted_rank():
                overlaps[i, j] = c.overlap_ratio[hits[0]]
    return _Series(
        label=label,
        color=color,
        steps=np.array([c.step for c in checkpoints], dtype=np.float64),
        eigs=eigs,
        overlaps=overlaps,
        trace=np.array([c.trace for c in checkpoints], dtype=np.float64),
        trace_stderr=np.array([c.trace_stderr for c in checkpoints], dtype=np.float64),
        negative_mass=np.array([c.clear_negative_mass(_NEGATIVE_TAU) for c in checkpoints], dtype=np.float64),
    )


_NEGATIVE_TAU = 0.01  # panel (d): the mass below -0.01 ||H||, stable where the mass below 0 is not
_NEGATIVE_LABEL = r"mass of $\lambda < -0.01\,\|H\|$"


def default_overlap_ranks(runs: Sequence[RunLike]) -> list[int]:
    """Ranks 1, 5 and 10 where the runs hold them, plus the largest stored rank when it is below 10."""
    stored = {int(k) for run in runs for c in run.checkpoints for k in c.overlap_k}
    chosen = [k for k in DEFAULT_OVERLAP_RANKS if k in stored]
    if stored and max(stored) < max(DEFAULT_OVERLAP_RANKS) and max(stored) not in chosen:
        chosen.append(max(stored))  # e.g. r_3 when only 3 eigenpairs were kept
    return chosen


def _draw_trace(ax: Axes, series: Sequence[_Series], marker_for) -> None:
    """Trace lines with ±1 s.e. bands; on a log axis a band reaching below the axis is cut at its bottom."""
    log = _set_value_scale(ax, np.concatenate([s.trace for s in series]))
    if log:
        positive = np.concatenate([s.trace[np.isfinite(s.trace)] for s in series])
        lowers = np.concatenate([s.trace - s.trace_stderr for s in series])
        lowers = lowers[np.isfinite(lowers) & (lowers > 0)]
        bottom = 0.5 * min(positive.min(), lowers.min() if len(lowers) else positive.min())
        top = 2.0 * max(float(np.nanmax(s.trace + s.trace_stderr)) for s in series)
        ax.set_ylim(bottom, top)
    for s in series:
        lower, upper = s.trace - s.trace_stderr, s.trace + s.trace_stderr
        if log:
            # A band below 0 has no place on a log axis: draw it down to the axis, where it leaves the panel.
            lower = np.maximum(lower, ax.get_ylim()[0])
        ax.fill_between(s.steps, lower, upper, color=s.color, alpha=0.2, linewidth=0)
        ax.plot(s.steps, s.trace, color=s.color, marker=marker_for(s), markersize=3.5, label=f"{s.label}: trace")


def _series_for(runs, curvatures, blocks, k_eigs, ranks) -> list[_Series]:
    several_kinds = len(curvatures) * len(blocks) > 1
    out = []
    for run in runs:
        for curvature in curvatures:
            for block in blocks:
                checkpoints = results_of(run, curvature, block)
                label = run.label
                if several_kinds:
                    parts = ([curvature] if len(curvatures) > 1 else []) + ([block] if len(blocks) > 1 else [])
                    label = f"{run.label}, {' '.join(parts)}" if len(runs) > 1 else " ".join(parts)
                out.append(_series(label, PALETTE[len(out) % len(PALETTE)], checkpoints, k_eigs, ranks))
    return out


@styled
def plot_evolution(
    runs: Sequence[RunLike],
    k_eigs: int = 5,
    overlap_ranks: Sequence[int] | None = None,
    curvatures: Sequence[str] = (WHOLE_HESSIAN[0],),
    blocks: Sequence[str] = (WHOLE_HESSIAN[1],),
) -> Figure:
    """Four panels across training steps, one colour per run (e.g. with and without BatchNorm), or per curvature
    or block of a run (e.g. the Hessian against the Gauss–Newton matrix).

    (a) the top ``k_eigs`` eigenvalues (λ1 bold, the others thin and light), (b) the gradient overlap
    ``r_k = ||P_k g||^2 / ||g||^2`` at the given ranks, (c) the Hutchinson trace with a ±1 standard-error band
    (on a log axis a band reaching below zero is cut at the bottom of the axis; none where the standard error is n/a,
    with one probe), (d) the estimated fraction of eigenvalues below ``-0.01 ||H||``
    (:meth:`~hessspec.results.CheckpointResult.clear_negative_mass`; the mass below 0 itself jumps with the sign of
    the heavy node at 0). Eigenvalues and overlaps over pairs that are not converged are left out (gaps). The step
    axis is logarithmic when the steps span decades (symlog, linear below the
    first positive step, when step 0 is present), labelled at analysed steps; linear otherwise.

    Args:
        runs: one or more runs (``label`` and ``checkpoints``; ``select`` for curvatures or blocks other than the
            whole-model Hessian).
        k_eigs: how many top eigenvalues to draw (fewer where fewer were computed).
        overlap_ranks: ranks ``k`` of ``r_k`` to draw; a rank a checkpoint lacks leaves a gap. Default:
            :func:`default_overlap_ranks`.
        curvatures: the curvatures to draw, one series each (default the Hessian).
        blocks: the blocks to draw, one series each (default "all").

    Returns:
        The figure, axes in the order (a), (b), (c), (d). One series per (run, curvature, block), in that order;
        it is labelled with the run's label when there is one curvature and one block, else with what tells them
        apart. In (a) each series has lines ``"<series>: λ1"``..., in (b) one line per rank ``"<series>: r<k>"``,
        in (c) ``"<series>: trace"``, in (d) ``"<series>: mass λ<-0.01‖H‖"``.

    Raises:
        ValueError: no runs, a run without results (of a requested curvature and block), ``k_eigs < 1``, no ranks,
            or a rank no checkpoint holds.
    """
    if len(runs) == 0:
        msg = "no runs to plot"
        raise ValueError(msg)
    if k_eigs < 1:
        msg = f"k_eigs must be at least 1; got {k_eigs}"
        raise ValueError(msg)
    if not curvatures or not blocks:
        msg = "curvatures and blocks must not be empty"
        raise ValueError(msg)
    ranks = [int(k) for k in (default_overlap_ranks(runs) if overlap_ranks is None else overlap_ranks)]
    if not ranks:
        msg = "overlap_ranks is empty"
        raise ValueError(msg)
    series = _series_for(runs, list(curvatures), list(blocks), k_eigs, ranks)
    # The largest rank (the subspace the gradient ends up in) gets the solid line, smaller ranks lighter styles.
    by_size = sorted(range(len(ranks)), key=lambda j: -ranks[j])
    rank_styles = [_RANK_STYLES[by_size.index(j) % len(_RANK_STYLES)] for j in range(len(ranks))]
    available = sorted({int(k) for run in runs for c in run.checkpoints for k in c.overlap_k})
    for k in ranks:
        if k not in available:
            msg = f"no checkpoint holds the overlap at rank k={k}; available ranks: {available}"
            raise ValueError(msg)

    def marker_for(s: _Series) -> str | None:
        return "o" if len(s.steps) <= _MAX_MARKED_POINTS else None

    fig = Figure(figsize=(7.2, 5.6), layout="constrained")
    ax_eig, ax_overlap, ax_trace, ax_negative = fig.subplots(2, 2, sharex=True).ravel()
    for s in series:
        marker = marker_for(s)
        for i in range(k_eigs - 1, -1, -1):  # λ1 last, so it is drawn on top
            if np.all(np.isnan(s.eigs[:, i])):
                continue
            lead = i == 0
            ax_eig.plot(
                s.steps, s.eigs[:, i], color=s.color, linewidth=1.8 if lead else 0.8, alpha=1.0 if lead else 0.45,
                marker=marker if lead else None, markersize=3.5, zorder=3 if lead else 2, label=f"{s.label}: λ{i + 1}",
            )  # fmt: skip
        for j, k in enumerate(ranks):
            style, rank_marker = rank_styles[j]
            ax_overlap.plot(
                s.steps, s.overlaps[:, j], color=s.color, linestyle=style, linewidth=1.4,
                marker=rank_marker if marker else None, markersize=3.5, label=f"{s.label}: r{k}",
            )  # fmt: skip
        ax_negative.plot(
            s.steps, s.negative_mass, color=s.color, marker=marker, markersize=3.5, label=f"{s.label}: mass λ<-0.01‖H‖"
        )
    _draw_trace(ax_trace, series, marker_for)

    set_step_axis(ax_eig, np.concatenate([s.steps for s in series]))  # the axes share x
    _set_value_scale(ax_eig, np.concatenate([s.eigs.ravel() for s in series]))
    ax_overlap.set_ylim(0.0, 1.03)
    ax_negative.set_ylim(bottom=0.0)

    ax_eig.set_title("(a) top eigenvalues")
    ax_eig.set_ylabel(r"eigenvalue $\lambda_i$")
    more = rf"$\lambda_2 \ldots \lambda_{{{k_eigs}}}$" if k_eigs > 2 else r"$\lambda_2$"
    eig_handles = [Line2D([], [], color="0.2", linewidth=1.8, label=r"$\lambda_1$")]
    if k_eigs > 1:
        eig_handles.append(Line2D([], [], color="0.2", linewidth=0.8, alpha=0.45, label=more))
    ax_eig.legend(handles=eig_handles, loc="best")
    ax_overlap.set_title("(b) overlap")
    ax_overlap.set_ylabel(OVERLAP_LABEL)
    rank_handles = [
        Line2D([], [], color="0.2", linestyle=style, marker=m, markersize=3.5, label=f"k = {k}")
        for k, (style, m) in zip(ranks, rank_styles, strict=True)
    ]
    # In a row above the panel, right of its title: inside, it would cover curves that run near 0 or near 1.
    ax_overlap.legend(
        handles=rank_handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(rank_handles), frameon=False,
        borderaxespad=0.1, columnspacing=0.6, handlelength=1.5, handletextpad=0.3, fontsize=9,
    )  # fmt: skip
    one_probe = any(np.any(np.isnan(s.trace_stderr)) for s in series)
    ax_trace.set_title("(c) trace (± 1 s.e.; n/a with one probe)" if one_probe else "(c) trace (± 1 s.e.)")
    ax_trace.set_ylabel(r"$\mathrm{tr}(H)$" if list(curvatures) == [WHOLE_HESSIAN[0]] else "trace")
    ax_negative.set_title("(d) negative eigenvalues")
    ax_negative.set_ylabel(_NEGATIVE_LABEL)
    for ax in (ax_trace, ax_negative):
        ax.set_xlabel("training step")
    for ax in (ax_eig, ax_overlap, ax_trace, ax_negative):
        finish_axes(ax)
    handles = [Line2D([], [], color=s.color, linewidth=2.0, label=s.label) for s in series]
    title = runs[0].label if len(runs) == 1 and len(series) > 1 else None
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(series), 4), title=title)
    return fig
