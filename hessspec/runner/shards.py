"""Checkpoint shards for cluster array jobs: many checkpoints, many tasks, one process each.

:func:`select_shard` gives task ``I`` of ``N`` (``--shard I/N``, or ``--shard slurm`` from ``SLURM_ARRAY_TASK_*``)
a disjoint, stable subset of the checkpoints: after sorting, item ``i`` goes to shard ``i % N`` (round-robin, so
every task gets early and late checkpoints and the counts differ by at most one). Each task writes its own file
(:func:`shard_output_path`); ``hessspec merge`` joins them. Data parallelism within one checkpoint is
:mod:`hessspec.runner.distributed`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

_SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


class ShardError(ValueError):
    """A ``--shard`` specification that cannot be used."""


class ShardSpec(NamedTuple):
    """Task ``index`` (0-based) of ``count`` disjoint shards."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _slurm_shard(env: Mapping[str, str]) -> ShardSpec:
    missing = [name for name in _SLURM_VARIABLES if not env.get(name)]
    if missing:
        msg = (
            f"--shard slurm needs {' and '.join(_SLURM_VARIABLES)} (set by sbatch --array); {', '.join(missing)} "
            "not set; outside an array job give --shard I/N"
        )
        raise ShardError(msg)
    values = {}
    for name in (*_SLURM_VARIABLES, "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            msg = f"{name}={raw!r} is not an integer"
            raise ShardError(msg) from None
    task, count = values["SLURM_ARRAY_TASK_ID"], values["SLURM_ARRAY_TASK_COUNT"]
    first, step = values.get("SLURM_ARRAY_TASK_MIN", 0), values.get("SLURM_ARRAY_TASK_STEP", 1)
    offset = task - first
    if count < 1 or step < 1 or offset < 0 or offset % step or offset // step >= count:
        msg = (
            f"cannot map SLURM array task {task} to a shard (SLURM_ARRAY_TASK_MIN={first}, "
            f"SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_COUNT={count}); use a regular range such as "
            f"--array=0-{max(count, 1) - 1}, or give --shard I/N"
        )
        raise ShardError(msg)
    return ShardSpec(offset // step, count)


def parse_shard(spec: str | ShardSpec, env: Mapping[str, str] | None = None) -> ShardSpec:
    """Read a ``--shard`` value.

    Args:
        spec: ``"I/N"`` with 0 <= I < N (task I of N, 0-based), or ``"slurm"``: I = (SLURM_ARRAY_TASK_ID -
            SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP and N = SLURM_ARRAY_TASK_COUNT, so ``--array=1-8`` and
            ``--array=0-7`` both give shards 0..7 of 8.
        env: the environment for ``"slurm"`` (default ``os.environ``).

    Returns:
        The shard.

    Raises:
        ShardError: malformed spec, I outside 0..N-1, missing or irregular SLURM array variables.
    """
    if isinstance(spec, ShardSpec):
        index, count = spec
    else:
        text = str(spec).strip()
        if text.lower() == "slurm":
            return _slurm_shard(os.environ if env is None else env)
        match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
        if match is None:
            msg = f"--shard must be I/N (0-based task I of N tasks, e.g. 0/4) or 'slurm'; got {text!r}"
            raise ShardError(msg)
        index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        msg = f"--shard {index}/{count}: need N >= 1 and 0 <= I < N (I is 0-based)"
        raise ShardError(msg)
    return ShardSpec(index, count)


def checkpoint_sort_key(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Sort key of checkpoint files for sharding: the step in the name (see
    :func:`hessspec.checkpoints.step_from_filename`; -1 when none), then the path."""
    from hessspec.checkpoints import step_from_filename

    step = step_from_filename(path)
    return (-1 if step is None else step, os.fspath(path))


def select_shard(
    items: Sequence[T],
    spec: str | ShardSpec,
    *,
    key: Callable[[T], Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[T]:
    """The items of one shard: sort (by ``key``, stable), then item ``i`` belongs to shard ``i % N``.

    Every task of an array job must see the same ``items`` (the same checkpoint list); the assignment then
    depends on nothing else, so a rerun (requeue) gets the same subset. Shards are disjoint and cover all items;
    a shard may be empty when there are fewer items than tasks.

    Args:
        items: e.g. checkpoint paths.
        spec: ``"I/N"``, ``"slurm"`` or a :class:`ShardSpec` (see :func:`parse_shard`).
        key: sort key (e.g. :func:`checkpoint_sort_key`); None keeps the given order.
        env: the environment for ``"slurm"``.

    Returns:
        The shard's items, in sorted order.

    Raises:
        ShardError: see :func:`parse_shard`.
    """
    shard = parse_shard(spec, env)
    ordered = sorted(items, key=key) if key is not None else list(items)
    return ordered[shard.index :: shard.count]


def shard_output_path(
    path: str | os.PathLike[str], spec: str | ShardSpec, env: Mapping[str, str] | None = None
) -> Path:
    """The result file of one shard: ``results/bn.h5`` -> ``results/bn.shard-03-of-16.h5``.

    Join the shard files with ``hessspec merge results/bn.h5 results/bn.shard-*-of-16.h5``.
    """
    shard = parse_shard(spec, env)
    path = Path(path)
    digits = len(str(shard.count - 1))
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, ".h5")
    return path.with_name(f"{stem}.shard-{shard.index:0{digits}d}-of-{shard.count}{suffix}")
