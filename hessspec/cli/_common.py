"""Pieces shared by the subcommands: context settings, --debug, error messages, small parameter types."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

CONTEXT_SETTINGS: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}
DEBUG_ENV = "HESSSPEC_DEBUG"
_DEBUG_KEY = "hessspec.debug"
# Exceptions whose message is written for users (the library's errors all derive from ValueError).
_USER_ERRORS = (ValueError, ArithmeticError, MemoryError, OSError)

F = TypeVar("F", bound=Callable[..., Any])


def is_debug(ctx: click.Context | None) -> bool:
    """Whether tracebacks should be shown: ``--debug`` anywhere on the command line, or ``HESSSPEC_DEBUG=1``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY))


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_KEY] = True


def debug_option(f: F) -> F:
    """``--debug``: show tracebacks instead of one-line errors (accepted by the group and every command)."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_debug,
        help="Show the full traceback when an error occurs.",
    )(f)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_error(error: BaseException) -> str:
    """One line for a user: the library's own message, or the exception type and message for anything else.

    Args:
        error: the exception.

    Returns:
        The line (without the ``Error:`` prefix click adds).
    """
    name = type(error).__name__
    text = _one_line(str(error))
    if name == "OutOfMemoryError":  # torch.OutOfMemoryError (a RuntimeError) on a GPU
        first = text.split(". ")[0]
        return (
            f"out of memory: {first}; try a smaller --batch-size, --basis-device cpu, --basis-dtype float32, "
            "or fewer --probes/--lanczos-steps"
        )
    if isinstance(error, _USER_ERRORS) or name == "DeterminismError":
        if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
            text = f"{error.filename}: {text}"
        return text or name
    return f"{name}: {text} (unexpected; rerun with --debug for the traceback)"


def writable_output(path: str, what: str = "output") -> Path:
    """Check that ``path`` can be written: it is not a directory, and its directory exists and is writable or
    can be created (:func:`hessspec._paths.output_problem`). The directory is created when the file is written.

    Raises:
        click.ClickException: otherwise, naming the reason.
    """
    from hessspec._paths import output_problem

    target = Path(path).expanduser()
    problem = output_problem(target)
    if problem is not None:
        msg = f"cannot write the {what} {str(target)!r}: {problem}"
        raise click.ClickException(msg)
    return target


def can_encode(text: str, stream: Any = None) -> bool:
    """Whether ``stream`` (default stdout) can write ``text`` (a C locale cannot write "λ")."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def fmt_number(value: Any, digits: int = 4) -> str:
    """A compact number: ``4`` significant digits, "-" for missing, "nan" for NaN."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:
        return "nan"
    return f"{number:.{digits}g}"


def parse_int_list(values: tuple[str, ...], what: str) -> list[int]:
    """Integers from options given once or several times, each possibly a comma-separated list.

    Raises:
        click.BadParameter: a value that is not an integer.
    """
    numbers = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                numbers.append(int(part))
            except ValueError:
                msg = f"expected integers (e.g. 0,100,500); got {part!r}"
                raise click.BadParameter(msg, param_hint=what) from None
    return numbers


def tune_allocator_for(device: str) -> None:
    """Apply :func:`hessspec.runtime.tune_cpu_allocator` when ``device`` resolves to the CPU.

    Large allocations otherwise page-fault on every batch. A bad device name is left for the pipeline to report.
    """
    from hessspec.runner.job import PipelineError, resolve_device
    from hessspec.runtime import tune_cpu_allocator

    try:
        if resolve_device(device).type == "cpu":
            tune_cpu_allocator()
    except PipelineError:
        pass
