"""Format version 2: a small root file, and one file per checkpoint in the directory ``<root>.d`` beside it.

A checkpoint's file holds one group per ``(curvature, block)`` result. It is written whole under a temporary name
in the same directory, closed, fsynced and renamed to its final name (atomic on POSIX), and the directory is
fsynced: a file with a final name is always complete, and writing one checkpoint touches only that checkpoint's
file, whatever the number already stored. Adding results to a stored checkpoint rewrites that checkpoint's file
alone (the same way). The root file (format, version, label, config) changes only on a forced config change or a
new label, by an atomic copy of that small file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from hessspec.results import CheckpointResult
from hessspec.store._format import as_str, check_root, is_complete, write_group
from hessspec.store._h5files import (
    LOCKING,
    PARTIAL_SUFFIX,
    READ_WAIT_S,
    StoreError,
    fsync,
    h5_open,
    one_line,
    temporary_for,
)

PARTS_SUFFIX = ".d"
PART_FORMAT = "hessspec-checkpoint"
PART_EXT = ".h5"
VERSION = 2


def parts_dir(path: str) -> str:
    """The directory holding the checkpoint files of the version-2 result file ``path``."""
    return os.path.realpath(path) + PARTS_SUFFIX


def part_path(path: str, key: str) -> str:
    return os.path.join(parts_dir(path), key + PART_EXT)


def prepare_new(path: str) -> None:
    """Create the checkpoint directory of a new file (before its root file exists)."""
    directory = parts_dir(path)
    if os.path.isdir(directory):
        # Left by a run killed between creating the directory and its root file, or by deleting a root file
        # alone: taking over checkpoints of unknown settings would mix runs.
        if any(not name.startswith(".") for name in os.listdir(directory)):
            msg = (
                f"cannot create {path}: {directory} exists and holds checkpoint files without their result file; "
                "remove that directory or choose another output name"
            )
            raise StoreError(msg)
        return
    if os.path.exists(directory):
        msg = f"cannot create {path}: {directory} exists and is not a directory"
        raise StoreError(msg)
    try:
        os.mkdir(directory)
        fsync(os.path.dirname(directory) or ".")
    except OSError as exc:
        msg = f"cannot write {path}: {one_line(exc)}"
        raise StoreError(msg) from None


def check_parts_dir(path: str) -> str:
    directory = parts_dir(path)
    if not os.path.isdir(directory):
        msg = (
            f"{path} is a version-2 result file whose checkpoints directory {directory} is missing "
            "(copy or move the file together with it)"
        )
        raise StoreError(msg)
    return directory


def part_files(path: str) -> list[tuple[str, str]]:
    """``(key, file path)`` of every committed checkpoint file, sorted by key (temporary files are skipped)."""
    directory = check_parts_dir(path)
    out = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not name.endswith(PART_EXT):
            continue
        out.append((name[: -len(PART_EXT)], os.path.join(directory, name)))
    return out


@contextlib.contextmanager
def open_part(file: str) -> Iterator[h5py.File]:
    """Open a checkpoint file for reading, checking that it is one."""
    with h5_open(file, "r", READ_WAIT_S) as f:
        if as_str(f.attrs.get("format", "")) != PART_FORMAT:
            msg = f"{file} is not a hessspec checkpoint file (expected format '{PART_FORMAT}')"
            raise StoreError(msg)
        if not is_complete(f):
            msg = f"{file} is an incomplete checkpoint file"
            raise StoreError(msg)
        yield f


def result_groups(part: h5py.File) -> list[tuple[str, h5py.Group]]:
    """The result groups of a checkpoint file, in their stored order."""
    results = part.get("results")
    if results is None:
        return []
    return sorted(((name, results[name]) for name in results), key=lambda item: int(item[0]))


def remove_stale_partials(path: str) -> None:
    """Temporary checkpoint files left by killed writers (the caller holds the writer lock)."""
    directory = parts_dir(path)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def commit_part(tmp: str, final: str) -> None:
    """Make a fully written temporary checkpoint file visible under its final name, durably."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(os.path.dirname(final))


def write_part(
    path: str,
    key: str,
    results: Sequence[CheckpointResult],
    config: Mapping[str, Any],
    keep: Sequence[int] = (),
) -> None:
    """Write checkpoint ``key``'s file: the stored result groups numbered ``keep`` (copied as they are), then
    ``results``. Replaces an existing file of that key atomically.
    """
    final = part_path(path, key)
    tmp = os.path.join(parts_dir(path), f".{key}.{os.getpid()}{PARTIAL_SUFFIX}")
    first = results[0]
    with temporary_for(tmp, final):
        with h5py.File(tmp, "w", **LOCKING) as f:
            f.attrs["format"] = PART_FORMAT
            f.attrs["format_version"] = np.int64(VERSION)
            f.attrs["step"] = np.int64(first.step)
            f.attrs["sha256"] = str(first.sha256)
            groups = f.create_group("results")
            index = 0
            if keep:
                with open_part(final) as old:
                    stored = dict(result_groups(old))
                    for name in keep:
                        old.copy(stored[str(name)], groups, name=str(index))
                        index += 1
            for result in results:
                write_group(groups.create_group(str(index)), result, config, version=VERSION)
                index += 1
            f.attrs["complete"] = True
        commit_part(tmp, final)


def check_root_file(root: h5py.Group, path: str) -> int:
    version = check_root(root, path)
    if version >= 2:
        check_parts_dir(path)
    return version


def remove_tree(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
