"""A one-line progress display on stderr: a bar over checkpoints and one over Lanczos steps, with rate and ETA.

Two bars on one redrawn line (rather than two ``click.progressbar`` lines) keep the terminal tidy when summary
lines are printed between checkpoints: the line is cleared, the summary written, the line redrawn. Nothing is
drawn unless the stream is a terminal.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from typing import TextIO

import click

_REDRAW_S = 0.1  # at most ten redraws a second


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour); "?" for an unknown duration."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(fraction: float, width: int = 20) -> str:
    """``[#####---------------]`` filled to ``fraction`` (clipped to 0..1)."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def terminal_width(stream: TextIO, fallback: int = 100) -> int:
    """Columns of the terminal ``stream`` is drawn on: ``$COLUMNS`` if set, else the terminal's own size.

    ``shutil.get_terminal_size`` asks stdout, which is often redirected to a log while the progress line goes to
    stderr on a terminal; the stream's own file descriptor is asked here first.
    """
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size((fallback, 24)).columns


class ProgressLine:
    """Progress of an analysis over checkpoints and, within each, over Lanczos steps.

    Args:
        stream: where to draw (stderr).
        enabled: draw at all; the caller passes False for ``--quiet`` or when the stream is not a terminal.
        clock: the time source (for tests).
    """

    def __init__(self, stream: TextIO, enabled: bool, clock=time.monotonic) -> None:
        self.stream = stream
        self.enabled = enabled
        self.clock = clock
        self.total = 0
        self.index = 0
        self.step: int | None = None
        self.done_steps = 0
        self.total_steps = 0
        self._started = 0.0
        self._finished_seconds: list[float] = []
        self._shown = False
        self._last_draw = -float("inf")

    # -- events ---------------------------------------------------------------------------------------------
    def begin(self, total: int) -> None:
        """``total`` checkpoints are to be analysed."""
        self.total = total

    def start_checkpoint(self, index: int, step: int) -> None:
        """Checkpoint ``index`` (0-based) at training ``step`` begins."""
        self.index, self.step = index, step
        self.done_steps, self.total_steps = 0, 0
        self._started = self.clock()
        self._draw(force=True)

    def lanczos(self, done: int, total: int) -> None:
        """``done`` of ``total`` Lanczos steps of the current checkpoint are complete."""
        self.done_steps, self.total_steps = done, total
        self._draw(force=done >= total)

    def finish_checkpoint(self) -> None:
        """The current checkpoint is complete."""
        self._finished_seconds.append(self.clock() - self._started)

    # -- estimates --------------------------------------------------------------------------------------------
    def rate(self) -> float:
        """Lanczos steps per second on the current checkpoint (0 before the first step)."""
        elapsed = self.clock() - self._started
        return self.done_steps / elapsed if self.done_steps and elapsed > 0 else 0.0

    def eta(self) -> tuple[float, float]:
        """Seconds left on the current checkpoint and on the whole run (NaN when unknown)."""
        elapsed = self.clock() - self._started
        if self.done_steps and self.total_steps:
            current_total = elapsed * self.total_steps / self.done_steps
        elif self._finished_seconds:
            current_total = sum(self._finished_seconds) / len(self._finished_seconds)
        else:
            return float("nan"), float("nan")
        current_left = max(0.0, current_total - elapsed)
        per_checkpoint = (
            sum(self._finished_seconds) / len(self._finished_seconds) if self._finished_seconds else current_total
        )
        remaining = max(0, self.total - self.index - 1)
        return current_left, current_left + remaining * per_checkpoint

    def text(self, width: int | None = None) -> str:
        """The progress line as it would be drawn, in at most ``width`` characters (None: no limit).

        When the full line does not fit, the least useful parts go first: the whole run's ETA, the rate, then the
        bars shrink; only a terminal too narrow for the essentials cuts the line.
        """
        fraction = self.index / self.total if self.total else 0.0
        current, overall = self.eta()
        rate = self.rate()
        variants = []
        for run_eta, show_rate, bar_width in (
            (True, True, 12),
            (False, True, 12),
            (False, False, 12),
            (False, False, 0),
        ):
            parts = [f"checkpoint {self.index + 1}/{self.total}" + (f" {bar(fraction, 8)}" if bar_width else "")]
            if self.step is not None:
                parts.append(f"step {self.step}")
            if self.total_steps:
                lanczos_bar = f" {bar(self.done_steps / self.total_steps, bar_width)}" if bar_width else ""
                parts.append(f"Lanczos{lanczos_bar} {self.done_steps}/{self.total_steps}")
                if show_rate and rate > 0:
                    parts.append(f"{rate:.3g} steps/s")
            else:
                parts.append("gradient")
            eta = f"ETA {format_duration(current)}"
            if run_eta and self.total > 1:
                eta += f" (all {format_duration(overall)})"
            parts.append(eta)
            variants.append("  ".join(parts))
        compact = [f"{self.index + 1}/{self.total}"]
        if self.step is not None:
            compact.append(f"step {self.step}")
        if self.total_steps:
            compact.append(f"{self.done_steps}/{self.total_steps}")
        variants.append("  ".join([*compact, f"ETA {format_duration(current)}"]))
        if width is None:
            return variants[0]
        return next((line for line in variants if len(line) <= width), variants[-1][:width])

    # -- drawing ---------------------------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[K" + self.text(terminal_width(self.stream) - 1))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line (before other output, and at the end)."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def echo(self, message: str, err: bool = False) -> None:
        """Print a line to stdout (or stderr) without garbling the progress line; the next event redraws it."""
        self.clear()
        click.echo(message, err=err)
