"""Writing result files: :class:`ResultWriter` (create, resume, force, one writer at a time)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

from hessspec.results import WHOLE_HESSIAN, CheckpointResult
from hessspec.store import _v1, _v2
from hessspec.store._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Kind,
    as_str,
    canonical_config,
    check_checkpoint_results,
    check_root,
    config_differences,
    describe_differences,
    describe_kind,
    json_attr,
    read_group,
    read_kind,
    short,
    to_json,
)
from hessspec.store._h5files import PARTIAL_SUFFIX, READ_WAIT_S, StoreError, WriterLock, h5_open, rewrite


def version_1_refusal(path: str, kinds: Iterable[Kind]) -> StoreError:
    """The error for results that a version-1 file cannot hold (anything but the whole-model Hessian)."""
    shown = ", ".join(sorted({describe_kind(kind) for kind in kinds}))
    msg = (
        f"{path} is a format-version-1 file, which holds whole-model Hessian results only (not {shown}); "
        f"convert it with `hessspec upgrade {path}` (or write to a new file)"
    )
    return StoreError(msg)


@dataclass
class _Entry:
    step: int
    sha256: str
    # (curvature, block) -> whether it was computed under the file's config (False after a forced config change,
    # until rewritten); the value's position is the result group's number in a version-2 checkpoint file.
    kinds: dict[Kind, bool] = field(default_factory=dict)
    groups: dict[Kind, int] = field(default_factory=dict)


class ResultWriter:
    """Appends checkpoint results to a result file; the resume and single-writer logic lives here.

    Opening a writer creates the file if it is missing (format version 2, or ``format_version``), or checks that an
    existing file is a hessspec file of a supported version whose config matches ``config`` on every key not in
    :data:`NON_NUMERIC_CONFIG_KEYS`. A version-1 file stays version 1: whole-model Hessian results are appended to
    it in its own layout, anything else is refused with an error naming ``hessspec upgrade`` (:func:`upgrade`).
    Nothing stored is ever modified in place (see the module docstring of :mod:`hessspec.store`), and leftovers of
    interrupted writers are removed. The writer holds an exclusive OS lock on ``<path>.lock`` until :meth:`close`;
    between writes it keeps no HDF5 handle open, so readers can read the file while an analysis runs.

    What ``force`` does:
        * ``force=False``: a config mismatch raises :class:`StoreError`; writing a result that is already stored
          (same step, sha256, curvature and block) raises :class:`StoreError`.
        * ``force=True``: a config mismatch is accepted and the file's ``config`` attribute is replaced by the
          given one; entries computed under the old config become *stale*: :meth:`has` returns
          False for them and :func:`load_results` lists them in ``stale_steps`` until they are rewritten. Writing
          a result that is already stored replaces it. Entries that are not rewritten are kept.

    Args:
        path: the result file (``.h5``).
        label: a human-readable name for the run; None keeps the stored label (new files get ""). A label that
            differs from the stored one replaces it, with or without force (it never changes numbers).
        config: JSON-serialisable analysis settings of the run.
        force: see above.
        format_version: the version of a new file (1 or 2; default 2). An existing file keeps its version; asking
            for another one is an error.

    Raises:
        StoreError: the directory is missing or not writable, the file is not a (supported) hessspec file, its
            config differs (without force), its version is not ``format_version``, or another process is writing it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label: str | None,
        config: Mapping[str, Any],
        force: bool = False,
        format_version: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if os.path.islink(self.path):  # the atomic rename must replace the file, not the link
            self.path = os.path.realpath(self.path)
        self.force = bool(force)
        self.config = canonical_config(config)
        if format_version not in (None, 1, FORMAT_VERSION):
            msg = f"format_version must be 1 or {FORMAT_VERSION}; got {format_version!r}"
            raise ValueError(msg)
        self.format_version = FORMAT_VERSION if format_version is None else int(format_version)
        self._index: dict[str, _Entry] = {}
        self._closed = True
        _check_writable(self.path)
        self._lock = WriterLock(self.path)
        try:
            if os.path.exists(self.path):
                self._open_existing(label, format_version)
            else:
                self._create(label)
        except BaseException:
            self._lock.release()
            raise
        self._closed = False

    # ----------------------------------------------------------------------------------------------------------
    # Opening

    def _create(self, label: str | None) -> None:
        from hessspec import __version__  # here, not at the top: hessspec/__init__ may import this module

        if self.format_version >= 2:
            _v2.prepare_new(self.path)
        with rewrite(self.path) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = np.int64(self.format_version)
            f.attrs["generated_by"] = f"hessspec {__version__}"
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["label"] = "" if label is None else str(label)
            f.attrs["config"] = to_json(self.config)
            if self.format_version < 2:
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
        if self.format_version >= 2:
            _v2.remove_stale_partials(self.path)

    def _open_existing(self, label: str | None, format_version: int | None) -> None:
        if not os.access(self.path, os.R_OK | os.W_OK):
            msg = f"{self.path} exists but is not readable and writable by this user"
            raise StoreError(msg)
        with h5_open(self.path, "r", READ_WAIT_S) as f:
            self.format_version = check_root(f, self.path)
            stored = json_attr(f.attrs, "config", self.path, {})
            stored_label = as_str(f.attrs.get("label", ""))
        if format_version is not None and format_version != self.format_version:
            msg = f"{self.path} has format version {self.format_version}, not {format_version}; " + (
                f"convert it with `hessspec upgrade {self.path}`" if self.format_version < 2 else "write a new file"
            )
            raise StoreError(msg)
        if self.format_version >= 2:
            _v2.check_parts_dir(self.path)
        diffs = config_differences(stored, self.config)
        if diffs and not self.force:
            msg = (
                f"{self.path} was analysed with other settings: {describe_differences(diffs)} (file vs this run); "
                "use the same settings to resume, another output file, or force to replace them"
            )
            raise StoreError(msg)
        self._remove_stale_partials()
        file_config = self.config if diffs else stored  # the root config once this writer has opened the file
        relabel = label is not None and str(label) != stored_label
        leftovers = self._scan(file_config)
        if diffs or relabel or leftovers:
            with rewrite(self.path) as f:
                if diffs:
                    f.attrs["config"] = to_json(self.config)
                if relabel:
                    f.attrs["label"] = str(label)
                for key in leftovers:
                    del f["checkpoints"][key]

    def _scan(self, file_config: Mapping[str, Any]) -> list[str]:
        """Index the stored results; return the unfinished version-1 groups to remove."""

        def current(group: h5py.Group, where: str) -> bool:
            made_with = json_attr(group.attrs, "config", where, None)
            return made_with is None or not config_differences(file_config, made_with)

        if self.format_version < 2:
            with h5_open(self.path, "r", READ_WAIT_S) as f:
                for key, group in _v1.checkpoint_groups(f):
                    entry = _Entry(int(group.attrs["step"]), as_str(group.attrs["sha256"]))
                    entry.kinds[WHOLE_HESSIAN] = current(group, f"{self.path}:{key}")
                    self._index[key] = entry
                return _v1.unfinished_groups(f)
        for key, file in _v2.part_files(self.path):
            with _v2.open_part(file) as part:
                entry = _Entry(int(part.attrs["step"]), as_str(part.attrs["sha256"]))
                for name, group in _v2.result_groups(part):
                    kind = read_kind(group, f"{file}:results/{name}", self.format_version)
                    entry.kinds[kind] = current(group, f"{file}:results/{name}")
                    entry.groups[kind] = int(name)
            self._index[key] = entry
        return []

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------------------
    # What is stored

    def _find(self, step: int, sha256: str) -> str | None:
        for key, entry in self._index.items():
            if entry.step == step and entry.sha256 == sha256:
                return key
        return None

    def stored(self, step: int, sha256: str) -> frozenset[Kind]:
        """The ``(curvature, block)`` results of a checkpoint that are stored and current.

        Args:
            step: training step.
            sha256: hex digest of the checkpoint file ("" for results analysed from memory).

        Returns:
            The set of ``(curvature, block)`` pairs stored for it under the file's config (empty if none).
        """
        key = self._find(int(step), str(sha256))
        if key is None:
            return frozenset()
        return frozenset(kind for kind, current in self._index[key].kinds.items() if current)

    def has(self, step: int, sha256: str, curvature: str = WHOLE_HESSIAN[0], block: str = WHOLE_HESSIAN[1]) -> bool:
        """Whether a complete, current result of this checkpoint exists (the resume check).

        Args:
            step: training step.
            sha256: hex digest of the checkpoint file ("" for results analysed from memory).
            curvature: the curvature (default the Hessian).
            block: the parameter block (default "all", the whole selected parameter set).

        Returns:
            True if it is stored and was computed under the file's config; False if missing or stale.
        """
        return (curvature, block) in self.stored(step, sha256)

    def missing(self, step: int, sha256: str, kinds: Iterable[Kind]) -> tuple[Kind, ...]:
        """The ``(curvature, block)`` pairs of ``kinds`` still to compute for a checkpoint (missing or stale).

        Args:
            step: training step.
            sha256: hex digest of the checkpoint file.
            kinds: the wanted ``(curvature, block)`` pairs.

        Returns:
            Those of ``kinds`` (in their order) that are not stored and current.
        """
        done = self.stored(step, sha256)
        return tuple(kind for kind in dict.fromkeys(tuple(k) for k in kinds) if kind not in done)

    def check_kinds(self, kinds: Iterable[Kind]) -> None:
        """Raise now, before any work, if this file cannot hold results of these ``(curvature, block)`` pairs.

        Raises:
            StoreError: the file is version 1 and a pair is not ``("hessian", "all")``; the message says how to
                convert it.
        """
        other = [tuple(kind) for kind in kinds if tuple(kind) != WHOLE_HESSIAN]
        if self.format_version < 2 and other:
            raise version_1_refusal(self.path, other)

    def _new_key(self, step: int, sha256: str) -> str:
        base = f"step_{step:08d}"
        candidates = [base]
        if sha256:
            candidates += [f"{base}_{sha256[:8]}", f"{base}_{sha256}"]
        candidates += [f"{base}_{i}" for i in range(2, 2 + len(self._index) + 1)]
        return next(key for key in candidates if key not in self._index)

    # ----------------------------------------------------------------------------------------------------------
    # Writing

    def write(self, results: CheckpointResult | Sequence[CheckpointResult]) -> str:
        """Store the results of one checkpoint; when this returns, they are on disk (fsynced and renamed).

        Args:
            results: one result, or several of one checkpoint (same step and sha256) with distinct
                ``(curvature, block)``. Results of the checkpoint already stored under other pairs are kept.

        Returns:
            The key of the checkpoint (``step_00000300``; ``step_00000300_<sha256[:8]>`` when another source file
            already holds that step): the group under ``/checkpoints`` (version 1), the file ``<key>.h5`` in the
            checkpoints directory (version 2).

        Raises:
            StoreError: the writer is closed, a result is already stored (without force), the file is version 1
                and a result is not the whole-model Hessian, or the file cannot be written.
            ValueError: the results' arrays do not have the shapes of the format, or they are not of one
                checkpoint.
        """
        if self._closed:
            msg = f"the writer of {self.path} is closed"
            raise StoreError(msg)
        items = check_checkpoint_results(results)
        self.check_kinds(item.kind for item in items)
        step, sha256 = int(items[0].step), str(items[0].sha256)
        key = self._find(step, sha256)
        if key is not None and not self.force:
            taken = [item.kind for item in items if self._index[key].kinds.get(item.kind)]
            if taken:
                msg = (
                    f"step {step} ({short(sha256)}) {', '.join(describe_kind(k) for k in taken)} is already stored "
                    f"in {self.path} as {key}; skip it (ResultWriter.has) or pass force to replace it"
                )
                raise StoreError(msg)
        key = key or self._new_key(step, sha256)
        entry = self._index.get(key) or _Entry(step, sha256)
        if self.format_version < 2:
            _v1.write(self.path, key, items[0], self.config)
            entry.kinds[WHOLE_HESSIAN] = True
        else:
            new = {item.kind for item in items}
            keep = [(kind, number) for kind, number in entry.groups.items() if kind not in new]
            _v2.write_part(self.path, key, items, self.config, keep=[number for _, number in keep])
            kinds = [kind for kind, _ in keep] + [item.kind for item in items]
            entry.kinds = {kind: entry.kinds[kind] if kind not in new else True for kind in kinds}
            entry.groups = {kind: number for number, kind in enumerate(kinds)}
        self._index[key] = entry
        return key

    def _current_results(self) -> dict[tuple[int, str, str, str], CheckpointResult]:
        """The current (non-stale) results of the file, by ``(step, sha256, curvature, block)``."""
        out = {}
        for key, entry in self._index.items():
            for result in _read_entry(self.path, self.format_version, key):
                if entry.kinds.get(result.kind):
                    out[(result.step, result.sha256, *result.kind)] = result
        return out

    def close(self) -> None:
        """Release the lock. Idempotent; the file itself is already closed after every write."""
        self._closed = True
        self._lock.release()


def _read_entry(path: str, version: int, key: str) -> list[CheckpointResult]:
    if version < 2:
        with h5_open(path, "r", READ_WAIT_S) as f:
            return [read_group(f["checkpoints"][key], f"{path}:{key}", version)]
    file = _v2.part_path(path, key)
    with _v2.open_part(file) as part:
        return [read_group(group, f"{file}:results/{name}", version) for name, group in _v2.result_groups(part)]


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
