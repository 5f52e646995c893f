"""Write docs/CLI.md, the command-line reference, from the ``--help`` output of every command.

Usage:
    python scripts/gen_cli_docs.py            # rewrite docs/CLI.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/CLI.md is out of date (tests/test_cli.py does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "CLI.md"
WIDTH = 100  # fixed, so that the file does not depend on the terminal it was generated in

HEADER = """\
# hessspec command line

This reference is generated from the `--help` output of each command by `scripts/gen_cli_docs.py`; do not edit it
by hand (`python scripts/gen_cli_docs.py` rewrites it, and a test fails when it is out of date). `python -m hessspec`
is the same command as `hessspec`. Every command takes `--debug` to show a traceback instead of a one-line error.
"""


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # make_context applies the command's context_settings (show_default, -h); resilient parsing skips the checks
    # of required arguments.
    return command.make_context(
        name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
    )


def _sections(command: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    sections = [(ctx.command_path, command.get_help(ctx))]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sections += _sections(sub, _context(sub, name, ctx))
    return sections


def render() -> str:
    """The whole reference as Markdown."""
    from hessspec.cli import cli

    ctx = _context(cli, "hessspec", None)
    parts = [HEADER]
    sections = _sections(cli, ctx)
    parts.append("## Commands\n\n" + "\n".join(f"- [`{path}`](#{path.replace(' ', '-')})" for path, _ in sections))
    for path, text in sections:
        parts.append(f'<a id="{path.replace(" ", "-")}"></a>\n## `{path}`\n\n```text\n{text.rstrip()}\n```')
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/CLI.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date; run: python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
