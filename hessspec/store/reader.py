"""Reading result files: :func:`load_results` and the typed :class:`RunResults` (versions 1 and 2)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py

from hessspec.results import WHOLE_HESSIAN, CheckpointResult
from hessspec.store import _v1, _v2
from hessspec.store._format import as_str, config_differences, describe_kind, json_attr, read_group
from hessspec.store._h5files import READ_WAIT_S, h5_open

# Curvatures in the order tables and figures show them; others follow alphabetically.
CURVATURE_ORDER = ("hessian", "ggn", "empirical-fisher", "gradient-covariance", "residual")


def _curvature_rank(name: str) -> tuple[int, str]:
    return (CURVATURE_ORDER.index(name), "") if name in CURVATURE_ORDER else (len(CURVATURE_ORDER), name)


@dataclass(frozen=True, repr=False)
class RunResults:
    """Everything a result file holds, read into memory.

    Attributes:
        label: human-readable name of the run.
        config: the analysis settings the file was written with (dict).
        format_version: the file's format version.
        generated_by: "hessspec <version>" of the writer that created the file.
        created: ISO 8601 UTC creation time.
        path: the file's path.
        results: every complete result, one per (checkpoint, curvature, block), sorted by step, sha256, curvature
            (Hessian first) and block (in stored order, "all" first).
        stale_steps: steps with entries computed under another config (left after a forced config change).
    """

    label: str
    config: dict[str, Any]
    format_version: int
    generated_by: str
    created: str
    path: str
    results: tuple[CheckpointResult, ...]
    stale_steps: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return (
            f"RunResults(path={self.path!r}, label={self.label!r}, format_version={self.format_version}, "
            f"steps={list(self.available_steps())}, curvatures={list(self.curvatures)}, blocks={list(self.blocks)})"
        )

    @property
    def checkpoints(self) -> tuple[CheckpointResult, ...]:
        """The whole-model Hessian results (curvature "hessian", block "all"), sorted by step then sha256."""
        return self.select()

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps of :attr:`checkpoints`, ascending (repeated when one step came from several files)."""
        return tuple(c.step for c in self.checkpoints)

    @property
    def curvatures(self) -> tuple[str, ...]:
        """The curvatures stored, Hessian first."""
        return tuple(sorted({r.curvature for r in self.results}, key=_curvature_rank))

    @property
    def blocks(self) -> tuple[str, ...]:
        """The blocks stored, in stored order ("all", the whole parameter set, first)."""
        return tuple(dict.fromkeys(r.block for r in self.results))

    @property
    def kinds(self) -> tuple[tuple[str, str], ...]:
        """The ``(curvature, block)`` pairs stored, in the order of :attr:`results`."""
        return tuple(dict.fromkeys(r.kind for r in sorted(self.results, key=self._kind_order)))

    def _kind_order(self, result: CheckpointResult) -> tuple:
        blocks = self.blocks
        return (_curvature_rank(result.curvature), blocks.index(result.block))

    def available_steps(self, curvature: str | None = None, block: str | None = None) -> tuple[int, ...]:
        """Distinct steps that have a result (of ``curvature`` and ``block`` when given), ascending."""
        return tuple(
            sorted(
                {
                    r.step
                    for r in self.results
                    if (curvature is None or r.curvature == curvature) and (block is None or r.block == block)
                }
            )
        )

    def select(self, curvature: str = WHOLE_HESSIAN[0], block: str = WHOLE_HESSIAN[1]) -> tuple[CheckpointResult, ...]:
        """The results of one ``(curvature, block)`` across checkpoints, sorted by step then sha256.

        Args:
            curvature: e.g. "hessian", "ggn".
            block: a block name, or "all" for the whole parameter set.

        Returns:
            The results (empty if that pair is not stored).
        """
        return tuple(r for r in self.results if r.curvature == curvature and r.block == block)

    def get(
        self,
        step: int,
        sha256: str | None = None,
        *,
        curvature: str = WHOLE_HESSIAN[0],
        block: str = WHOLE_HESSIAN[1],
    ) -> CheckpointResult:
        """The result at ``step`` for ``(curvature, block)`` (and ``sha256`` when several files share the step).

        Args:
            step: training step.
            sha256: the checkpoint file's digest, needed only when two source files share ``step``.
            curvature: the curvature (default the Hessian).
            block: the block (default "all", the whole parameter set).

        Raises:
            KeyError: no such step or (curvature, block) (the message lists what is available), or the step is
                ambiguous.
        """
        kind = (curvature, block)
        if kind not in self.kinds:
            msg = f"{describe_kind(kind)} is not in {self.path}; available: {[describe_kind(k) for k in self.kinds]}"
            raise KeyError(msg)
        of_kind = self.select(curvature, block)
        hits = [c for c in of_kind if c.step == step and (sha256 is None or c.sha256 == sha256)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            shown = "" if kind == WHOLE_HESSIAN else f" for {describe_kind(kind)}"
            msg = f"step {step} is not in {self.path}{shown}; available steps: {[c.step for c in of_kind]}"
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


def _stored_results(root: h5py.Group, path: str, version: int) -> Iterator[tuple[CheckpointResult, h5py.Group, str]]:
    if version < 2:
        for key, group in _v1.checkpoint_groups(root):
            where = f"{path}:{key}"
            yield read_group(group, where, version), group, where
        return
    for _, file in _v2.part_files(path):
        with _v2.open_part(file) as part:
            for name, group in _v2.result_groups(part):
                where = f"{file}:results/{name}"
                yield read_group(group, where, version), group, where


def load_results(source: str | os.PathLike[str] | h5py.Group) -> RunResults:
    """Read a result file (format version 1 or 2).

    Args:
        source: a path, or an open ``h5py.File`` of the result file (left open).

    Returns:
        :class:`RunResults` with every complete result (temporary and unfinished entries are skipped). Its
        ``checkpoints`` are the whole-model Hessian results; ``get``/``select`` reach the others.

    Raises:
        StoreError: missing, non-HDF5 or truncated file, a foreign HDF5 file, a newer format version, a missing
            checkpoints directory (version 2), or a malformed entry.
    """
    with _open_for_read(source) as (root, path):
        version = _v2.check_root_file(root, path)
        config = json_attr(root.attrs, "config", path, {})
        results, stale = [], set()
        blocks: dict[str, int] = {}
        for result, group, where in _stored_results(root, path, version):
            made_with = json_attr(group.attrs, "config", where, None)
            if made_with is not None and config_differences(config, made_with):
                stale.add(result.step)
            blocks.setdefault(result.block, len(blocks))
            results.append(result)
        first = {"all": -1}
        results.sort(
            key=lambda r: (r.step, r.sha256, _curvature_rank(r.curvature), first.get(r.block, blocks[r.block]))
        )
        return RunResults(
            label=as_str(root.attrs.get("label", "")),
            config=config,
            format_version=version,
            generated_by=as_str(root.attrs.get("generated_by", "")),
            created=as_str(root.attrs.get("created", "")),
            path=path,
            results=tuple(results),
            stale_steps=tuple(sorted(stale)),
        )
