"""``hessspec merge``: combine the shard files of one run."""

from __future__ import annotations

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, writable_output


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Combine shard files of one run into one file.")
@click.argument("out", metavar="OUT.h5", type=click.Path(dir_okay=False))
@click.argument("inputs", metavar="IN.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--label", default=None, show_default="the first input's", help="Label of the merged run.")
@click.option(
    "--force", is_flag=True,
    help="Let later inputs win over earlier ones (and over OUT) where the same checkpoint differs.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@debug_option
def merge(out: str, inputs: tuple[str, ...], label: str | None, force: bool, quiet: bool) -> None:
    """Merge the result files IN.h5... (e.g. the shards of an array job) into OUT.h5.

    The inputs must have been analysed with the same settings. A result (checkpoint, curvature, block) found in
    several inputs is written once; copies with different numbers are refused unless --force; what one input lacks
    is taken from another. OUT.h5 may already exist (it is appended to if its settings match). A new OUT.h5 is
    result format 2 (whatever the inputs' version): this also converts a version-1 file into a new one. Nothing is
    written unless every check passes.
    """
    from hessspec._paths import make_parent
    from hessspec.store import load_results
    from hessspec.store import merge as merge_files

    make_parent(writable_output(out, "merge output"))
    written = merge_files(out, inputs, force=force, label=label)
    if not quiet:
        run = load_results(out)
        total = len({(r.step, r.sha256) for r in run.results})
        click.echo(f"merged {len(inputs)} file(s) into {out}: {len(written)} checkpoint(s) written, {total} in all")
