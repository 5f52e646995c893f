"""Figures: the drawn data equal the stored numbers; styles, scales, errors and files are right.

The results are synthetic but made the way hessspec makes them: Lanczos (full reorthogonalisation) on a diagonal
matrix with a bulk near 0 and a few outliers, Gauss quadrature from the tridiagonals via
:func:`hessspec.linalg.spectrum.quadrature`.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from dataclasses import dataclass, replace

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.text import Text

from hessspec import plots
from hessspec.linalg import spectrum
from hessspec.results import CheckpointResult


@dataclass(frozen=True)
class FakeRun:
    """Stands in for ``hessspec.store.RunResults``: what the figures need."""

    label: str
    checkpoints: tuple[CheckpointResult, ...]


def lanczos_diagonal(diagonal: np.ndarray, steps: int, probes: int, rng: np.random.Generator):
    """Tridiagonals of ``diag(diagonal)`` from Rademacher probes, float64, full reorthogonalisation."""
    n = len(diagonal)
    alpha = np.zeros((probes, steps))
    beta = np.zeros((probes, steps - 1))
    for p in range(probes):
        Q = np.zeros((steps, n))
        q = rng.choice([-1.0, 1.0], size=n) / np.sqrt(n)
        for j in range(steps):
            Q[j] = q
            w = diagonal * q
            alpha[p, j] = q @ w
            for _ in range(2):  # Gram-Schmidt twice
                w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
            if j + 1 < steps:
                beta[p, j] = np.linalg.norm(w)
                q = w / beta[p, j]
    return alpha, beta


def synthetic_checkpoint(
    step: int,
    lambda_1: float,
    overlap_10: float,
    negative_fraction: float,
    bulk_scale: float,
    rng: np.random.Generator,
    n: int = 1500,
    lanczos_steps: int = 30,
    probes: int = 3,
    num_outliers: int = 10,
) -> CheckpointResult:
    """A checkpoint whose spectrum has a bulk of width ~``bulk_scale`` and ``num_outliers`` outliers up to
    ``lambda_1``, and whose gradient puts ``overlap_10`` of its squared norm on the top 10 eigenvectors."""
    num_negative = int(negative_fraction * (n - num_outliers))
    bulk = np.concatenate(
        [-rng.exponential(0.3 * bulk_scale, num_negative), rng.exponential(bulk_scale, n - num_outliers - num_negative)]
    )
    outliers = lambda_1 * np.geomspace(1.0, 0.15, num_outliers) * (1 + 0.02 * rng.standard_normal(num_outliers))
    outliers[0] = lambda_1
    eigenvalues = np.concatenate([bulk, outliers])
    alpha, beta = lanczos_diagonal(eigenvalues, lanczos_steps, probes, rng)
    quad = spectrum.quadrature(alpha, beta)
    trace, _ = spectrum.trace_estimate(quad.nodes, quad.weights, n)
    trace_stderr = 0.04 * abs(trace)  # Rademacher probes make Hutchinson exact on a diagonal: invent a spread
    top = np.sort(eigenvalues)[::-1][:10]
    shares = rng.dirichlet(np.geomspace(4.0, 0.3, 10))
    shares = np.sort(shares)[::-1]
    cos2 = overlap_10 * shares
    return CheckpointResult(
        step=step, loss=2.3 * np.exp(-step / 800), grad_norm=1.0, trace=trace, trace_stderr=trace_stderr,
        nodes=quad.nodes, weights=quad.weights, top_eigenvalues=top,
        top_residuals=1e-6 * np.abs(top), overlap_k=np.arange(1, 11, dtype=np.int64),
        overlap_ratio=np.cumsum(cos2), cos2=cos2, n_params=n, n_samples=1797, bn_mode="train",
        dtype="float64", device="cpu", seed=0, lanczos_steps=lanczos_steps, probes=probes, elapsed_s=1.0,
    )  # fmt: skip


STEPS = (0, 10, 30, 100, 300, 1000, 3000)


def synthetic_runs(steps=STEPS, seed: int = 0, **size) -> tuple[FakeRun, FakeRun]:
    """A no-BN run (large outliers, overlap growing) and a BN-like run (small λ1, low overlap)."""
    rng = np.random.default_rng(seed)
    progress = [np.log1p(s) / np.log1p(max(*steps, 1)) for s in steps]
    nobn = tuple(
        synthetic_checkpoint(s, 25 + 40 * np.sin(np.pi * t) ** 2, 0.6 + 0.37 * t, 0.3 - 0.2 * t, 0.05, rng, **size)
        for s, t in zip(steps, progress, strict=True)
    )
    bn = tuple(
        synthetic_checkpoint(s, 3.0 - 1.5 * t, 0.05 + 0.15 * t, 0.25 - 0.15 * t, 0.03, rng, **size)
        for s, t in zip(steps, progress, strict=True)
    )
    return FakeRun("ResNet-32, no BN", nobn), FakeRun("ResNet-32, BN", bn)


@pytest.fixture(scope="module")
def runs() -> tuple[FakeRun, FakeRun]:
    return synthetic_runs()


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


# --- plot_density ---------------------------------------------------------------------------------------------


def test_default_steps_spread_log_spaced_and_keep_first_and_last():
    assert plots.default_steps(STEPS) == [0, 10, 100, 300, 3000]
    assert plots.default_steps([3000, 0, 10]) == [0, 10, 3000]
    assert plots.default_steps(range(100, 200, 10), max_count=4) == [100, 130, 160, 190]  # no decades: even
    chosen = plots.default_steps(range(1, 5001))
    assert chosen[0] == 1 and chosen[-1] == 5000 and len(chosen) == 5
    assert np.allclose(np.diff(np.log(chosen)), np.log(5000) / 4, atol=0.06)


def display_expected(c: CheckpointResult, grid: np.ndarray, sigma2: float = 1e-5, resolution: float = 0.25):
    """The drawn density, from its definition: the paper's kernel, widened to ``resolution`` mean Ritz spacings."""
    span = c.nodes.max() - c.nodes.min()
    s2 = max(sigma2 * max(1.0, span), (resolution * span / c.nodes.shape[1]) ** 2)
    return spectrum.density(c.nodes, c.weights, sigma2=s2 / max(1.0, span), grid=grid)


def test_density_overlay_draws_the_stored_densities(runs):
    run = runs[0]
    fig = plots.plot_density(run, steps=[10, 3000], layout="overlay")
    assert isinstance(fig, Figure)
    ax, strip = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    for line, step in zip(lines, [10, 3000], strict=True):
        c = next(c for c in run.checkpoints if c.step == step)
        expected = display_expected(c, line.get_xdata())
        np.testing.assert_allclose(line.get_ydata(), expected.values, rtol=1e-12, atol=0)
        # The kernel resolves what m Ritz values can: at least a quarter of their mean spacing.
        assert np.sqrt(expected.sigma2) >= 0.25 * (c.nodes.max() - c.nodes.min()) / c.lanczos_steps * (1 - 1e-12)
        # The grid is fine enough to resolve one isolated outlier: >= 4 points per kernel standard deviation.
        assert np.diff(line.get_xdata()).max() <= np.sqrt(expected.sigma2) / 4 + 1e-15
    # Earlier steps are drawn on top of later ones.
    assert lines[0].get_zorder() > lines[1].get_zorder()
    texts = legend_texts(ax.get_legend())
    assert texts[:2] == ["step 10", "step 3000"]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "eigenvalue λ" and ax.get_ylabel() == "density"
    assert run.label in strip.get_title("left")
    peak = max(line.get_ydata().max() for line in lines)
    bottom, top = ax.get_ylim()
    assert 1e-12 * peak <= bottom <= 1e-3 * peak and top >= peak
    # The floor shows a single isolated eigenvalue of n: weight 1/n, height 1/(n sqrt(2 pi s^2)).
    c = run.checkpoints[-1]
    assert bottom < 1.0 / (c.n_params * np.sqrt(2 * np.pi * display_expected(c, c.nodes.ravel()).sigma2))
    lo, hi = ax.get_xlim()
    assert lo <= min(c.nodes.min() for c in run.checkpoints if c.step in (10, 3000))
    assert hi >= max(c.top_eigenvalues[0] for c in run.checkpoints if c.step in (10, 3000))


def test_density_marks_the_outliers_above_the_bulk_edge(runs):
    run = runs[0]
    steps = [10, 3000]
    for layout in ("overlay", "grid"):
        fig = plots.plot_density(run, steps=steps, layout=layout)
        # Overlay: one row of ticks per step in the strip above; grid: ticks along the top of each panel.
        rugs = fig.axes[1].collections if layout == "overlay" else [ax.collections[0] for ax in fig.axes]
        assert len(rugs) == len(steps) and all(isinstance(rug, LineCollection) for rug in rugs)
        for row, (rug, step) in enumerate(zip(rugs, steps, strict=True)):
            c = next(c for c in run.checkpoints if c.step == step)
            edge = spectrum.bulk_edge(c.nodes, c.weights, c.n_params)
            expected = sorted(c.top_eigenvalues[c.top_eigenvalues > edge])
            assert len(expected) == c.num_outliers() > 0
            segments = rug.get_segments()
            np.testing.assert_allclose(sorted(segment[0, 0] for segment in segments), expected)
            if layout == "overlay":
                assert all(abs(segment[:, 1].mean() - row) < 1e-12 for segment in segments)
    strip = plots.plot_density(run, steps=steps, layout="overlay").axes[1]
    assert [t.get_text() for t in strip.get_yticklabels()] == ["10", "3000"]
    assert strip.get_xlim() == fig.axes[0].get_xlim()


def test_density_default_steps_linear_scale_sigma2_and_the_raw_kernel(runs):
    run = runs[1]
    fig = plots.plot_density(run, log=False, sigma2=1e-4, layout="overlay")
    ax = fig.axes[0]
    assert legend_texts(ax.get_legend()) == [f"step {s}" for s in plots.default_steps(STEPS)]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0.0
    line = ax.get_lines()[-1]
    c = run.checkpoints[-1]
    expected = display_expected(c, line.get_xdata(), sigma2=1e-4)
    np.testing.assert_allclose(line.get_ydata(), expected.values, rtol=1e-12)
    # resolution=0 draws the paper's kernel on the stored quadrature, unchanged.
    line = plots.plot_density(run, steps=[c.step], resolution=0).axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), c.density(grid=line.get_xdata()).values, rtol=1e-12)
    with pytest.raises(ValueError, match="resolution must be >= 0"):
        plots.plot_density(run, resolution=-1)


def test_density_grid_is_the_default_with_one_legible_panel_per_step(runs):
    run = runs[0]
    steps = [0, 30, 300, 1000, 3000]
    fig = plots.plot_density(run, steps=steps)
    assert len(fig.axes) == len(steps)  # the sixth cell of the 2x3 grid is removed
    for ax, step in zip(fig.axes, steps, strict=True):
        (line,) = ax.get_lines()
        c = next(c for c in run.checkpoints if c.step == step)
        np.testing.assert_allclose(line.get_ydata(), display_expected(c, line.get_xdata()).values, rtol=1e-12)
        assert ax.get_title("left").startswith(f"step {step}")
        assert ax.get_yscale() == "log"
        assert ax.get_ylim() == fig.axes[0].get_ylim()
        # Each panel spans its own spectrum (no later, wider step squashes it into a spike at 0).
        lo, hi = ax.get_xlim()
        assert lo <= c.nodes.min() and hi >= c.nodes.max()
        assert hi - lo <= 1.2 * (c.nodes.max() - c.nodes.min())
    widths = {round(ax.get_xlim()[1] - ax.get_xlim()[0], 6) for ax in fig.axes}
    assert len(widths) > 1  # the steps' spectra differ in width, and so do their axes
    shared = plots.plot_density(run, steps=steps, sharex=True)
    assert len({ax.get_xlim() for ax in shared.axes}) == 1
    assert all(ax.get_ylabel() == "density" for ax in fig.axes[::3])
    # Lowest panel of each column carries the x label: 1000 and 3000 in the bottom row, 300 above the empty cell.
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "eigenvalue λ", "eigenvalue λ", "eigenvalue λ"]
    assert run.label in fig.get_suptitle()


def test_density_of_several_runs_side_by_side(runs):
    nobn, bn = runs
    fig = plots.plot_density([nobn, bn], steps=[0, 100, 3000])
    assert len(fig.axes) == 6  # one row per run, one column per step
    for r, run in enumerate(runs):
        assert fig.axes[3 * r].get_ylabel() == f"{run.label}\ndensity"
        for i, step in enumerate([0, 100, 3000]):
            ax = fig.axes[3 * r + i]
            (line,) = ax.get_lines()
            c = next(c for c in run.checkpoints if c.step == step)
            np.testing.assert_allclose(line.get_ydata(), display_expected(c, line.get_xdata()).values, rtol=1e-12)
            assert ax.get_title("left").startswith(f"step {step}")
    # The BN run's spectra are narrower: their panels are not squashed by the no-BN run's range.
    assert fig.axes[5].get_xlim()[1] < 0.2 * fig.axes[2].get_xlim()[1]
    # Default steps: those both runs hold, up to 4; overlay: one panel per run.
    assert len(plots.plot_density([nobn, bn]).axes) == 8
    overlay = plots.plot_density([nobn, bn], layout="overlay", steps=[10, 3000])
    panels = [ax for ax in overlay.axes if ax.get_ylabel() == "density"]
    assert len(panels) == 2 and all(len(ax.get_lines()) == 2 for ax in panels)


def test_density_errors_name_what_is_available(runs):
    with pytest.raises(ValueError, match="no checkpoints"):
        plots.plot_density(FakeRun("empty", ()))
    with pytest.raises(ValueError, match="no results for ggn/all"):
        plots.plot_density(runs[0], curvature="ggn")
    with pytest.raises(ValueError, match=r"no checkpoint at step 7; available steps: \[0, 10, 30, 100, 300"):
        plots.plot_density(runs[0], steps=[10, 7])
    with pytest.raises(ValueError, match="layout"):
        plots.plot_density(runs[0], layout="stacked")
    with pytest.raises(ValueError, match="steps is empty"):
        plots.plot_density(runs[0], steps=[])


# --- plot_evolution -------------------------------------------------------------------------------------------


def lines_by_label(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_evolution_draws_eigenvalues_overlap_trace_and_negative_mass(runs):
    fig = plots.plot_evolution(runs, k_eigs=3, overlap_ranks=(1, 5, 10))
    ax_eig, ax_overlap, ax_trace, ax_negative = fig.axes
    steps = np.array(STEPS, dtype=float)
    for run in runs:
        cks = run.checkpoints
        eig = lines_by_label(ax_eig)
        for i in range(3):
            line = eig[f"{run.label}: λ{i + 1}"]
            np.testing.assert_array_equal(line.get_xdata(), steps)
            np.testing.assert_array_equal(line.get_ydata(), [c.top_eigenvalues[i] for c in cks])
        lead, other = eig[f"{run.label}: λ1"], eig[f"{run.label}: λ2"]
        assert lead.get_color() == other.get_color()
        assert lead.get_linewidth() > other.get_linewidth() and other.get_alpha() < 1
        overlap = lines_by_label(ax_overlap)
        for k in (1, 5, 10):
            np.testing.assert_array_equal(overlap[f"{run.label}: r{k}"].get_ydata(), [c.overlap_at(k) for c in cks])
        trace = lines_by_label(ax_trace)[f"{run.label}: trace"]
        np.testing.assert_array_equal(trace.get_ydata(), [c.trace for c in cks])
        negative = lines_by_label(ax_negative)[f"{run.label}: mass λ<-0.01‖H‖"]
        np.testing.assert_array_equal(negative.get_ydata(), [c.clear_negative_mass(0.01) for c in cks])
    assert ax_negative.get_ylabel() == r"mass of $\lambda < -0.01\,\|H\|$"
    # Runs differ by colour.
    eig = lines_by_label(ax_eig)
    assert eig[f"{runs[0].label}: λ1"].get_color() != eig[f"{runs[1].label}: λ1"].get_color()
    # The ± stderr band of the first run.
    band = [c for c in ax_trace.collections if isinstance(c, PolyCollection)][0]
    ys = band.get_paths()[0].vertices[:, 1]
    cks = runs[0].checkpoints
    lower = np.array([c.trace - c.trace_stderr for c in cks])
    upper = np.array([c.trace + c.trace_stderr for c in cks])
    assert np.isclose(ys.min(), lower.min()) and np.isclose(ys.max(), upper.max())
    for value in np.concatenate([lower, upper]):
        assert np.isclose(ys, value).any()
    # Legends: the runs by label for the figure, λ and ranks in the panels.
    assert legend_texts(fig.legends[0]) == [run.label for run in runs]
    assert legend_texts(ax_eig.get_legend()) == [r"$\lambda_1$", r"$\lambda_2 \ldots \lambda_{3}$"]
    assert legend_texts(ax_overlap.get_legend()) == ["k = 1", "k = 5", "k = 10"]
    overlap = lines_by_label(ax_overlap)
    assert overlap[f"{runs[0].label}: r10"].get_linestyle() == "-"  # the largest rank is solid
    assert len({overlap[f"{runs[0].label}: r{k}"].get_linestyle() for k in (1, 5, 10)}) == 3
    assert ax_eig.get_yscale() == "log"  # λ1 from ~1.5 to ~65
    assert [t.get_text() for t in ax_eig.get_yticklabels() if ax_eig.get_ylim()[0] <= t.get_position()[1]][:3] == [
        "1",
        "2",
        "5",
    ]
    assert ax_overlap.get_ylim() == (0.0, 1.03)
    assert ax_trace.get_xlabel() == "training step" and ax_negative.get_xlabel() == "training step"


def test_evolution_step_axis_scale_follows_the_steps():
    def axes_for(steps):
        run = FakeRun("r", synthetic_runs(steps, n=300, lanczos_steps=8, probes=2)[0].checkpoints)
        return plots.plot_evolution([run], overlap_ranks=(1,)).axes

    axes = axes_for((0, 5, 20, 3000))
    assert all(ax.get_xscale() == "symlog" for ax in axes)
    assert axes[0].xaxis.get_transform().linthresh == 5  # the smallest positive step
    assert axes_for((0, 10, 100, 3000))[0].xaxis.get_transform().linthresh == 10
    assert axes_for((5, 50, 500))[0].get_xscale() == "log"
    assert axes_for((0, 100, 200, 300))[0].get_xscale() == "linear"


def tick_labels(ax, which="major") -> list[str]:
    ax.figure.draw_without_rendering()
    ticks = ax.xaxis.get_majorticklabels() if which == "major" else ax.xaxis.get_minorticklabels()
    return [t.get_text() for t in ticks]


def test_evolution_step_axis_is_labelled_at_analysed_steps(runs):
    # The demo's steps: every one fits, written in full.
    fig = plots.plot_evolution(runs)
    ax = fig.axes[2]
    assert tick_labels(ax) == ["0", "10", "30", "100", "300", "1,000", "3,000"]
    np.testing.assert_array_equal(ax.get_xticks(), STEPS)
    # Dense checkpoints: the first and the last labelled, others as long as they stay apart; every analysed step
    # has a tick.
    steps = (0, *range(1, 20), *range(20, 200, 10), *range(200, 5001, 200))
    run = FakeRun("dense", synthetic_runs(steps, n=300, lanczos_steps=8, probes=2)[0].checkpoints)
    ax = plots.plot_evolution([run], overlap_ranks=(1,)).axes[2]  # a bottom panel (the top ones share its axis)
    major = list(ax.get_xticks())
    assert major[0] == 0 and major[-1] == 5000 and 5 <= len(major) <= 14
    assert set(major) <= set(steps)
    assert set(ax.xaxis.get_minorticklocs()) | set(major) == set(steps)  # every analysed step has a tick
    labels = tick_labels(ax)
    boxes = [t.get_window_extent() for t in ax.xaxis.get_majorticklabels()]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))  # no two labels touch
    assert labels[0] == "0" and labels[-1] == "5,000" and all(label.replace(",", "").isdigit() for label in labels)
    # A narrow figure labels fewer steps, still without overlap.
    fig = plots.plot_evolution([run], overlap_ranks=(1,))
    fig.set_size_inches(4.0, 4.0)
    ax = fig.axes[2]
    narrow = tick_labels(ax)
    assert len(narrow) < len(labels) and narrow[0] == "0" and narrow[-1] == "5,000"
    boxes = [t.get_window_extent() for t in ax.xaxis.get_majorticklabels()]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))


def test_evolution_trace_band_below_zero_stays_on_a_log_axis():
    checkpoints = list(synthetic_runs(n=300, lanczos_steps=8, probes=2)[1].checkpoints)
    # Traces over two decades; at one step the standard error exceeds the trace, so trace - s.e. < 0.
    traces = np.geomspace(2.0, 400.0, len(checkpoints))
    checkpoints = [
        replace(c, trace=float(t), trace_stderr=float(3 * t if i == 2 else 0.1 * t))
        for i, (c, t) in enumerate(zip(checkpoints, traces, strict=True))
    ]
    ax = plots.plot_evolution([FakeRun("noisy", tuple(checkpoints))]).axes[2]
    assert ax.get_yscale() == "log"
    bottom, top = ax.get_ylim()
    assert 0 < bottom <= traces.min() / 2 and top >= (traces * 1.1).max()
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.all(np.isfinite(ys)) and ys.min() >= bottom * (1 - 1e-12)
    # The band is cut at the bottom of the axis where it goes below zero, exact elsewhere.
    lower = np.array([c.trace - c.trace_stderr for c in checkpoints])
    assert np.isclose(ys, bottom).any()
    for value in lower[lower > bottom]:
        assert np.isclose(ys, value).any()
    for value in [c.trace + c.trace_stderr for c in checkpoints]:
        assert np.isclose(ys, value).any()


def test_evolution_missing_eigenvalues_and_ranks(runs):
    # Only 10 eigenvalues were kept; one checkpoint lacks the overlap at rank 10: a gap, not an error.
    checkpoints = list(runs[0].checkpoints)
    c = checkpoints[3]
    checkpoints[3] = replace(c, overlap_k=c.overlap_k[:5], overlap_ratio=c.overlap_ratio[:5])
    run = FakeRun("partial", tuple(checkpoints))
    fig = plots.plot_evolution([run], k_eigs=12, overlap_ranks=(10, 3))
    ax_eig, ax_overlap = fig.axes[:2]
    assert sorted(lines_by_label(ax_eig)) == sorted(f"partial: λ{i}" for i in range(1, 11))
    r10 = lines_by_label(ax_overlap)["partial: r10"].get_ydata()
    assert np.isnan(r10[3]) and np.isfinite(np.delete(r10, 3)).all()
    assert np.isfinite(lines_by_label(ax_overlap)["partial: r3"].get_ydata()).all()
    with pytest.raises(ValueError, match=r"rank k=50; available ranks: \[1, 2, 3"):
        plots.plot_evolution(runs, overlap_ranks=(1, 50))


def test_evolution_errors(runs):
    with pytest.raises(ValueError, match="no runs"):
        plots.plot_evolution([])
    with pytest.raises(ValueError, match="'empty' holds no checkpoints"):
        plots.plot_evolution([runs[0], FakeRun("empty", ())])
    with pytest.raises(ValueError, match="k_eigs"):
        plots.plot_evolution(runs, k_eigs=0)


# --- curvatures and blocks -----------------------------------------------------------------------------------


BLOCKS = ("features", "classifier")


@pytest.fixture(scope="module")
def block_run(runs, tmp_path_factory):
    """A stored run with per-block Hessian results and the GGN of the whole model, read back with the store."""
    from hessspec.store import ResultWriter, load_results

    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("blocks") / "run.h5"
    with ResultWriter(path, label="MLP, no BN", config={}) as writer:
        for whole in runs[0].checkpoints:
            items = [whole, replace(whole, curvature="ggn", trace=0.9 * whole.trace)]
            for b, (lam, scale) in enumerate([(30.0, 0.05), (3.0, 0.01)]):
                c = synthetic_checkpoint(whole.step, lam, 0.5, 0.2, scale, rng, n=400, lanczos_steps=20, probes=2)
                items.append(replace(c, block=BLOCKS[b]))
            writer.write(items)
    return load_results(path)


def test_blocks_grid_draws_each_blocks_density_on_one_axis(block_run):
    fig = plots.plot_blocks(block_run, steps=[0, 3000])
    assert len(fig.axes) == 4  # rows: blocks; columns: steps
    for r, block in enumerate(BLOCKS):
        assert fig.axes[2 * r].get_ylabel().startswith(block)
        for i, step in enumerate([0, 3000]):
            ax = fig.axes[2 * r + i]
            (line,) = ax.get_lines()
            c = block_run.get(step, block=block)
            np.testing.assert_allclose(line.get_ydata(), display_expected(c, line.get_xdata()).values, rtol=1e-12)
    assert len({ax.get_xlim() for ax in fig.axes}) == 1 and len({ax.get_ylim() for ax in fig.axes}) == 1
    lo, hi = fig.axes[0].get_xlim()
    assert hi >= max(block_run.get(s, block=b).nodes.max() for s in (0, 3000) for b in BLOCKS)
    assert fig.axes[0].get_title("left").startswith("step 0") and fig.axes[1].get_title("left").startswith("step 3000")
    assert block_run.label in fig.get_suptitle()
    assert len(plots.plot_blocks(block_run).axes) == 2 * 3  # default: 3 steps
    assert len(plots.plot_blocks(block_run, blocks=["all", "classifier"], steps=[10]).axes) == 2
    with pytest.raises(ValueError, match="no per-block results for ggn"):
        plots.plot_blocks(block_run, curvature="ggn")
    with pytest.raises(ValueError, match="no results for hessian/head"):
        plots.plot_blocks(block_run, blocks=["head"])


def test_evolution_of_curvatures_and_blocks(block_run):
    fig = plots.plot_evolution([block_run], curvatures=["hessian", "ggn"])
    trace = lines_by_label(fig.axes[2])
    for curvature in ("hessian", "ggn"):
        expected = [c.trace for c in block_run.select(curvature, "all")]
        np.testing.assert_array_equal(trace[f"{curvature}: trace"].get_ydata(), expected)
    assert legend_texts(fig.legends[0]) == ["hessian", "ggn"]
    assert fig.axes[2].get_ylabel() == "trace"
    fig = plots.plot_evolution([block_run, block_run], blocks=BLOCKS, k_eigs=1)
    eig = lines_by_label(fig.axes[0])
    assert sorted(eig) == sorted(f"MLP, no BN, {b}: λ1" for b in BLOCKS)
    np.testing.assert_array_equal(
        eig["MLP, no BN, classifier: λ1"].get_ydata(), [c.lambda_max for c in block_run.select("hessian", "classifier")]
    )
    with pytest.raises(ValueError, match="no results for ggn/features"):
        plots.plot_evolution([block_run], curvatures=["ggn"], blocks=["features"])


def test_plot_commands_for_blocks_curvatures_and_several_files(block_run, tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli
    from hessspec.cli import plot as plot_cli

    assert plot_cli.DEFAULT_RESOLUTION == plots.DEFAULT_RESOLUTION
    runner = CliRunner()
    path = block_run.path
    commands = [
        ["density", path, path, "--steps", "0,3000"],
        ["density", path, "--curvature", "ggn", "--layout", "overlay"],
        ["blocks", path, "--steps", "10", "--block", "classifier"],
        ["evolution", path, "--curvature", "hessian", "--curvature", "ggn"],
        ["evolution", path, "--block", "features", "--block", "classifier"],
    ]
    for i, args in enumerate(commands):
        out = tmp_path / f"fig{i}.png"
        result = runner.invoke(cli, ["plot", *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(cli, ["plot", "blocks", path, "--curvature", "ggn", "--block", "x", "--out", "f.png"])
    assert result.exit_code == 1
    assert "holds no results for curvature 'ggn', block 'x' (it holds hessian/all, hessian/features" in result.output


# --- plot_overlap ---------------------------------------------------------------------------------------------


def test_overlap_bars_are_cos2_and_line_is_r_k(runs):
    run = runs[0]
    fig = plots.plot_overlap(run)
    ax, twin = fig.axes
    c = run.checkpoints[-1]  # default: the last step
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_array_equal(heights, c.cos2)
    np.testing.assert_array_equal([patch.get_x() + patch.get_width() / 2 for patch in ax.patches], np.arange(1, 11))
    (line,) = twin.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), c.overlap_k)
    np.testing.assert_array_equal(line.get_ydata(), c.overlap_ratio)
    assert twin.get_ylim() == (0.0, 1.03)
    assert f"step {c.step}" in ax.get_title("left") and f"{c.lambda_max:.3g}" in ax.get_title("left")
    assert ax.get_xlabel() and ax.get_ylabel() and twin.get_ylabel()

    c = run.checkpoints[2]
    fig = plots.plot_overlap(run, step=c.step)
    np.testing.assert_array_equal([p.get_height() for p in fig.axes[0].patches], c.cos2)
    assert f"step {c.step}" in fig.axes[0].get_title("left")
    with pytest.raises(ValueError, match="available steps"):
        plots.plot_overlap(run, step=12345)
    with pytest.raises(ValueError, match="no checkpoints"):
        plots.plot_overlap(FakeRun("empty", ()))


def test_unconverged_pairs_are_left_out_of_evolution_and_hatched_in_overlap(runs):
    flags = np.array([True, True, False, True, True, True, True, True, True, True])
    checkpoints = list(runs[0].checkpoints)
    checkpoints[3] = replace(checkpoints[3], top_converged=flags)
    run = FakeRun("partly converged", tuple(checkpoints))
    ax_eig, ax_overlap = plots.plot_evolution([run], k_eigs=3, overlap_ranks=(1, 5)).axes[:2]
    lam3 = lines_by_label(ax_eig)["partly converged: λ3"].get_ydata()
    assert np.isnan(lam3[3]) and np.isfinite(np.delete(lam3, 3)).all()
    assert np.isfinite(lines_by_label(ax_eig)["partly converged: λ2"].get_ydata()).all()
    r5 = lines_by_label(ax_overlap)["partly converged: r5"].get_ydata()
    assert np.isnan(r5[3]) and np.isfinite(lines_by_label(ax_overlap)["partly converged: r1"].get_ydata()).all()

    ax, twin = plots.plot_overlap(run, step=checkpoints[3].step).axes
    solid, hatched = ax.containers
    np.testing.assert_array_equal([p.get_height() for p in solid], checkpoints[3].cos2[flags])
    np.testing.assert_array_equal([p.get_height() for p in hatched], checkpoints[3].cos2[~flags])
    assert all(p.get_hatch() for p in hatched)
    (line,) = twin.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2])  # r_k only while the top k are converged
    assert "not converged (left)" in legend_texts(ax.get_legend())


def test_trace_panel_says_n_a_for_one_probe(runs):
    one = FakeRun("one probe", tuple(replace(c, trace_stderr=float("nan")) for c in runs[0].checkpoints))
    ax_trace = plots.plot_evolution([one]).axes[2]
    assert "n/a with one probe" in ax_trace.get_title("left")
    assert "n/a" not in plots.plot_evolution(runs).axes[2].get_title("left")


# --- style and files ------------------------------------------------------------------------------------------


def all_figures(runs) -> list[Figure]:
    return [
        plots.plot_density(runs[0]),
        plots.plot_density(runs[1], layout="grid"),
        plots.plot_evolution(runs),
        plots.plot_overlap(runs[1]),
        plots.plot_density(list(runs), layout="overlay"),
    ]


def test_style_is_readable_and_local(runs):
    before = dict(mpl.rcParams)
    figures = all_figures(runs)
    assert dict(mpl.rcParams) == before
    for fig in figures:
        fig.draw_without_rendering()  # outside the style context, as a caller would save it
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
        assert texts
        assert min(t.get_fontsize() for t in texts) >= 9, [(t.get_text(), t.get_fontsize()) for t in texts]


def png_dpi(data: bytes) -> float:
    """Dots per inch from a PNG's pHYs chunk (pixels per metre)."""
    position = 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        assert zlib.crc32(kind + body) == int.from_bytes(data[position + 8 + length : position + 12 + length], "big")
        if kind == b"pHYs":
            return int.from_bytes(body[:4], "big") * 0.0254
        position += 12 + length
    raise AssertionError("no pHYs chunk")


def test_save_figure_writes_png_pdf_svg_and_rejects_other_suffixes(runs, tmp_path):
    fig = plots.plot_overlap(runs[0])
    magic = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml"}
    for suffix, start in magic.items():
        path = plots.save_figure(fig, tmp_path / f"overlap.{suffix}")
        data = path.read_bytes()
        assert data.startswith(start) and len(data) > 1000
    assert b"<svg" in (tmp_path / "overlap.svg").read_bytes()[:1000]
    assert round(png_dpi((tmp_path / "overlap.png").read_bytes())) == 200
    # Any case of suffix; same figure, same bytes (no creation date).
    plots.save_figure(fig, tmp_path / "again.SVG")
    assert (tmp_path / "again.SVG").read_bytes() == (tmp_path / "overlap.svg").read_bytes()
    assert b"CreationDate" not in (tmp_path / "overlap.pdf").read_bytes()
    for bad in ("overlap.jpg", "overlap", "overlap.png.txt"):
        with pytest.raises(ValueError, match=r"\.png, \.pdf, \.svg"):
            plots.save_figure(fig, tmp_path / bad)
        assert not (tmp_path / bad).exists()


def test_plots_import_neither_torch_nor_pyplot():
    code = (
        "import sys, hessspec.plots; "
        "bad = [m for m in ('torch', 'matplotlib.pyplot') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
