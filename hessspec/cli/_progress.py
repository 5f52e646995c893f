"""A one-line progress display on stderr: a bar over checkpoints and one over Lanczos steps, with rate and ETA.

Two bars on one redrawn line (rather than two ``click.progressbar`` lines) keep the terminal tidy when summary
lines are printed between checkpoints: the line is cleared, the summary written, the line redrawn. Nothing is
drawn unless the stream is a terminal.
"""

from __future__ import annotations

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

    def text(self) -> str:
        """The progress line as it would be drawn."""
        fraction = self.index / self.total if self.total else 0.0
        parts = [f"checkpoint {self.index + 1}/{self.total} {bar(fraction, 8)}"]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.total_steps:
            parts.append(f"Lanczos {bar(self.done_steps / self.total_steps, 12)} {self.done_steps}/{self.total_steps}")
            rate = self.rate()
            if rate > 0:
                parts.append(f"{rate:.3g} steps/s")
        else:
            parts.append("gradient")
        current, overall = self.eta()
        eta = f"ETA {format_duration(current)}"
        if self.total > 1:
            eta += f" (all {format_duration(overall)})"
        parts.append(eta)
        return "  ".join(parts)

    # -- drawing ---------------------------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        self.stream.write("\r\x1b[K" + self.text()[:width])
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
