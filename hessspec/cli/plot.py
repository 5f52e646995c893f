"""``hessspec plot density|blocks|evolution|overlap``: thin wrappers over :mod:`hessspec.plots`.

matplotlib is imported only when a plot is made; the non-interactive Agg backend is selected then, unless the
user chose a backend (``MPLBACKEND``, a matplotlibrc, or pyplot already in use).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, parse_int_list, writable_output
from hessspec.linalg.spectrum import DEFAULT_SIGMA2

DEFAULT_RESOLUTION = 0.25  # hessspec.plots.DEFAULT_RESOLUTION (not imported here: it loads matplotlib)

_FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def use_agg_unless_chosen() -> None:
    """Select matplotlib's Agg backend unless a backend was already chosen."""
    import matplotlib

    if os.environ.get("MPLBACKEND") or "matplotlib.pyplot" in sys.modules:
        return
    requested = getattr(matplotlib.rcParams, "_get_backend_or_none", None)
    if requested is None or requested() is not None:
        return
    matplotlib.use("Agg")


def _figure_path(out: str) -> Path:
    path = writable_output(out, "figure")
    if path.suffix.lower() not in _FIGURE_SUFFIXES:
        got = repr(path.suffix) if path.suffix else "no suffix"
        msg = f"cannot tell the image format of {out!r} ({got}); use one of {', '.join(_FIGURE_SUFFIXES)}"
        raise click.BadParameter(msg, param_hint="--out")
    return path


def _save(fig, path: Path) -> None:
    from hessspec._paths import make_parent
    from hessspec.plots import save_figure

    save_figure(fig, make_parent(path))
    click.echo(f"wrote {path}")


def _load(path: str, kinds: list[tuple[str, str]] | None = None):
    """Read a result file; refuse one without results of the (curvature, block) pairs asked for, naming those
    it holds."""
    from hessspec.store import load_results

    run = load_results(path)
    if not run.results:
        msg = f"{run.path} holds no checkpoints yet; nothing to plot"
        raise click.ClickException(msg)
    for curvature, block in kinds or [("hessian", "all")]:
        if not run.select(curvature, block):
            held = ", ".join(f"{c}/{b}" for c, b in run.kinds)
            msg = f"{run.path} holds no results for curvature {curvature!r}, block {block!r} (it holds {held})"
            raise click.ClickException(msg)
    return run


_out_option = click.option(
    "--out", "out", required=True, metavar="FIG", help="Figure file; PNG, PDF or SVG by its suffix."
)


@click.group(context_settings=CONTEXT_SETTINGS, short_help="Draw densities, block densities, evolution or overlap.")
@debug_option
def plot() -> None:
    """Figures from result files (PNG, PDF or SVG, chosen by the --out suffix)."""
    # Warnings (e.g. several checkpoint files at a drawn step) as one line on stderr, for this command only.
    from hessspec.results import HessspecWarning

    saved = (warnings.showwarning, warnings.filters[:])

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(f"Warning: {' '.join(str(message).split())}", err=True)

    def restore() -> None:
        warnings.showwarning, warnings.filters[:] = saved

    warnings.showwarning = one_line
    warnings.simplefilter("always", HessspecWarning)
    click.get_current_context().call_on_close(restore)


_steps_option = click.option(
    "--steps", "steps", metavar="S[,S...]", multiple=True, show_default="up to 5 spread over the run (4 for several "
    "files, 3 for blocks)", help="Steps to draw (comma-separated or repeated).",
)  # fmt: skip
_sigma2_option = click.option(
    "--sigma2", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_SIGMA2,
    help="Relative variance of the Gaussian smoothing (Ghorbani et al. 2019).",
)  # fmt: skip
_resolution_option = click.option(
    "--resolution", type=click.FloatRange(min=0), default=DEFAULT_RESOLUTION,
    help="Widen the smoothing to at least this many mean Ritz-value spacings (what m Lanczos steps resolve; "
    "0: the --sigma2 kernel alone). Drawing only: the stored quadrature is raw.",
)  # fmt: skip
_linear_option = click.option("--linear", is_flag=True, help="Linear density axis instead of the paper's log axis.")
_curvature_help = "Curvature: hessian, ggn, empirical-fisher, gradient-covariance or residual, as stored."


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("files", metavar="FILE.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_steps_option
@_sigma2_option
@_resolution_option
@_linear_option
@click.option(
    "--layout", type=click.Choice(["grid", "overlay"]), default="grid",
    help="grid: one panel per step (one row per file), each on its own eigenvalue axis; overlay: the steps in one "
    "panel per file.",
)  # fmt: skip
@click.option("--share-x", is_flag=True, help="One eigenvalue axis for every grid panel.")
@click.option("--curvature", default="hessian", help=_curvature_help)
@click.option("--block", default="all", help="Parameter block ('all': the whole parameter set).")
@_out_option
@debug_option
def density(
    files: tuple[str, ...],
    steps: tuple[str, ...],
    sigma2: float,
    resolution: float,
    linear: bool,
    layout: str,
    share_x: bool,
    curvature: str,
    block: str,
    out: str,
) -> None:
    """Smoothed eigenvalue densities at a few steps, with the outliers marked; several files (e.g. without and
    with BatchNorm) side by side."""
    path = _figure_path(out)
    chosen = parse_int_list(steps, "--steps") or None
    runs = [_load(file, [(curvature, block)]) for file in files]
    use_agg_unless_chosen()
    from hessspec.plots import plot_density

    fig = plot_density(
        runs, steps=chosen, sigma2=sigma2, log=not linear, layout=layout, resolution=resolution, sharex=share_x,
        curvature=curvature, block=block,
    )  # fmt: skip
    _save(fig, path)


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("file", metavar="FILE.h5", type=click.Path(dir_okay=False))
@_steps_option
@click.option(
    "--block", "blocks", multiple=True, metavar="NAME", show_default="every block stored",
    help="Blocks to draw, one row each, in this order (repeatable; 'all' adds the whole model).",
)  # fmt: skip
@click.option("--curvature", default="hessian", help=_curvature_help)
@_sigma2_option
@_resolution_option
@_linear_option
@_out_option
@debug_option
def blocks(
    file: str,
    steps: tuple[str, ...],
    blocks: tuple[str, ...],
    curvature: str,
    sigma2: float,
    resolution: float,
    linear: bool,
    out: str,
) -> None:
    """Densities of the diagonal blocks (one row per parameter block, one column per step) on one eigenvalue axis:
    where in the network the curvature is. Needs a file analysed with --blocks."""
    path = _figure_path(out)
    chosen = parse_int_list(steps, "--steps") or None
    run = _load(file, [(curvature, b) for b in blocks] or None)
    use_agg_unless_chosen()
    from hessspec.plots import plot_blocks

    fig = plot_blocks(
        run, steps=chosen, blocks=list(blocks) or None, curvature=curvature, sigma2=sigma2, log=not linear,
        resolution=resolution,
    )  # fmt: skip
    _save(fig, path)


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("files", metavar="FILE.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--k-eigs", type=click.IntRange(min=1), default=5, help="How many top eigenvalues to draw.")
@click.option(
    "--ranks", "ranks", metavar="K[,K...]", multiple=True,
    show_default="those of 1,5,10 the files hold, and their largest",
    help="Ranks k of the gradient overlap r_k to draw.",
)  # fmt: skip
@click.option(
    "--curvature", "curvatures", multiple=True, metavar="NAME", show_default="hessian",
    help="Curvatures to draw, one colour each (repeatable: e.g. hessian and ggn).",
)  # fmt: skip
@click.option(
    "--block", "blocks", multiple=True, metavar="NAME", show_default="all",
    help="Parameter blocks to draw, one colour each (repeatable).",
)  # fmt: skip
@_out_option
@debug_option
def evolution(
    files: tuple[str, ...],
    k_eigs: int,
    ranks: tuple[str, ...],
    curvatures: tuple[str, ...],
    blocks: tuple[str, ...],
    out: str,
) -> None:
    """Top eigenvalues, gradient overlap, trace and negative mass across training, one colour per file (and per
    curvature and block asked for)."""
    path = _figure_path(out)
    chosen = parse_int_list(ranks, "--ranks")
    curvatures = curvatures or ("hessian",)
    blocks = blocks or ("all",)
    runs = [_load(file, [(c, b) for c in curvatures for b in blocks]) for file in files]
    use_agg_unless_chosen()
    from hessspec.plots import plot_evolution

    fig = plot_evolution(runs, k_eigs=k_eigs, overlap_ranks=chosen or None, curvatures=curvatures, blocks=blocks)
    _save(fig, path)


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("file", metavar="FILE.h5", type=click.Path(dir_okay=False))
@click.option("--step", type=int, default=None, show_default="the last", help="Checkpoint to show.")
@_out_option
@debug_option
def overlap(file: str, step: int | None, out: str) -> None:
    """How the gradient splits over the top eigenvectors at one checkpoint (cos^2 per vector, cumulative r_k)."""
    path = _figure_path(out)
    run = _load(file)
    use_agg_unless_chosen()
    from hessspec.plots import plot_overlap

    _save(plot_overlap(run, step=step), path)
