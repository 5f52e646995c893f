"""Format version 1: every checkpoint a group of the one result file, each write an atomic copy of the file.

Version 1 holds the whole-model Hessian only (one ``("hessian", "all")`` result per checkpoint). hessspec still
reads it and appends such results to an existing version-1 file in its own layout; new files are version 2.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import h5py

from hessspec.results import CheckpointResult
from hessspec.store._format import TMP_PREFIX, is_complete, write_group
from hessspec.store._h5files import rewrite


def unfinished_groups(root: h5py.Group) -> list[str]:
    """Keys of temporary groups and of groups never marked complete (left by interrupted writers)."""
    checkpoints = root.get("checkpoints")
    if checkpoints is None:
        return []
    return [
        key
        for key in checkpoints
        if key.startswith(TMP_PREFIX)
        or (isinstance(checkpoints.get(key), h5py.Group) and not is_complete(checkpoints[key]))
    ]


def checkpoint_groups(root: h5py.Group) -> Iterator[tuple[str, h5py.Group]]:
    """Complete checkpoint groups, skipping temporary and unfinished ones."""
    checkpoints = root.get("checkpoints")
    if checkpoints is None:
        return
    for key in checkpoints:
        if key.startswith(TMP_PREFIX):
            continue
        group = checkpoints.get(key)
        if isinstance(group, h5py.Group) and is_complete(group):
            yield key, group


def publish(checkpoints: h5py.Group, tmp_name: str, key: str) -> None:
    """Give a fully written temporary group its final name, then mark it complete."""
    if key in checkpoints:
        del checkpoints[key]
    checkpoints.move(tmp_name, key)
    checkpoints[key].attrs["complete"] = True


def write(path: str, key: str, result: CheckpointResult, config: Mapping[str, Any]) -> None:
    """Add (or replace) one checkpoint's group, on a copy of the file that atomically replaces it."""
    tmp_name = TMP_PREFIX + key
    with rewrite(path) as f:
        checkpoints = f.require_group("checkpoints")
        for leftover in unfinished_groups(f):
            del checkpoints[leftover]
        write_group(checkpoints.create_group(tmp_name), result, config, version=1)
        f.flush()
        publish(checkpoints, tmp_name, key)
