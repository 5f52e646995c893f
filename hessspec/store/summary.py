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

from hessspec.store import RunResults


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summary_table(run: RunResults) -> list[dict[str, Any]]:
    """Per-result figures for ``hessspec info`` and export, one dict per (checkpoint, curvature, block), sorted by
    step, then curvature (Hessian first) and block ("all" first), as ``run.results``.

    Columns: step, curvature, block, loss, grad_norm, lambda_1..lambda_5 (as many as were computed, up to 5), trace,
    trace_stderr, r_1 / r_5 / r_10 (those among the stored overlap ranks), negative_mass (estimated fraction of negative
    eigenvalues), num_outliers (top eigenvalues above the bulk edge) and elapsed_s. Values are Python floats and
    ints; figures that cannot be computed (non-finite quadrature) are NaN, or None for num_outliers.
    """
    rows = []
    for c in run.results:
        row: dict[str, Any] = {
            "step": c.step,
            "curvature": c.curvature,
            "block": c.block,
            "loss": c.loss,
            "grad_norm": c.grad_norm,
        }
        for i, value in enumerate(c.top_eigenvalues[:5], start=1):
            row[f"lambda_{i}"] = float(value)
        row["trace"] = c.trace
        row["trace_stderr"] = c.trace_stderr
        for k in (1, 5, 10):
            if k in c.overlap_k:
                row[f"r_{k}"] = c.overlap_at(k)
        try:
            row["negative_mass"] = c.negative_mass()
            row["num_outliers"] = c.num_outliers()
        except ValueError:  # non-finite nodes or weights
            row["negative_mass"] = float("nan")
            row["num_outliers"] = None
        row["elapsed_s"] = c.elapsed_s
        rows.append(row)
    return rows


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
    source, sha256 and the full arrays top_eigenvalues, top_residuals, overlap_k, overlap_ratio and cos2.

    The quadrature (nodes, weights) is not exported; read it from the HDF5 file. Non-finite numbers become null.

    Args:
        run: the results.
        file: a path or a text file.
    """
    checkpoints = []
    for c, row in zip(run.results, summary_table(run), strict=True):
        checkpoints.append(
            {
                **row,
                "source": c.source,
                "sha256": c.sha256,
                "top_eigenvalues": c.top_eigenvalues.tolist(),
                "top_residuals": c.top_residuals.tolist(),
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
