"""``hessspec export``: a result file's per-checkpoint figures as CSV or JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, writable_output

_SUFFIX_FORMATS = {".csv": "csv", ".json": "json"}


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Write the per-checkpoint figures as CSV or JSON.")
@click.argument("file", metavar="FILE.h5", type=click.Path(dir_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default=None,
    show_default="from the --out suffix, else csv",
    help="csv: one row per checkpoint, curvature and block; json: also label, settings and the top eigenvalue and "
    "overlap arrays.",
)  # fmt: skip
@click.option("--out", "out", metavar="PATH", default=None, show_default="stdout", help="Where to write.")
@debug_option
def export(file: str, fmt: str | None, out: str | None) -> None:
    """Export the figures of FILE.h5, one row per checkpoint, curvature and block (step, curvature, block, loss, top
    eigenvalues, trace, overlaps, ...).

    The quadrature itself (nodes and weights) stays in the HDF5 file; read it with hessspec.load_results.
    """
    from hessspec.store import load_results
    from hessspec.store.summary import export_csv, export_json

    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(Path(out).suffix.lower(), "csv") if out else "csv"
    target = writable_output(out, "export") if out else None
    run = load_results(file)
    write = export_csv if fmt == "csv" else export_json
    if target is None:
        write(run, sys.stdout)
        sys.stdout.flush()
    else:
        from hessspec._paths import make_parent

        write(run, make_parent(target))
