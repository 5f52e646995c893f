"""``hessspec info``: what a result file holds, as a table."""

from __future__ import annotations

import json
from typing import Any

import click

from hessspec.cli._common import CONTEXT_SETTINGS, can_encode, debug_option, fmt_number

# Settings shown first, in this order; the others follow alphabetically.
_SETTING_ORDER = (
    "model", "model_args", "data", "data_root", "data_args", "samples", "batch_size", "bn_mode", "dtype", "params",
    "lanczos_steps", "probes", "top_k", "seed", "basis_dtype", "basis_device", "gradient_crosscheck", "device",
)  # fmt: skip


def _setting(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True) if value else "-"
    if value is None:
        return "-"
    return str(value)


def _columns(lam: str, pm: str, kinds: bool) -> list[tuple[str, Any]]:
    # (header, function of a summary_table row -> cell text)
    def trace(row: dict) -> str:
        return f"{fmt_number(row.get('trace'))} {pm} {fmt_number(row.get('trace_stderr'), 2)}"

    kind_columns = [("curvature", lambda r: r["curvature"]), ("block", lambda r: r["block"])] if kinds else []
    return [
        ("step", lambda r: str(r["step"])),
        *kind_columns,
        ("loss", lambda r: fmt_number(r.get("loss"))),
        (f"{lam}1", lambda r: fmt_number(r.get("lambda_1"))),
        (f"{lam}2", lambda r: fmt_number(r.get("lambda_2"))),
        (f"{lam}3", lambda r: fmt_number(r.get("lambda_3"))),
        (f"trace {pm} se", trace),
        ("r_1", lambda r: fmt_number(r.get("r_1"), 3)),
        ("r_10", lambda r: fmt_number(r.get("r_10"), 3)),
        ("outliers", lambda r: fmt_number(r.get("num_outliers"))),
        ("neg. mass", lambda r: fmt_number(r.get("negative_mass"), 3)),
        ("seconds", lambda r: f"{r['elapsed_s']:.1f}"),
    ]


def render_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def describe_run(run: Any) -> list[str]:
    """The lines ``hessspec info`` prints for one result file."""
    from hessspec.store.summary import summary_table

    unicode = can_encode("λ±")
    lam, pm = ("λ", "±") if unicode else ("lambda", "+/-")
    lines = [
        f"file:        {run.path}",
        f"label:       {run.label or '-'}",
        f"format:      hessspec format {run.format_version}, written by {run.generated_by or '?'}, "
        f"created {run.created or '?'}",
        "settings:",
    ]
    config = dict(run.config)
    keys = [k for k in _SETTING_ORDER if k in config] + sorted(k for k in config if k not in _SETTING_ORDER)
    width = max((len(k) for k in keys), default=0)
    lines += [f"  {key.ljust(width)}  {_setting(config[key])}" for key in keys if key != "label"]
    count = len(run.results)
    lines.append(f"checkpoints: {len({(r.step, r.sha256) for r in run.results})}")
    several = run.kinds not in ((), (("hessian", "all"),))
    if several:
        lines.append(f"curvatures:  {', '.join(run.curvatures)}")
        lines.append(f"blocks:      {', '.join(run.blocks)}")
        lines.append(f"results:     {count} (one per checkpoint, curvature and block stored)")
    if run.stale_steps:
        lines.append(
            f"stale:       steps {list(run.stale_steps)} were computed with older settings; rerun analyze to update"
        )
    if count:
        columns = _columns(lam, pm, kinds=several)
        rows = [[cell(row) for _, cell in columns] for row in summary_table(run)]
        lines.append("")
        lines += render_table([header for header, _ in columns], rows)
    return lines


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Show the settings and a table of a result file.")
@click.argument("files", metavar="FILE.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@debug_option
def info(files: tuple[str, ...]) -> None:
    """Show what result files hold: label, settings, and one row per checkpoint (per curvature and block stored).

    Columns: step (curvature and block when the file holds more than the whole-model Hessian), loss, the top
    three eigenvalues, the trace with its standard error across probes, the gradient overlaps r_1 and r_10 (share
    of the squared gradient norm in the top 1 and 10 eigenvectors; '-' when fewer were computed), the number of
    outliers above the bulk, the mass of negative eigenvalues, and seconds spent.
    """
    from hessspec.store import load_results

    runs = [load_results(path) for path in files]  # all readable before anything is printed
    for index, run in enumerate(runs):
        if index:
            click.echo("")
        click.echo("\n".join(describe_run(run)))
