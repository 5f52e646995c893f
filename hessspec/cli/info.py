"""``hessspec info``: what a result file holds, as a table."""

from __future__ import annotations

import json
import os
import textwrap
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


_NOT_CONVERGED = "n.c."


def _excluded(row: dict, key: str, digits: int = 4) -> str:
    # A key present with None: computed but excluded (pair not converged); absent: not computed.
    if key in row and row[key] is None:
        return _NOT_CONVERGED
    return fmt_number(row.get(key), digits)


def _columns(lam: str, pm: str, norm: str, kinds: bool) -> list[tuple[str, Any]]:
    # (header, function of (summary_table row, CheckpointResult) -> cell text)
    def trace(row: dict, _c: Any) -> str:
        return f"{fmt_number(row.get('trace'))} {pm} {fmt_number(row.get('trace_stderr'), 2)}"

    def converged(row: dict, c: Any) -> str:
        count = row.get("converged")
        return f"{'?' if count is None else count}/{len(c.top_eigenvalues)}"

    def bounds(row: dict, _c: Any) -> str:
        return f"{fmt_number(row.get('neg_mass_0_lower'), 2)}-{fmt_number(row.get('neg_mass_0_upper'), 2)}"

    kind_columns = [("curvature", lambda r, c: r["curvature"]), ("block", lambda r, c: r["block"])] if kinds else []
    return [
        ("step", lambda r, c: str(r["step"])),
        ("source", lambda r, c: os.path.basename(r["source"]) if r.get("source") else "-"),
        *kind_columns,
        ("loss", lambda r, c: fmt_number(r.get("loss"))),
        (f"{lam}1", lambda r, c: _excluded(r, "lambda_1")),
        (f"{lam}2", lambda r, c: _excluded(r, "lambda_2")),
        (f"{lam}3", lambda r, c: _excluded(r, "lambda_3")),
        ("conv.", converged),
        (f"trace {pm} se", trace),
        ("r_1", lambda r, c: _excluded(r, "r_1", 3)),
        ("r_10", lambda r, c: _excluded(r, "r_10", 3)),
        ("outliers", lambda r, c: fmt_number(r.get("num_outliers"))),
        (f"mass {lam}<-0.01{norm}", lambda r, c: fmt_number(r.get("neg_mass_below_1pct_norm"), 3)),
        (f"mass {lam}<0 in", bounds),
        ("seconds", lambda r, c: f"{r['elapsed_s']:.1f}"),
    ]


def _legend(lam: str, norm: str) -> list[str]:
    notes = [
        f"{_NOT_CONVERGED}: the Ritz pair is not converged (residual > 1e-3 {norm}), so it is not shown; r_k needs "
        f"the top k pairs converged. conv.: converged top pairs ('?': not recorded in this file).",
        f"mass {lam}<-0.01{norm}: estimated fraction of eigenvalues below -0.01 {norm} ({norm} = the largest |Ritz "
        f"value|); mass {lam}<0 in: bounds on the fraction below 0 (Chebyshev-Markov-Stieltjes).",
    ]
    return [line for note in notes for line in textwrap.wrap(note, 110, subsequent_indent="  ")]


def render_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def describe_run(run: Any) -> list[str]:
    """The lines ``hessspec info`` prints for one result file."""
    from hessspec.store.summary import duplicate_steps, summary_table

    unicode = can_encode("λ±‖")
    lam, pm, norm = ("λ", "±", "‖H‖") if unicode else ("lambda", "+/-", "||H||")
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
    duplicates = duplicate_steps(run)
    if duplicates:
        shown = "; ".join(
            f"{step} ({', '.join(os.path.basename(s) for s in sources)})" for step, sources in duplicates.items()
        )
        lines.append(f"duplicates:  several checkpoint files hold the same step: {shown}")
    if count:
        columns = _columns(lam, pm, norm, kinds=several)
        table = zip(summary_table(run), run.results, strict=True)
        rows = [[cell(row, c) for _, cell in columns] for row, c in table]
        lines.append("")
        lines += render_table([header for header, _ in columns], rows)
        lines.append("")
        lines += _legend(lam, norm)
    return lines


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Show the settings and a table of a result file.")
@click.argument("files", metavar="FILE.h5...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@debug_option
def info(files: tuple[str, ...]) -> None:
    """Show what result files hold: label, settings, and one row per checkpoint (per curvature and block stored).

    Columns: step, the checkpoint file (curvature and block when the file holds more than the whole-model
    Hessian), loss, the top three eigenvalues ('n.c.' where the Ritz pair is not converged), how many top pairs are
    converged, the trace with its standard error across probes ('n/a' with one probe), the gradient overlaps r_1
    and r_10 (share of the squared gradient norm in the top 1 and 10 eigenvectors; '-' when fewer were computed,
    'n.c.' unless the top k are converged), the number of outliers above the bulk, the fraction of eigenvalues
    below -0.01 ||H||, bounds on the fraction below 0, and seconds spent.
    """
    from hessspec.store import load_results

    runs = [load_results(path) for path in files]  # all readable before anything is printed
    for index, run in enumerate(runs):
        if index:
            click.echo("")
        click.echo("\n".join(describe_run(run)))
