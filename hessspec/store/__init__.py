"""The HDF5 result file, format version 1: write, read, resume, merge (summaries: :mod:`hessspec.store.summary`).

This module and its file-access layer :mod:`hessspec.store._h5files` are the only ones that import h5py. The layout is
documented for users in ``docs/FORMAT.md``; the names there are a contract. In short::

    /                     attrs format="hessspec", format_version=1, generated_by, created, label, config (JSON)
    /checkpoints/<key>/   one group per checkpoint (attrs: step, source, sha256, ..., complete=True)
        slq/nodes, slq/weights, top/eigenvalues, top/residuals, overlap/k, overlap/ratio, overlap/cos2,
        gradient/nodes, gradient/weights (optional)

Crash safety. HDF5 does not survive a process killed while it updates a file in place: killing a writer in the
few milliseconds of a write left files whose earlier checkpoints could no longer be read ("addr overflow", broken
symbol tables; measured here with h5py 3.16 / HDF5 2.0). So the writer never modifies the file itself: it copies
it to ``.<name>.<pid>.partial`` in the same directory, adds the checkpoint there, closes and fsyncs the copy and
renames it over the original (``os.replace``, atomic on POSIX). Inside the copy the checkpoint is still written
under ``/checkpoints/.tmp_<key>``, flushed, moved to its final name and then marked ``complete=True``, and readers
skip temporary and incomplete groups, as the format requires. A killed writer therefore leaves the previous file
intact (plus a stale ``.partial`` copy, which the next writer removes). Readers, even ones holding the file open,
never see a file being written. The copy costs O(file size) per checkpoint: milliseconds for files of hundreds of
checkpoints, against minutes of Hessian products per checkpoint. One writer at a time is enforced by an OS lock on
``<path>.lock``. The file mechanics are in :mod:`hessspec.store._h5files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

from hessspec.results import CheckpointResult
from hessspec.store._h5files import (
    PARTIAL_SUFFIX,
    StoreError,
    WriterLock,
    h5_open,
    refuse_if_being_written,
    rewrite,
)

FORMAT_NAME = "hessspec"
FORMAT_VERSION = 1

# Config keys that never change the numbers, so they may differ between a file and the run that resumes or merges
# into it. Everything else in the config must match: the model, the data and its order, the batch size (BN train
# mode uses per-batch statistics), bn_mode, dtype, seed, lanczos steps, probes, overlap ranks, the basis precision.
# The device is here on purpose: moving a resumed run to another GPU (or the CPU) changes rounding, not results.
NON_NUMERIC_CONFIG_KEYS = (
    "label",
    "out",
    "output",
    "device",
    "checkpoints",
    "sources",
    "data_root",
    "basis_device",
    "block_strategy",
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
# How long a reader waits while another program has the file open for writing through HDF5 (hessspec's writer
# never does: it writes a copy).
READ_WAIT_S = 10.0

# Attributes of a checkpoint group: name -> type. "complete" is written last and is not a field.
_SCALAR_ATTRS: dict[str, type] = {
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
_JSON_ATTRS = ("timings", "settings")
# Dataset path inside a checkpoint group -> (CheckpointResult field, dtype, ndim).
_DATASETS: dict[str, tuple[str, type, int]] = {
    "slq/nodes": ("nodes", np.float64, 2),
    "slq/weights": ("weights", np.float64, 2),
    "top/eigenvalues": ("top_eigenvalues", np.float64, 1),
    "top/residuals": ("top_residuals", np.float64, 1),
    "overlap/k": ("overlap_k", np.int64, 1),
    "overlap/ratio": ("overlap_ratio", np.float64, 1),
    "overlap/cos2": ("cos2", np.float64, 1),
}
_OPTIONAL_DATASETS: dict[str, tuple[str, type, int]] = {
    "gradient/nodes": ("gradient_nodes", np.float64, 1),
    "gradient/weights": ("gradient_weights", np.float64, 1),
}
# Fields that may differ between two computations of the same checkpoint without the numbers differing.
_INCIDENTAL_FIELDS = frozenset({"source", "device", "elapsed_s", "timings", "settings"})


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    msg = f"object of type {type(obj).__name__} is not JSON-serialisable"
    raise TypeError(msg)


def _to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        msg = f"config must be a dict of analysis settings; got {type(config).__name__}"
        raise TypeError(msg)
    try:
        return json.loads(_to_json(dict(config)))
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
    stored, given = _canonical_config(stored), _canonical_config(given)
    diffs = {}
    for key in sorted(set(stored) | set(given)):
        if key in NON_NUMERIC_CONFIG_KEYS:
            continue
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if a != b:
            diffs[key] = (a, b)
    return diffs


def _describe_differences(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({a!r} vs {b!r})" for key, (a, b) in diffs.items())


def _short(sha256: str) -> str:
    return sha256[:8] if sha256 else "no hash"


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_root(root: h5py.Group, path: str) -> int:
    """Check the root attributes of a result file; return its format version."""
    found = root.attrs.get("format")
    if found is None:
        msg = f"{path} is not a hessspec result file (no 'format' attribute at its root; expected '{FORMAT_NAME}')"
        raise StoreError(msg)
    if _as_str(found) != FORMAT_NAME:
        msg = f"{path} is a {_as_str(found)!r} file, not a hessspec result file (expected format '{FORMAT_NAME}')"
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


def _json_attr(attrs: h5py.AttributeManager, name: str, where: str, default: Any) -> Any:
    raw = attrs.get(name)
    if raw is None:
        return default
    try:
        return json.loads(_as_str(raw))
    except json.JSONDecodeError as exc:
        msg = f"{where}: attribute {name!r} is not valid JSON ({exc})"
        raise StoreError(msg) from None


def _is_complete(group: h5py.Group) -> bool:
    return bool(group.attrs.get("complete", False))


def _unfinished_groups(root: h5py.Group) -> list[str]:
    """Keys of temporary groups and of groups never marked complete (left by interrupted writers)."""
    checkpoints = root.get("checkpoints")
    if checkpoints is None:
        return []
    return [
        key
        for key in checkpoints
        if key.startswith(TMP_PREFIX)
        or (isinstance(checkpoints.get(key), h5py.Group) and not _is_complete(checkpoints[key]))
    ]


def _checkpoint_groups(root: h5py.Group) -> Iterator[tuple[str, h5py.Group]]:
    """Complete checkpoint groups, skipping temporary and unfinished ones."""
    checkpoints = root.get("checkpoints")
    if checkpoints is None:
        return
    for key in checkpoints:
        if key.startswith(TMP_PREFIX):
            continue
        group = checkpoints.get(key)
        if isinstance(group, h5py.Group) and _is_complete(group):
            yield key, group


def _read_group(group: h5py.Group, where: str) -> CheckpointResult:
    attrs = group.attrs
    values: dict[str, Any] = {}
    for name, kind in _SCALAR_ATTRS.items():
        if name not in attrs:
            msg = f"{where}: checkpoint attribute {name!r} is missing"
            raise StoreError(msg)
        raw = attrs[name]
        values[name] = _as_str(raw) if kind is str else kind(raw)
    for name in _JSON_ATTRS:
        values[name] = _json_attr(attrs, name, where, {})
    for member, (field, dtype, _) in _DATASETS.items():
        if member not in group:
            msg = f"{where}: dataset {member!r} is missing"
            raise StoreError(msg)
        values[field] = np.asarray(group[member][()], dtype=dtype)
    for member, (field, dtype, _) in _OPTIONAL_DATASETS.items():
        values[field] = np.asarray(group[member][()], dtype=dtype) if member in group else None
    return CheckpointResult(**values)


def _check_result(result: CheckpointResult) -> None:
    """Refuse a result whose arrays do not fit the format (a bug upstream, not a user error)."""
    if not isinstance(result, CheckpointResult):
        msg = f"expected a CheckpointResult; got {type(result).__name__}"
        raise TypeError(msg)
    if int(result.step) < 0:
        msg = f"step must be >= 0; got {result.step}"
        raise ValueError(msg)
    shapes = {field: np.shape(getattr(result, field)) for field, _, _ in _DATASETS.values()}
    for field, _, ndim in _DATASETS.values():
        if len(shapes[field]) != ndim:
            msg = f"{field} must have {ndim} dimension(s); got shape {shapes[field]}"
            raise ValueError(msg)
    checks = [
        ("weights", shapes["weights"], "nodes", shapes["nodes"]),
        ("top_residuals", shapes["top_residuals"], "top_eigenvalues", shapes["top_eigenvalues"]),
        ("cos2", shapes["cos2"], "top_eigenvalues", shapes["top_eigenvalues"]),
        ("overlap_ratio", shapes["overlap_ratio"], "overlap_k", shapes["overlap_k"]),
    ]
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


def _write_group(group: h5py.Group, result: CheckpointResult, config: Mapping[str, Any]) -> None:
    for name, kind in _SCALAR_ATTRS.items():
        value = getattr(result, name)
        if kind is int:
            group.attrs[name] = np.int64(value)
        elif kind is float:
            group.attrs[name] = np.float64(value)
        else:
            group.attrs[name] = str(value)
    for name in _JSON_ATTRS:
        group.attrs[name] = _to_json(getattr(result, name))
    group.attrs["config"] = _to_json(config)
    for member, (field, dtype, _) in {**_DATASETS, **_OPTIONAL_DATASETS}.items():
        value = getattr(result, field)
        if value is not None:
            group.create_dataset(member, data=np.asarray(value, dtype=dtype))


def _publish(checkpoints: h5py.Group, tmp_name: str, key: str) -> None:
    """Give a fully written temporary group its final name, then mark it complete."""
    if key in checkpoints:
        del checkpoints[key]
    checkpoints.move(tmp_name, key)
    checkpoints[key].attrs["complete"] = True


def _differing_numbers(a: CheckpointResult, b: CheckpointResult) -> list[str]:
    """Fields whose values differ between two results of the same checkpoint (incidental fields excluded)."""
    names = []
    for field in dataclasses.fields(CheckpointResult):
        if field.name in _INCIDENTAL_FIELDS:
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


# --------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _Entry:
    step: int
    sha256: str
    current: bool  # computed under the file's config (False after a forced config change, until rewritten)


class ResultWriter:
    """Appends checkpoint results to a result file; the resume and single-writer logic lives here.

    Opening a writer creates the file if it is missing, or checks that an existing file is a hessspec file of a
    supported version whose config matches ``config`` on every key not in :data:`NON_NUMERIC_CONFIG_KEYS`. An
    existing file is never truncated or modified in place: every change is made on a copy that atomically replaces
    it (see the module docstring), and leftovers of interrupted writers (temporary and incomplete groups, stale
    ``.partial`` copies) are removed. The writer holds an exclusive OS lock on ``<path>.lock`` until :meth:`close`;
    between writes it keeps no HDF5 handle open, so readers can read the file while an analysis runs.

    What ``force`` does:
        * ``force=False``: a config mismatch raises :class:`StoreError`; writing a checkpoint that is already stored
          (same step and sha256) raises :class:`StoreError`.
        * ``force=True``: a config mismatch is accepted and the file's ``config`` attribute is replaced by the
          given one; entries computed under the old config become *stale*: :meth:`has` returns
          False for them and :func:`load_results` lists them in ``stale_steps`` until they are rewritten. Writing
          a checkpoint that is already stored replaces its entry. Entries that are not rewritten are kept.

    Args:
        path: the result file (``.h5``).
        label: a human-readable name for the run; None keeps the stored label (new files get ""). A label that
            differs from the stored one replaces it, with or without force (it never changes numbers).
        config: JSON-serialisable analysis settings of the run.
        force: see above.

    Raises:
        StoreError: the directory is missing or not writable, the file is not a (supported) hessspec file, its
            config differs (without force), or another process is writing it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, label: str | None, config: Mapping[str, Any], force: bool = False
    ) -> None:
        self.path = os.fspath(path)
        if os.path.islink(self.path):  # the atomic rename must replace the file, not the link
            self.path = os.path.realpath(self.path)
        self.force = bool(force)
        self.config = _canonical_config(config)
        self._index: dict[str, _Entry] = {}
        self._closed = True
        _check_writable(self.path)
        self._lock = WriterLock(self.path)
        try:
            if os.path.exists(self.path):
                self._open_existing(label)
            else:
                self._create(label)
        except BaseException:
            self._lock.release()
            raise
        self._closed = False

    def _create(self, label: str | None) -> None:
        from hessspec import __version__  # here, not at the top: hessspec/__init__ may import this module

        with rewrite(self.path) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["generated_by"] = f"hessspec {__version__}"
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["label"] = "" if label is None else str(label)
            f.attrs["config"] = _to_json(self.config)
            f.create_group("checkpoints")

    def _remove_stale_partials(self) -> None:
        # Copies left by killed writers; we hold the lock, so no live writer is using one.
        directory, name = os.path.split(self.path)
        directory = directory or "."
        prefix = f".{name}."
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry.endswith(PARTIAL_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))

    def _open_existing(self, label: str | None) -> None:
        if not os.access(self.path, os.R_OK | os.W_OK):
            msg = f"{self.path} exists but is not readable and writable by this user"
            raise StoreError(msg)
        with h5_open(self.path, "r", READ_WAIT_S) as f:
            _check_root(f, self.path)
            stored = _json_attr(f.attrs, "config", self.path, {})
            stored_label = _as_str(f.attrs.get("label", ""))
        diffs = config_differences(stored, self.config)
        if diffs and not self.force:
            msg = (
                f"{self.path} was analysed with other settings: {_describe_differences(diffs)} (file vs this run); "
                "use the same settings to resume, another output file, or force to replace them"
            )
            raise StoreError(msg)
        self._remove_stale_partials()
        file_config = self.config if diffs else stored  # the root config once this writer has opened the file
        relabel = label is not None and str(label) != stored_label
        with h5_open(self.path, "r", READ_WAIT_S) as f:
            leftovers = _unfinished_groups(f)
            for key, group in _checkpoint_groups(f):
                made_with = _json_attr(group.attrs, "config", f"{self.path}:{key}", None)
                current = made_with is None or not config_differences(file_config, made_with)
                self._index[key] = _Entry(int(group.attrs["step"]), _as_str(group.attrs["sha256"]), current)
        if diffs or relabel or leftovers:
            with rewrite(self.path) as f:
                if diffs:
                    f.attrs["config"] = _to_json(self.config)
                if relabel:
                    f.attrs["label"] = str(label)
                for key in leftovers:
                    del f["checkpoints"][key]

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _find(self, step: int, sha256: str) -> str | None:
        for key, entry in self._index.items():
            if entry.step == step and entry.sha256 == sha256:
                return key
        return None

    def has(self, step: int, sha256: str) -> bool:
        """Whether a complete, current entry for this checkpoint exists (the resume check).

        Args:
            step: training step.
            sha256: hex digest of the checkpoint file ("" for results analysed from memory).

        Returns:
            True if it is stored and was computed under the file's config; False if missing or stale.
        """
        key = self._find(int(step), str(sha256))
        return key is not None and self._index[key].current

    def _new_key(self, step: int, sha256: str) -> str:
        base = f"step_{step:08d}"
        candidates = [base]
        if sha256:
            candidates += [f"{base}_{sha256[:8]}", f"{base}_{sha256}"]
        candidates += [f"{base}_{i}" for i in range(2, 2 + len(self._index) + 1)]
        return next(key for key in candidates if key not in self._index)

    def write(self, result: CheckpointResult) -> str:
        """Store one checkpoint result; when this returns, it is on disk (written to a copy, fsynced, renamed).

        Args:
            result: the result; its ``(step, sha256)`` identifies the checkpoint.

        Returns:
            The key of its group under ``/checkpoints`` (``step_00000300``; ``step_00000300_<sha256[:8]>`` when
            another source file already holds that step).

        Raises:
            StoreError: the writer is closed, the checkpoint is already stored (without force), or the file cannot
                be written.
            ValueError: the result's arrays do not have the shapes of the format.
        """
        if self._closed:
            msg = f"the writer of {self.path} is closed"
            raise StoreError(msg)
        _check_result(result)
        step, sha256 = int(result.step), str(result.sha256)
        key = self._find(step, sha256)
        if key is not None and self._index[key].current and not self.force:
            msg = (
                f"step {step} ({_short(sha256)}) is already stored in {self.path} as {key}; "
                "skip it (ResultWriter.has) or pass force to replace it"
            )
            raise StoreError(msg)
        key = key or self._new_key(step, sha256)
        tmp_name = TMP_PREFIX + key
        with rewrite(self.path) as f:
            checkpoints = f.require_group("checkpoints")
            for leftover in _unfinished_groups(f):
                del checkpoints[leftover]
            _write_group(checkpoints.create_group(tmp_name), result, self.config)
            f.flush()
            _publish(checkpoints, tmp_name, key)
        self._index[key] = _Entry(step, sha256, True)
        return key

    def _current_results(self) -> dict[tuple[int, str], CheckpointResult]:
        """The current (non-stale) entries of the file, by ``(step, sha256)``."""
        out = {}
        with h5_open(self.path, "r", READ_WAIT_S) as f:
            for key, group in _checkpoint_groups(f):
                if key in self._index and self._index[key].current:
                    result = _read_group(group, f"{self.path}:{key}")
                    out[(result.step, result.sha256)] = result
        return out

    def close(self) -> None:
        """Release the lock. Idempotent; the file itself is already closed after every write."""
        self._closed = True
        self._lock.release()


def _check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        msg = f"cannot write {path}: directory {directory} does not exist"
        raise StoreError(msg)
    if not os.access(directory, os.W_OK | os.X_OK):
        msg = f"cannot write {path}: directory {directory} is not writable"
        raise StoreError(msg)
    if os.path.isdir(path):
        msg = f"cannot write {path}: it is a directory"
        raise StoreError(msg)


# --------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class RunResults:
    """Everything a result file holds, read into memory.

    Attributes:
        label: human-readable name of the run.
        config: the analysis settings the file was written with (dict).
        format_version: the file's format version.
        generated_by: "hessspec <version>" of the writer that created the file.
        created: ISO 8601 UTC creation time.
        path: the file's path.
        checkpoints: the complete checkpoint results, sorted by step (then sha256).
        stale_steps: steps whose entries were computed under another config (left after a forced config change).
    """

    label: str
    config: dict[str, Any]
    format_version: int
    generated_by: str
    created: str
    path: str
    checkpoints: tuple[CheckpointResult, ...]
    stale_steps: tuple[int, ...] = ()

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps of the checkpoints, ascending (repeated when one step came from several files)."""
        return tuple(c.step for c in self.checkpoints)

    def get(self, step: int, sha256: str | None = None) -> CheckpointResult:
        """The result at ``step`` (and ``sha256`` when several source files share that step).

        Raises:
            KeyError: no such step (the message lists the available ones), or the step is ambiguous.
        """
        hits = [c for c in self.checkpoints if c.step == step and (sha256 is None or c.sha256 == sha256)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            msg = f"step {step} is not in {self.path}; available steps: {list(self.steps)}"
            raise KeyError(msg)
        msg = f"step {step} comes from {len(hits)} files in {self.path}; pass sha256= one of {[c.sha256 for c in hits]}"
        raise KeyError(msg)


@contextlib.contextmanager
def _open_for_read(source: str | os.PathLike[str] | h5py.Group) -> Iterator[tuple[h5py.Group, str]]:
    """Yield ``(root, path)``; an open h5py handle is used as it is and left open (as cooler's ``open_hdf5``)."""
    if isinstance(source, h5py.Group):
        yield source, source.file.filename
        return
    path = os.fspath(source)
    with h5_open(path, "r", READ_WAIT_S) as f:
        yield f, path


def load_results(source: str | os.PathLike[str] | h5py.Group) -> RunResults:
    """Read a result file.

    Args:
        source: a path, or an open ``h5py.File`` (left open).

    Returns:
        :class:`RunResults` with every complete checkpoint (temporary and unfinished groups are skipped).

    Raises:
        StoreError: missing, non-HDF5 or truncated file, a foreign HDF5 file, a newer format version, or a
            malformed checkpoint group.
    """
    with _open_for_read(source) as (root, path):
        version = _check_root(root, path)
        config = _json_attr(root.attrs, "config", path, {})
        results, stale = [], []
        for key, group in _checkpoint_groups(root):
            result = _read_group(group, f"{path}:{key}")
            made_with = _json_attr(group.attrs, "config", f"{path}:{key}", None)
            if made_with is not None and config_differences(config, made_with):
                stale.append(result.step)
            results.append(result)
        results.sort(key=lambda r: (r.step, r.sha256))
        return RunResults(
            label=_as_str(root.attrs.get("label", "")),
            config=config,
            format_version=version,
            generated_by=_as_str(root.attrs.get("generated_by", "")),
            created=_as_str(root.attrs.get("created", "")),
            path=path,
            checkpoints=tuple(results),
            stale_steps=tuple(sorted(stale)),
        )


# --------------------------------------------------------------------------------------------------------------
# Merging


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def merge(
    out_path: str | os.PathLike[str],
    in_paths: Iterable[str | os.PathLike[str]],
    *,
    force: bool = False,
    label: str | None = None,
) -> tuple[str, ...]:
    """Combine the shard files of one run into one file.

    Inputs must share their config (on the keys that change numbers) and must not be still being written. A
    checkpoint (same step and sha256) present in several inputs, or already in the output, is written once if the
    copies hold the same numbers (source path, device, timings and settings may differ); copies with different
    numbers are refused, naming the step and the files. Nothing is written unless all checks pass. The output is
    written with :class:`ResultWriter` semantics (created if missing, appended to if it matches).

    Args:
        out_path: the merged file; must not be one of the inputs.
        in_paths: the shard files.
        force: passed to the output :class:`ResultWriter`; besides, conflicting copies are resolved in favour of
            the later input in ``in_paths`` (inputs over what the output already holds). Differing input configs
            are refused even with force.
        label: label of the output; default the first input's label.

    Returns:
        The keys written to the output (entries already there with the same numbers are not rewritten).

    Raises:
        StoreError: see above.
    """
    out = os.fspath(out_path)
    paths = [os.fspath(p) for p in in_paths]
    if not paths:
        msg = "merge needs at least one input file"
        raise StoreError(msg)
    for path in paths:
        if _same_file(path, out):
            msg = f"the merge output {out} is also an input; write the merge to a new file"
            raise StoreError(msg)
    runs = []
    for path in paths:
        refuse_if_being_written(path)
        run = load_results(path)
        if run.stale_steps:
            msg = f"{path} holds entries computed under an older config (steps {list(run.stale_steps)}); recompute them"
            raise StoreError(msg)
        runs.append(run)
    base = runs[0]
    mismatches = [
        f"{run.path}: {_describe_differences(diffs)}"
        for run in runs[1:]
        if (diffs := config_differences(base.config, run.config))
    ]
    if mismatches:
        msg = f"cannot merge files analysed with different settings (vs {base.path}): " + "; ".join(mismatches)
        raise StoreError(msg)

    chosen: dict[tuple[int, str], tuple[CheckpointResult, str]] = {}
    conflicts = []
    for run in runs:
        for result in run.checkpoints:
            ident = (result.step, result.sha256)
            if ident in chosen:
                previous, previous_path = chosen[ident]
                differing = _differing_numbers(previous, result)
                if differing and not force:
                    conflicts.append(
                        f"step {result.step} ({_short(result.sha256)}) differs between {previous_path} and "
                        f"{run.path} in {', '.join(differing)}"
                    )
                if not differing or not force:
                    continue
            chosen[ident] = (result, run.path)
    if conflicts:
        raise StoreError("cannot merge conflicting results: " + "; ".join(conflicts))

    with ResultWriter(out, label=base.label if label is None else label, config=base.config, force=force) as writer:
        existing = writer._current_results()
        to_write = []
        for ident, (result, path) in sorted(chosen.items()):
            if ident in existing:
                differing = _differing_numbers(existing[ident], result)
                if not differing:
                    continue
                if not force:
                    conflicts.append(
                        f"step {result.step} ({_short(result.sha256)}) in {path} differs from {out} in "
                        f"{', '.join(differing)}"
                    )
            to_write.append(result)
        if conflicts:
            raise StoreError("cannot merge conflicting results: " + "; ".join(conflicts))
        return tuple(writer.write(result) for result in to_write)
