"""Per-block densities side by side (:func:`plot_blocks`): where in the network the curvature is."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from hessspec.linalg import spectrum
from hessspec.plots._style import RunLike, checkpoint_at, describe_kind, results_of, step_colors, styled
from hessspec.plots.density import (
    DEFAULT_RESOLUTION,
    default_steps,
    density_ylim,
    display_density,
    draw_density_panel,
    finish_density_axes,
    outlier_count,
    outlier_legend,
    outliers,
)
from hessspec.results import WHOLE_HESSIAN


def _stored_blocks(run: RunLike, curvature: str) -> list[str]:
    kinds = getattr(run, "kinds", None)
    if kinds is None:
        kinds = [(c.curvature, c.block) for c in getattr(run, "results", run.checkpoints)]
    return list(dict.fromkeys(block for c, block in kinds if c == curvature and block != WHOLE_HESSIAN[1]))


@styled
def plot_blocks(
    run: RunLike,
    steps: Sequence[int] | None = None,
    blocks: Sequence[str] | None = None,
    curvature: str = WHOLE_HESSIAN[0],
    sigma2: float = spectrum.DEFAULT_SIGMA2,
    log: bool = True,
    resolution: float = DEFAULT_RESOLUTION,
) -> Figure:
    """A grid of per-block densities: one row per parameter block, one column per step, on one eigenvalue axis.

    Each panel is the density of the block's diagonal block of the curvature (smoothed as in
    :func:`hessspec.plots.plot_density`), with its outliers ticked along the top. All panels share the eigenvalue
    axis and the density axis, so blocks and steps compare at a glance: which block carries the outliers, and how
    wide each block's bulk is.

    Args:
        run: a run with per-block results (``select``, ``kinds``: ``hessspec.store.RunResults``).
        steps: steps to draw; default up to 3 spread over the run (:func:`default_steps`).
        blocks: blocks to draw, one row each, in this order; default every block stored for ``curvature`` (not
            "all"; pass it to add the whole-model row).
        curvature: the curvature (default the Hessian).
        sigma2: relative kernel variance (default 1e-5, the paper's).
        log: log density axis (the paper's view).
        resolution: the display kernel's least standard deviation in mean Ritz spacings.

    Returns:
        The figure; ``fig.axes`` are the panels block by block (rows), in step order, one density line each.

    Raises:
        ValueError: the run holds no per-block results of ``curvature``, a requested block or step is not stored,
            or ``steps``/``blocks`` is empty.
    """
    names = list(blocks) if blocks is not None else _stored_blocks(run, curvature)
    if not names:
        msg = (
            f"run {run.label!r} holds no per-block results for {curvature} "
            "(analyse with --blocks to compute them); nothing to plot"
        )
        raise ValueError(msg)
    results = {name: results_of(run, curvature, name) for name in names}
    if steps is None:
        common = set.intersection(*({c.step for c in found} for found in results.values()))
        steps = default_steps(sorted(common or {c.step for c in results[names[0]]}), max_count=3)
    elif len(steps) == 0:
        msg = "steps is empty; pass None for a default choice"
        raise ValueError(msg)
    chosen = [[checkpoint_at(run, results[name], int(s)) for s in steps] for name in names]
    densities = [[display_density(c, sigma2, resolution) for c in row] for row in chosen]
    flat_c = [c for row in chosen for c in row]
    flat_d = [d for row in densities for d in row]
    xlim = (min(float(d.grid[0]) for d in flat_d), max(float(d.grid[-1]) for d in flat_d))
    ylim = density_ylim(flat_c, flat_d, log)
    colors = step_colors([int(s) for s in steps])

    nrows, ncols = len(names), len(steps)
    fig = Figure(figsize=(2.5 * ncols + 1.2, 1.45 * nrows + 1.0), layout="constrained")
    panels = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    any_outliers = False
    for r, name in enumerate(names):
        for i in range(ncols):
            ax, c, d = panels[r, i], chosen[r][i], densities[r][i]
            found = outliers(c)
            any_outliers |= bool(len(found))
            draw_density_panel(ax, c, d, found, colors[i])
            ax.set_title(f"step {c.step}{outlier_count(found)}" if r == 0 else outlier_count(found).strip())
            if i == 0:
                ax.set_ylabel(f"{name}\n(n = {c.n_params:,})")
            if r == nrows - 1:
                ax.set_xlabel("eigenvalue λ")
            ax.set_xlim(*xlim)
    if any_outliers:
        outlier_legend(fig)
    kind = describe_kind(curvature, "all") or "Hessian"
    fig.suptitle(f"{run.label}: densities of the diagonal blocks ({kind})")
    finish_density_axes(list(panels.ravel()), log, ylim)
    return fig
