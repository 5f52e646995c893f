"""``hessspec plot density|evolution|overlap``: thin wrappers over :mod:`hessspec.plots`.

matplotlib is imported only when a plot is made; the non-interactive Agg backend is selected then, unless the
user chose a backend (``MPLBACKEND``, a matplotlibrc, or pyplot already in use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, parse_int_list, writable_output
from hessspec.linalg.spectrum import DEFAULT_SIGMA2

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


def _load(path: str):
    from hessspec.store import load_results

    run = load_results(path)
    if not run.checkpoints:
        msg = f"{run.path} holds no checkpoints yet; nothing to plot"
        raise click.ClickException(msg)
    return run


_out_option = click.option(
    "--out", "out", required=True, metavar="FIG", help="Figure file; PNG, PDF or SVG by its suffix."
)


@click.group(context_settings=CONTEXT_SETTINGS, short_help="Draw densities, evolution or gradient overlap.")
@debug_option
def plot() -> None:
    """Figures from result files (PNG, PDF or SVG, chosen by the --out suffix)."""


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("file", metavar="FILE.h5", type=click.Path(dir_okay=False))
@click.option(
    "--steps", "steps", metavar="S[,S...]", multiple=True, show_default="up to 5 spread over the run",
    help="Steps to draw (comma-separated or repeated).",
)  # fmt: skip
@click.option(
    "--sigma2", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_SIGMA2,
    help="Relative variance of the Gaussian smoothing (Ghorbani et al. 2019).",
)  # fmt: skip
@click.option("--linear", is_flag=True, help="Linear density axis instead of the paper's log axis.")
@click.option(
    "--layout", type=click.Choice(["overlay", "grid"]), default="overlay",
    help="All steps in one panel, or one panel per step.",
)  # fmt: skip
@_out_option
@debug_option
def density(file: str, steps: tuple[str, ...], sigma2: float, linear: bool, layout: str, out: str) -> None:
    """Smoothed eigenvalue densities of FILE.h5 at a few steps, with the outliers marked."""
    path = _figure_path(out)
    chosen = parse_int_list(steps, "--steps") or None
    run = _load(file)
    use_agg_unless_chosen()
    from hessspec.plots import plot_density

    _save(plot_density(run, steps=chosen, sigma2=sigma2, log=not linear, layout=layout), path)


@plot.command(context_settings=CONTEXT_SETTINGS)
@click.argument("files", metavar="FILE.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--k-eigs", type=click.IntRange(min=1), default=5, help="How many top eigenvalues to draw.")
@click.option(
    "--ranks", "ranks", metavar="K[,K...]", multiple=True,
    show_default="those of 1,5,10 the files hold, and their largest",
    help="Ranks k of the gradient overlap r_k to draw.",
)  # fmt: skip
@_out_option
@debug_option
def evolution(files: tuple[str, ...], k_eigs: int, ranks: tuple[str, ...], out: str) -> None:
    """Top eigenvalues, gradient overlap, trace and negative mass across training, one colour per file."""
    path = _figure_path(out)
    chosen = parse_int_list(ranks, "--ranks")
    runs = [_load(file) for file in files]
    use_agg_unless_chosen()
    from hessspec.plots import plot_evolution

    _save(plot_evolution(runs, k_eigs=k_eigs, overlap_ranks=chosen or None), path)


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
