"""``hessspec upgrade``: convert a version-1 result file to format version 2."""

from __future__ import annotations

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Convert a version-1 result file to version 2.")
@click.argument("file", metavar="FILE.h5", type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@debug_option
def upgrade(file: str, quiet: bool) -> None:
    """Convert FILE.h5 from result format version 1 to version 2, in place.

    Version 2 stores several results per checkpoint (one per curvature and block) in a directory FILE.h5.d beside
    the file. Every stored result is kept as it is. The conversion is atomic: interrupted, it leaves the
    version-1 file unchanged. hessspec never converts a file unless asked; to keep the old file, write a version-2
    copy instead with `hessspec merge NEW.h5 FILE.h5`.
    """
    from hessspec.store import parts_dir
    from hessspec.store import upgrade as upgrade_file

    count = upgrade_file(file)
    if not quiet:
        click.echo(f"upgraded {file} to format version 2: {count} checkpoint(s), stored in {parts_dir(file)}")
