"""Combining and converting result files: :func:`merge` (shards of one run) and :func:`upgrade` (version 1 to 2)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import numpy as np

from hessspec.results import WHOLE_HESSIAN, CheckpointResult
from hessspec.store import _v1, _v2
from hessspec.store._format import (
    FORMAT_VERSION,
    as_str,
    check_root,
    config_differences,
    describe_differences,
    describe_kind,
    differing_numbers,
    short,
)
from hessspec.store._h5files import (
    READ_WAIT_S,
    StoreError,
    WriterLock,
    fsync,
    h5_open,
    one_line,
    partial_name,
    refuse_if_being_written,
)
from hessspec.store.reader import load_results
from hessspec.store.writer import ResultWriter, _check_writable, version_1_refusal

Ident = tuple[int, str, str, str]  # (step, sha256, curvature, block)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _ident(result: CheckpointResult) -> Ident:
    return (result.step, result.sha256, result.curvature, result.block)


def _describe(result: CheckpointResult) -> str:
    kind = "" if result.kind == ("hessian", "all") else f" {describe_kind(result.kind)}"
    return f"step {result.step} ({short(result.sha256)}){kind}"


def merge(
    out_path: str | os.PathLike[str],
    in_paths: Iterable[str | os.PathLike[str]],
    *,
    force: bool = False,
    label: str | None = None,
) -> tuple[str, ...]:
    """Combine the shard files of one run into one file.

    Inputs (format version 1 or 2) must share their config (on the keys that change numbers) and must not be still
    being written. The unit is a result: one (checkpoint, curvature, block). A result present in several inputs,
    or already in the output, is written once if the copies hold the same numbers (source path, device, timings
    and settings may differ); copies with different numbers are refused, naming the step and the files. A
    (curvature, block) missing from one input and present in another is taken from where it is, so merging the
    files of runs that computed different curvatures or blocks of the same checkpoints completes them. Nothing is
    written unless all checks pass. The output is written with :class:`ResultWriter` semantics (created as
    version 2 if missing; appended to if it matches; an existing version-1 output takes whole-model Hessian
    results only, see :func:`upgrade`).

    Args:
        out_path: the merged file; must not be one of the inputs.
        in_paths: the shard files.
        force: passed to the output :class:`ResultWriter`; besides, conflicting copies are resolved in favour of
            the later input in ``in_paths`` (inputs over what the output already holds). Differing input configs
            are refused even with force.
        label: label of the output; default the first input's label.

    Returns:
        The checkpoint keys written to the output, one per checkpoint written to (results already there with the
        same numbers are not rewritten).

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
        f"{run.path}: {describe_differences(diffs)}"
        for run in runs[1:]
        if (diffs := config_differences(base.config, run.config))
    ]
    if mismatches:
        msg = f"cannot merge files analysed with different settings (vs {base.path}): " + "; ".join(mismatches)
        raise StoreError(msg)

    chosen: dict[Ident, tuple[CheckpointResult, str]] = {}
    conflicts = []
    for run in runs:
        for result in run.results:
            ident = _ident(result)
            if ident in chosen:
                previous, previous_path = chosen[ident]
                differing = differing_numbers(previous, result)
                if differing and not force:
                    conflicts.append(
                        f"{_describe(result)} differs between {previous_path} and {run.path} in {', '.join(differing)}"
                    )
                if not differing or not force:
                    continue
            chosen[ident] = (result, run.path)
    if conflicts:
        raise StoreError("cannot merge conflicting results: " + "; ".join(conflicts))

    kinds = {result.kind for result, _ in chosen.values()}
    if os.path.exists(out) and kinds - {WHOLE_HESSIAN}:
        with h5_open(out, "r", READ_WAIT_S) as f:
            if check_root(f, out) < 2:  # refuse before the writer opens it (which may relabel it)
                raise version_1_refusal(out, kinds - {WHOLE_HESSIAN})
    with ResultWriter(out, label=base.label if label is None else label, config=base.config, force=force) as writer:
        writer.check_kinds(kinds)
        existing = writer._current_results()
        by_checkpoint: dict[tuple[int, str], list[CheckpointResult]] = {}
        for ident, (result, path) in sorted(chosen.items()):
            if ident in existing:
                differing = differing_numbers(existing[ident], result)
                if not differing:
                    continue
                if not force:
                    conflicts.append(f"{_describe(result)} in {path} differs from {out} in {', '.join(differing)}")
            by_checkpoint.setdefault(ident[:2], []).append(result)
        if conflicts:
            raise StoreError("cannot merge conflicting results: " + "; ".join(conflicts))
        return tuple(writer.write(results) for results in by_checkpoint.values())


def upgrade(path: str | os.PathLike[str]) -> int:
    """Convert a version-1 result file to version 2 in place (what ``hessspec upgrade`` does).

    Every checkpoint group becomes a checkpoint file holding one ``("hessian", "all")`` result, with all its
    attributes and datasets copied as they are (stale entries stay stale). The new checkpoints directory is built
    under a temporary name, then renamed, then the new root file replaces the old one atomically: a run killed
    at any moment leaves either the version-1 file as it was or the complete version-2 file.

    Args:
        path: a version-1 result file. Not to be written by another process meanwhile (the writer lock is taken).

    Returns:
        The number of checkpoints converted.

    Raises:
        StoreError: the file is missing, not a hessspec file, already version 2, or cannot be written.
    """
    from hessspec import __version__

    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    if not os.path.exists(path):
        msg = f"{path}: no such file"
        raise StoreError(msg)
    _check_writable(path)
    lock = WriterLock(path)
    try:
        with h5_open(path, "r", READ_WAIT_S) as f:
            version = check_root(f, path)
        if version >= FORMAT_VERSION:
            msg = f"{path} is already format version {version}; nothing to upgrade"
            raise StoreError(msg)
        parts = _v2.parts_dir(path)
        building = f"{parts}.{os.getpid()}.partial"
        root_tmp = partial_name(path)
        _v2.remove_tree(building)
        try:
            os.mkdir(building)
            count = 0
            with h5_open(path, "r", READ_WAIT_S) as src, h5_open(root_tmp, "w", 0) as root:
                for name, value in src.attrs.items():
                    root.attrs[name] = value
                root.attrs["format_version"] = np.int64(FORMAT_VERSION)
                root.attrs["upgraded_by"] = f"hessspec {__version__}"
                for key, group in _v1.checkpoint_groups(src):
                    tmp = os.path.join(building, f".{key}.partial")
                    with h5_open(tmp, "w", 0) as part:
                        part.attrs["format"] = _v2.PART_FORMAT
                        part.attrs["format_version"] = np.int64(_v2.VERSION)
                        part.attrs["step"] = np.int64(group.attrs["step"])
                        part.attrs["sha256"] = as_str(group.attrs["sha256"])
                        results = part.create_group("results")
                        src.copy(group, results, name="0")
                        results["0"].attrs["curvature"] = "hessian"
                        results["0"].attrs["block"] = "all"
                        part.attrs["complete"] = True
                    fsync(tmp)
                    os.rename(tmp, os.path.join(building, key + _v2.PART_EXT))
                    count += 1
            fsync(root_tmp)
            fsync(building)
            _v2.remove_tree(parts)  # a directory left by an interrupted upgrade of this version-1 file
            os.rename(building, parts)
            fsync(os.path.dirname(parts) or ".")
            os.replace(root_tmp, path)
            fsync(os.path.dirname(path) or ".")
        except OSError as exc:
            msg = f"cannot upgrade {path}: {one_line(exc)}"
            raise StoreError(msg) from None
        finally:
            _v2.remove_tree(building)
            with contextlib.suppress(OSError):
                os.unlink(root_tmp)
        return count
    finally:
        lock.release()
