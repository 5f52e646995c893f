"""The house style shared by the figures, how a figure finds the results it draws, and :func:`save_figure`."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hessspec.results import WHOLE_HESSIAN, CheckpointResult, HessspecWarning

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies and
# in greyscale by lightness. Their yellow (#F0E442) is left out: too pale on white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000")

FONT_SIZE = 10.0
SMALL_FONT_SIZE = 9.0  # ticks and legends; nothing is drawn smaller
_STYLE = {
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE,
    "axes.labelsize": FONT_SIZE,
    "figure.titlesize": FONT_SIZE + 1,
    "figure.labelsize": FONT_SIZE,
    "legend.fontsize": SMALL_FONT_SIZE,
    "legend.title_fontsize": SMALL_FONT_SIZE,
    "legend.frameon": True,  # a borderless white box keeps grid lines out of in-panel legends
    "legend.framealpha": 0.9,
    "legend.edgecolor": "none",
    "legend.fancybox": False,
    "xtick.labelsize": SMALL_FONT_SIZE,
    "ytick.labelsize": SMALL_FONT_SIZE,
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
OVERLAP_LABEL = r"$r_k = \|P_k\, g\|^2 / \|g\|^2$"
_SAVE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
_PNG_DPI = 200


class RunLike(Protocol):
    """What the figure functions need from a run (``hessspec.store.RunResults`` is one).

    ``checkpoints`` are the whole-model Hessian results; figures of another curvature or block also need
    ``select(curvature, block)`` (as ``RunResults.select``).
    """

    @property
    def label(self) -> str: ...

    @property
    def checkpoints(self) -> Sequence[CheckpointResult]: ...


_F = TypeVar("_F", bound=Callable[..., Figure])


def styled(fn: _F) -> _F:
    """Build the figure inside the house style, without touching the global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def finish_axes(ax: Axes, grid: bool = True) -> None:
    # Tick labels are created lazily at draw time, possibly outside the rc_context: store their style on the axis.
    ax.tick_params(which="both", labelsize=SMALL_FONT_SIZE, direction="out")
    ax.tick_params(which="major", length=3.5, width=0.8)
    ax.tick_params(which="minor", length=2.0, width=0.6)
    if grid:
        ax.grid(True, which="major", color="0.88", linewidth=0.6)
        ax.set_axisbelow(True)


def describe_kind(curvature: str, block: str) -> str:
    """``"ggn, block layer3"``; ``""`` for the whole-model Hessian."""
    if (curvature, block) == WHOLE_HESSIAN:
        return ""
    return curvature if block == WHOLE_HESSIAN[1] else f"{curvature}, block {block}"


def results_of(run: RunLike, curvature: str = WHOLE_HESSIAN[0], block: str = WHOLE_HESSIAN[1]) -> list:
    """The run's results of one (curvature, block), sorted by step; an error names what the run holds."""
    if (curvature, block) == WHOLE_HESSIAN:
        found = list(run.checkpoints)
    elif hasattr(run, "select"):
        found = list(run.select(curvature, block))
    else:
        found = [c for c in run.checkpoints if (c.curvature, c.block) == (curvature, block)]
    found.sort(key=lambda c: c.step)
    if not found:
        kinds = getattr(run, "kinds", None)
        what = "checkpoints" if (curvature, block) == WHOLE_HESSIAN else f"results for {curvature}/{block}"
        extra = f" (it holds {', '.join(f'{c}/{b}' for c, b in kinds)})" if kinds else ""
        msg = f"run {run.label!r} holds no {what}{extra}; nothing to plot"
        raise ValueError(msg)
    return found


def format_steps(steps: Sequence[int]) -> str:
    steps = list(steps)
    if len(steps) > 20:
        return f"[{', '.join(map(str, steps[:10]))}, ..., {', '.join(map(str, steps[-5:]))}] ({len(steps)} steps)"
    return str(steps)


def checkpoint_at(run: RunLike, checkpoints: Sequence[CheckpointResult], step: int) -> CheckpointResult:
    hits = [c for c in checkpoints if c.step == step]
    if len(hits) > 1:
        sources = ", ".join(os.path.basename(c.source) or c.sha256[:8] for c in hits)
        shown = os.path.basename(hits[0].source) or hits[0].sha256[:8]
        warnings.warn(
            f"run {run.label!r} holds {len(hits)} checkpoints at step {step} ({sources}); drawing {shown}",
            HessspecWarning,
            stacklevel=2,
        )
    if hits:
        return hits[0]
    msg = (
        f"run {run.label!r} holds no checkpoint at step {step}; "
        f"available steps: {format_steps([c.step for c in checkpoints])}"
    )
    raise ValueError(msg)


def step_colors(steps: Sequence[int]) -> list:
    """Colours in order of training step: viridis (perceptually uniform, CVD-safe), its pale yellow end cut."""
    if len(steps) == 1:
        return [PALETTE[0]]
    ramp = mpl.colormaps["viridis"](np.linspace(0.0, 0.8, len(steps)))
    rank = np.argsort(np.argsort(steps, kind="stable"), kind="stable")
    return [ramp[r] for r in rank]


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
