"""The ``hessspec`` command line: a click group whose subcommands live one per module and load on demand.

Every error a user can cause ends as one ``Error: ...`` line on stderr and a non-zero exit status; ``--debug``
(before or after the subcommand) or ``HESSSPEC_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

import click

from hessspec import __version__
from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, describe_error, is_debug

# name -> "module:attribute"; modules are imported only when their command is used (or help lists them).
_SUBCOMMANDS = {
    "analyze": "hessspec.cli.analyze:analyze",
    "info": "hessspec.cli.info:info",
    "export": "hessspec.cli.export:export",
    "merge": "hessspec.cli.merge:merge",
    "plot": "hessspec.cli.plot:plot",
    "upgrade": "hessspec.cli.upgrade:upgrade",
    # Written separately; registered only once hessspec/cli/demo.py exists.
    "demo": "hessspec.cli.demo:demo",
}
_OPTIONAL = frozenset({"demo"})


def _unavailable(name: str, error: BaseException) -> click.Command:
    reason = describe_error(error)

    @click.command(name=name, help=f"(unavailable: {reason})", context_settings=CONTEXT_SETTINGS)
    def command() -> None:
        raise click.ClickException(f"the {name} command cannot be loaded: {reason}")

    return command


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when the subcommand is needed.

    It also turns any exception escaping a subcommand (its own or a library's) into ``click.ClickException`` with
    a one-line message, unless debugging is on.
    """

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def _present(self, name: str) -> bool:
        if name not in _OPTIONAL:
            return True
        module = self.lazy_subcommands[name].split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name in self.lazy_subcommands if self._present(name)]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy_subcommands or not self._present(cmd_name):
            return super().get_command(ctx, cmd_name)
        module_name, attribute = self.lazy_subcommands[cmd_name].split(":")
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except Exception as error:  # a broken module must not take the whole CLI down
            if is_debug(ctx):
                raise
            return _unavailable(cmd_name, error)
        if not isinstance(command, click.Command):
            return _unavailable(cmd_name, TypeError(f"{module_name}.{attribute} is not a click command"))
        return command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, BrokenPipeError):
            raise
        except Exception as error:
            if is_debug(ctx):
                raise
            raise click.ClickException(describe_error(error)) from None


@click.group(
    cls=LazyGroup,
    lazy_subcommands=_SUBCOMMANDS,
    context_settings=CONTEXT_SETTINGS,
    epilog="Run 'hessspec COMMAND --help' for the options of a command.",
)
@click.version_option(__version__, "--version", prog_name="hessspec", message="%(prog)s %(version)s")
@debug_option
def cli() -> None:
    """The whole Hessian eigenvalue spectrum of a neural network across training checkpoints.

    Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019): 'analyze' writes a resumable HDF5 result
    file; 'info', 'export', 'plot' and 'merge' read it; 'upgrade' converts a file of result format 1 to 2.
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``hessspec`` console script and ``python -m hessspec``).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name="hessspec")


__all__ = ["cli", "main"]
