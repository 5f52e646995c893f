"""How the gradient splits over the top eigenvectors at one checkpoint (:func:`plot_overlap`)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

from hessspec.plots._style import OVERLAP_LABEL, PALETTE, RunLike, checkpoint_at, finish_axes, results_of, styled


@styled
def plot_overlap(run: RunLike, step: int | None = None) -> Figure:
    """How the gradient splits over the top eigenvectors at one checkpoint.

    Bars: ``cos^2`` of the angle between the gradient and each top Ritz vector (its share of ``||g||^2``), against
    the eigenvector index (descending eigenvalue), on the left axis. Line: the cumulative overlap ``r_k`` at the
    stored ranks, on the right axis (0 to 1). Pairs that are not converged are drawn as hatched outlines, and
    ``r_k`` only where the top ``k`` pairs are all converged.

    Args:
        run: the results of one run.
        step: the checkpoint's step; default the last.

    Returns:
        The figure; ``fig.axes[0]`` holds the bars, ``fig.axes[1]`` the ``r_k`` line.

    Raises:
        ValueError: the run holds no checkpoints, or none at ``step``.
    """
    checkpoints = results_of(run)
    checkpoint = checkpoints[-1] if step is None else checkpoint_at(run, checkpoints, int(step))
    cos2 = np.asarray(checkpoint.cos2, dtype=np.float64)
    index = np.arange(1, len(cos2) + 1)
    converged = (
        np.ones(len(cos2), dtype=bool) if checkpoint.top_converged is None else np.asarray(checkpoint.top_converged)
    )
    trusted = np.asarray(checkpoint.overlap_k) <= checkpoint.trusted_rank()

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    bar_color, line_color = PALETTE[0], PALETTE[1]
    label = r"$\cos^2(g, v_i)$ per eigenvector (left)"
    ax.bar(index[converged], cos2[converged], width=0.7, color=bar_color, label=label)
    if not converged.all():
        ax.bar(
            index[~converged], cos2[~converged], width=0.7, color="none", edgecolor="0.6", hatch="///",
            label="not converged (left)",
        )  # fmt: skip
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
        checkpoint.overlap_k[trusted], checkpoint.overlap_ratio[trusted], color=line_color, marker="o", markersize=4,
        label=r"cumulative $r_k$ (right)",
    )  # fmt: skip
    twin.set_ylim(0.0, 1.03)
    twin.set_ylabel(OVERLAP_LABEL, color=line_color)
    twin.tick_params(axis="y", colors=line_color)
    # No grid: the two y-axes' ticks do not line up.
    finish_axes(ax, grid=False)
    finish_axes(twin, grid=False)
    ax.legend(
        handles=[*ax.containers[:2], *twin.get_lines()], loc="lower right", bbox_to_anchor=(1.0, 1.0),
        ncols=2, borderaxespad=0.2,
    )  # fmt: skip
    ax.set_title(f"{run.label}: step {checkpoint.step}, " + rf"$\lambda_1$ = {checkpoint.lambda_max:.3g}", pad=22)
    return fig
