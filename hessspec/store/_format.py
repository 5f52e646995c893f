"""The pieces of the result format shared by versions 1 and 2: names, checks, one result group's read and write.

A result group (version 1: ``/checkpoints/<key>``; version 2: ``/results/<i>`` of a checkpoint's file) holds the
scalar attributes of :data:`SCALAR_ATTRS`, the JSON attributes, the datasets of :data:`DATASETS` and, optionally,
those of :data:`OPTIONAL_DATASETS`. Version 2 adds the attributes ``curvature`` and ``block``; a version-1 group is
a ``("hessian", "all")`` result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import h5py
import numpy as np

from hessspec.results import WHOLE_HESSIAN, CheckpointResult
from hessspec.store._h5files import StoreError

FORMAT_NAME = "hessspec"
FORMAT_VERSION = 2  # what new files are written as; every version from 1 up to this one is read

# Config keys that never change the numbers, so they may differ between a file and the run that resumes or merges
# into it. Everything else in the config must match: the model, the data and its order, the batch size (BN train
# mode uses per-batch statistics), bn_mode, dtype, seed, lanczos steps, probes, overlap ranks, the basis precision.
# The device is here on purpose: moving a resumed run to another GPU (or the CPU) changes rounding, not results.
NON_NUMERIC_CONFIG_KEYS = (
    "label",
    # Which curvatures and parameter blocks a run asks for: each result is stored with its (curvature, block), and
    # a run that asks for more computes what the file lacks.
    "curvatures",
    "blocks",
    "out",
    "output",
    "device",
    "checkpoints",
    "sources",
    "data_root",
    "basis_device",
    "probes_per_pass",
    "basis_placement",
    "data_placement",
    "workers",
    "block_strategy",
    "compile",
    "num_workers",
    "shard",
    "shard_index",
    "num_shards",
    "rank",
    "world_size",
    "force",
    "resume",
    "verbose",
    "quiet",
    "progress",
    "log_level",
)

TMP_PREFIX = ".tmp_"

# Attributes of a result group: name -> type. "complete" is written last and is not a field.
SCALAR_ATTRS: dict[str, type] = {
    "step": int,
    "source": str,
    "sha256": str,
    "model": str,
    "n_params": int,
    "n_samples": int,
    "bn_mode": str,
    "dtype": str,
    "device": str,
    "seed": int,
    "lanczos_steps": int,
    "probes": int,
    "loss": float,
    "grad_norm": float,
    "trace": float,
    "trace_stderr": float,
    "elapsed_s": float,
}
# Version 2 only: what the result is a spectrum of.
KIND_ATTRS = ("curvature", "block")
JSON_ATTRS = ("timings", "settings")
# Dataset path inside a result group -> (CheckpointResult field, dtype, ndim).
DATASETS: dict[str, tuple[str, type, int]] = {
    "slq/nodes": ("nodes", np.float64, 2),
    "slq/weights": ("weights", np.float64, 2),
    "top/eigenvalues": ("top_eigenvalues", np.float64, 1),
    "top/residuals": ("top_residuals", np.float64, 1),
    "overlap/k": ("overlap_k", np.int64, 1),
    "overlap/ratio": ("overlap_ratio", np.float64, 1),
    "overlap/cos2": ("cos2", np.float64, 1),
}
OPTIONAL_DATASETS: dict[str, tuple[str, type, int]] = {
    "gradient/nodes": ("gradient_nodes", np.float64, 1),
    "gradient/weights": ("gradient_weights", np.float64, 1),
    "top/converged": ("top_converged", np.uint8, 1),  # 0/1 in the file, bool in CheckpointResult
}
BOOL_FIELDS = frozenset({"top_converged"})
# Fields that may differ between two computations of the same result without the numbers differing.
INCIDENTAL_FIELDS = frozenset({"source", "device", "elapsed_s", "timings", "settings"})

Kind = tuple[str, str]  # (curvature, block)


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    msg = f"object of type {type(obj).__name__} is not JSON-serialisable"
    raise TypeError(msg)


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        msg = f"config must be a dict of analysis settings; got {type(config).__name__}"
        raise TypeError(msg)
    try:
        return json.loads(to_json(dict(config)))
    except TypeError as exc:
        msg = f"config must be JSON-serialisable: {exc}"
        raise TypeError(msg) from None


def config_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two run configs, ignoring :data:`NON_NUMERIC_CONFIG_KEYS`.

    Args:
        stored: the config of a file.
        given: the config of the run that wants to write to it (or of another file).

    Returns:
        ``{key: (stored value, given value)}`` for every differing key; a key missing on one side has the value
        ``"<absent>"`` there. Empty when the configs agree on everything that changes numbers.
    """
    stored, given = canonical_config(stored), canonical_config(given)
    diffs = {}
    for key in sorted(set(stored) | set(given)):
        if key in NON_NUMERIC_CONFIG_KEYS:
            continue
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if a != b:
            diffs[key] = (a, b)
    return diffs


def describe_differences(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({a!r} vs {b!r})" for key, (a, b) in diffs.items())


def short(sha256: str) -> str:
    return sha256[:8] if sha256 else "no hash"


def describe_kind(kind: Kind) -> str:
    return f"{kind[0]}/{kind[1]}"


def as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def check_root(root: h5py.Group, path: str) -> int:
    """Check the root attributes of a result file; return its format version."""
    found = root.attrs.get("format")
    if found is None:
        msg = f"{path} is not a hessspec result file (no 'format' attribute at its root; expected '{FORMAT_NAME}')"
        raise StoreError(msg)
    if as_str(found) != FORMAT_NAME:
        msg = f"{path} is a {as_str(found)!r} file, not a hessspec result file (expected format '{FORMAT_NAME}')"
        raise StoreError(msg)
    raw = root.attrs.get("format_version")
    try:
        version = int(raw)
    except (TypeError, ValueError):
        msg = f"{path} has an invalid format_version {raw!r} (expected an integer <= {FORMAT_VERSION})"
        raise StoreError(msg) from None
    if version > FORMAT_VERSION:
        msg = (
            f"{path} has format version {version}, newer than this hessspec reads (versions 1 to {FORMAT_VERSION}); "
            "upgrade hessspec"
        )
        raise StoreError(msg)
    if version < 1:
        msg = f"{path} has an invalid format_version {version} (expected 1 to {FORMAT_VERSION})"
        raise StoreError(msg)
    return version


def json_attr(attrs: h5py.AttributeManager, name: str, where: str, default: Any) -> Any:
    raw = attrs.get(name)
    if raw is None:
        return default
    try:
        return json.loads(as_str(raw))
    except json.JSONDecodeError as exc:
        msg = f"{where}: attribute {name!r} is not valid JSON ({exc})"
        raise StoreError(msg) from None


def is_complete(group: h5py.Group) -> bool:
    return bool(group.attrs.get("complete", False))


# --------------------------------------------------------------------------------------------------------------
# One result group


def read_kind(group: h5py.Group, where: str, version: int) -> Kind:
    """``(curvature, block)`` of a result group; a version-1 group is the whole-model Hessian."""
    if version < 2:
        return WHOLE_HESSIAN
    missing = [name for name in KIND_ATTRS if name not in group.attrs]
    if missing:
        msg = f"{where}: result attribute {missing[0]!r} is missing"
        raise StoreError(msg)
    return (as_str(group.attrs["curvature"]), as_str(group.attrs["block"]))


def read_group(group: h5py.Group, where: str, version: int) -> CheckpointResult:
    attrs = group.attrs
    values: dict[str, Any] = {}
    for name, kind in SCALAR_ATTRS.items():
        if name not in attrs:
            msg = f"{where}: checkpoint attribute {name!r} is missing"
            raise StoreError(msg)
        raw = attrs[name]
        values[name] = as_str(raw) if kind is str else kind(raw)
    for name in JSON_ATTRS:
        values[name] = json_attr(attrs, name, where, {})
    for member, (field, dtype, _) in DATASETS.items():
        if member not in group:
            msg = f"{where}: dataset {member!r} is missing"
            raise StoreError(msg)
        values[field] = np.asarray(group[member][()], dtype=dtype)
    for member, (field, dtype, _) in OPTIONAL_DATASETS.items():
        values[field] = np.asarray(group[member][()], dtype=dtype) if member in group else None
        if field in BOOL_FIELDS and values[field] is not None:
            values[field] = values[field].astype(bool)
    values["curvature"], values["block"] = read_kind(group, where, version)
    return CheckpointResult(**values)


def check_result(result: CheckpointResult) -> None:
    """Refuse a result whose arrays do not fit the format (a bug upstream, not a user error)."""
    if not isinstance(result, CheckpointResult):
        msg = f"expected a CheckpointResult; got {type(result).__name__}"
        raise TypeError(msg)
    if int(result.step) < 0:
        msg = f"step must be >= 0; got {result.step}"
        raise ValueError(msg)
    for name in KIND_ATTRS:
        value = getattr(result, name)
        if not isinstance(value, str) or not value.strip():
            msg = f"{name} must be a non-empty string; got {value!r}"
            raise ValueError(msg)
    shapes = {field: np.shape(getattr(result, field)) for field, _, _ in DATASETS.values()}
    for field, _, ndim in DATASETS.values():
        if len(shapes[field]) != ndim:
            msg = f"{field} must have {ndim} dimension(s); got shape {shapes[field]}"
            raise ValueError(msg)
    checks = [
        ("weights", shapes["weights"], "nodes", shapes["nodes"]),
        ("top_residuals", shapes["top_residuals"], "top_eigenvalues", shapes["top_eigenvalues"]),
        ("cos2", shapes["cos2"], "top_eigenvalues", shapes["top_eigenvalues"]),
        ("overlap_ratio", shapes["overlap_ratio"], "overlap_k", shapes["overlap_k"]),
    ]
    if result.top_converged is not None:
        checks.append(("top_converged", np.shape(result.top_converged), "top_eigenvalues", shapes["top_eigenvalues"]))
    if (result.gradient_nodes is None) != (result.gradient_weights is None):
        msg = "gradient_nodes and gradient_weights must both be given or both be None"
        raise ValueError(msg)
    if result.gradient_nodes is not None:
        grad_shape = np.shape(result.gradient_nodes)
        if len(grad_shape) != 1:
            msg = f"gradient_nodes must have 1 dimension; got shape {grad_shape}"
            raise ValueError(msg)
        checks.append(("gradient_weights", np.shape(result.gradient_weights), "gradient_nodes", grad_shape))
    for name, shape, other, other_shape in checks:
        if shape != other_shape:
            msg = f"{name} must have the shape of {other} {other_shape}; got {shape}"
            raise ValueError(msg)
    if shapes["nodes"][0] != result.probes:
        msg = f"nodes must have one row per probe ({result.probes}); got shape {shapes['nodes']}"
        raise ValueError(msg)


def check_checkpoint_results(results: CheckpointResult | Iterable[CheckpointResult]) -> list[CheckpointResult]:
    """One result or several of one checkpoint (same step and sha256, distinct (curvature, block)), checked."""
    items = [results] if isinstance(results, CheckpointResult) else list(results)
    if not items:
        msg = "nothing to write: expected a CheckpointResult or a non-empty sequence of them"
        raise ValueError(msg)
    for item in items:
        check_result(item)
    first = items[0]
    seen: set[Kind] = set()
    for item in items:
        if (int(item.step), str(item.sha256)) != (int(first.step), str(first.sha256)):
            msg = (
                f"results written together must be of one checkpoint; got step {first.step} ({short(first.sha256)}) "
                f"and step {item.step} ({short(item.sha256)})"
            )
            raise ValueError(msg)
        if item.kind in seen:
            msg = f"two results for {describe_kind(item.kind)} of step {item.step}; each (curvature, block) once"
            raise ValueError(msg)
        seen.add(item.kind)
    return items


def write_group(group: h5py.Group, result: CheckpointResult, config: Mapping[str, Any], version: int) -> None:
    for name, kind in SCALAR_ATTRS.items():
        value = getattr(result, name)
        if kind is int:
            group.attrs[name] = np.int64(value)
        elif kind is float:
            group.attrs[name] = np.float64(value)
        else:
            group.attrs[name] = str(value)
    if version >= 2:
        for name in KIND_ATTRS:
            group.attrs[name] = str(getattr(result, name))
    for name in JSON_ATTRS:
        group.attrs[name] = to_json(getattr(result, name))
    group.attrs["config"] = to_json(config)
    for member, (field, dtype, _) in {**DATASETS, **OPTIONAL_DATASETS}.items():
        value = getattr(result, field)
        if value is not None:
            group.create_dataset(member, data=np.asarray(value, dtype=dtype))


def differing_numbers(a: CheckpointResult, b: CheckpointResult) -> list[str]:
    """Fields whose values differ between two results of the same checkpoint (incidental fields excluded)."""
    names = []
    for field in dataclasses.fields(CheckpointResult):
        if field.name in INCIDENTAL_FIELDS:
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            same = x is not None and y is not None and np.array_equal(x, y, equal_nan=True)
        elif isinstance(x, float) and isinstance(y, float):
            same = x == y or (math.isnan(x) and math.isnan(y))
        else:
            same = x == y
        if not same:
            names.append(field.name)
    return names
