"""Per-checkpoint summaries of a run, for ``hessspec info`` and ``hessspec export`` (CSV and JSON).

Works on :class:`hessspec.store.RunResults` (read with :func:`hessspec.store.load_results`); no torch here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from hessspec.store import RunResults


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


NOT_AVAILABLE = "n/a"  # a figure that does not exist for this run (the standard error of one probe)


def summary_table(run: RunResults) -> list[dict[str, Any]]:
    """Per-result figures for ``hessspec info`` and export, one dict per (checkpoint, curvature, block), sorted by
    step, then curvature (Hessian first) and block ("all" first), as ``run.results``.

    Columns:
        step, source (the checkpoint file), curvature, block, loss, grad_norm;
        lambda_1..lambda_5: top eigenvalues (as many as were computed, up to 5), None where the pair is not
            converged (:func:`hessspec.linalg.ritz.converged_pairs`);
        converged: how many of the top pairs are converged (None for results stored without the flags);
        trace, trace_stderr (:data:`NOT_AVAILABLE` with one probe: a standard error needs two);
        r_1 / r_5 / r_10: those among the stored overlap ranks, None unless the top k pairs are all converged;
        neg_mass_below_1pct_norm: estimated fraction of eigenvalues below ``-0.01 ||H||`` (``||H||`` = the largest
            ``|Ritz value|``; :func:`hessspec.linalg.spectrum.clear_negative_mass`);
        neg_mass_0_lower, neg_mass_0_upper: bounds on the fraction of eigenvalues below 0
            (:func:`hessspec.linalg.spectrum.negative_mass_bounds`);
        num_outliers: converged top eigenvalues above the bulk edge; elapsed_s.
    Values are Python floats, ints and strings; figures that cannot be computed (non-finite quadrature) are NaN,
    or None for num_outliers.
    """
    rows = []
    for c in run.results:
        converged = (
            np.ones(len(c.top_eigenvalues), dtype=bool) if c.top_converged is None else np.asarray(c.top_converged)
        )
        row: dict[str, Any] = {
            "step": c.step,
            "source": c.source,
            "curvature": c.curvature,
            "block": c.block,
            "loss": c.loss,
            "grad_norm": c.grad_norm,
        }
        for i, value in enumerate(c.top_eigenvalues[:5], start=1):
            row[f"lambda_{i}"] = float(value) if converged[i - 1] else None
        row["converged"] = c.converged_count()
        row["trace"] = c.trace
        row["trace_stderr"] = c.trace_stderr if c.probes > 1 else NOT_AVAILABLE
        for k in (1, 5, 10):
            if k in c.overlap_k:
                row[f"r_{k}"] = c.overlap_at(k) if k <= c.trusted_rank() else None
        try:
            row["neg_mass_below_1pct_norm"] = c.clear_negative_mass(0.01)
            row["neg_mass_0_lower"], row["neg_mass_0_upper"] = c.negative_mass_bounds(0.0)
            row["num_outliers"] = c.num_outliers()
        except ValueError:  # non-finite nodes or weights
            row["neg_mass_below_1pct_norm"] = row["neg_mass_0_lower"] = row["neg_mass_0_upper"] = float("nan")
            row["num_outliers"] = None
        row["elapsed_s"] = c.elapsed_s
        rows.append(row)
    return rows


def duplicate_steps(run: RunResults) -> dict[int, list[str]]:
    """Steps held by more than one checkpoint file (e.g. a ``.pt`` and a ``.safetensors`` of the same step), with
    the source files of each."""
    sources: dict[int, dict[str, None]] = {}
    for c in run.results:
        sources.setdefault(c.step, {})[c.sha256 + "|" + (c.source or c.sha256[:8] or "?")] = None
    return {step: [key.split("|", 1)[1] for key in names] for step, names in sources.items() if len(names) > 1}


@contextlib.contextmanager
def _text_output(file: str | os.PathLike[str] | IO[str]) -> Iterator[IO[str]]:
    if hasattr(file, "write"):
        yield file  # type: ignore[misc]
        return
    with open(os.fspath(file), "w", encoding="utf-8", newline="") as handle:
        yield handle


def export_csv(run: RunResults, file: str | os.PathLike[str] | IO[str]) -> None:
    """Write :func:`summary_table` as CSV (a header line; empty cells where a checkpoint lacks a column).

    Args:
        run: the results.
        file: a path or a text file opened with ``newline=""``.
    """
    rows = summary_table(run)
    columns: list[str] = []
    for row in rows:
        columns += [name for name in row if name not in columns]
    with _text_output(file) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _strict_json(obj: Any) -> Any:
    # Standard JSON has no NaN or infinity: write null.
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, dict):
        return {key: _strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict_json(value) for value in obj]
    return obj


def export_json(run: RunResults, file: str | os.PathLike[str] | IO[str]) -> None:
    """Write the run as JSON: label, config, file metadata, and per result the :func:`summary_table` row plus
    sha256 and the full arrays top_eigenvalues, top_residuals, top_converged (null when not recorded), overlap_k,
    overlap_ratio and cos2.

    The quadrature (nodes, weights) is not exported; read it from the HDF5 file. Non-finite numbers and figures
    that do not exist (``n/a`` in the CSV: the standard error of one probe) become null.

    Args:
        run: the results.
        file: a path or a text file.
    """
    checkpoints = []
    for c, row in zip(run.results, summary_table(run), strict=True):
        checkpoints.append(
            {
                **{key: None if value == NOT_AVAILABLE else value for key, value in row.items()},
                "source": c.source,
                "sha256": c.sha256,
                "top_eigenvalues": c.top_eigenvalues.tolist(),
                "top_residuals": c.top_residuals.tolist(),
                "top_converged": None if c.top_converged is None else [bool(v) for v in c.top_converged],
                "overlap_k": c.overlap_k.tolist(),
                "overlap_ratio": c.overlap_ratio.tolist(),
                "cos2": c.cos2.tolist(),
            }
        )
    document = {
        "label": run.label,
        "config": run.config,
        "format_version": run.format_version,
        "generated_by": run.generated_by,
        "created": run.created,
        "path": run.path,
        "stale_steps": list(run.stale_steps),
        "curvatures": list(run.curvatures),
        "blocks": list(run.blocks),
        "checkpoints": checkpoints,
    }
    with _text_output(file) as handle:
        json.dump(_strict_json(document), handle, indent=1, allow_nan=False)
        handle.write("\n")
