"""Output paths: check, before any work, that a file can be written there; create its directory when writing.

A missing output directory is created (``analyze --out results/run.h5``, ``plot ... --out figures/fig.png``), as
long as its nearest existing ancestor is a writable directory. Nothing here imports torch, h5py or click.
"""

from __future__ import annotations

import os
from pathlib import Path


def output_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a file could not be written at ``path`` (its missing directories created first), or None if it can.

    Args:
        path: the output file (``~`` is expanded).

    Returns:
        A message such as ``"'res' is a file, not a directory"``, or None.
    """
    target = Path(os.fspath(path)).expanduser()
    if target.is_dir():
        return "it is a directory"
    directory = target.parent if str(target.parent) else Path(".")
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{str(ancestor)!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        what = "directory" if ancestor == directory else "cannot create its directory: directory"
        return f"{what} {str(ancestor)!r} is not writable"
    return None


def make_parent(path: str | os.PathLike[str]) -> Path:
    """Create the directory of ``path`` (and its missing parents); return ``path`` with ``~`` expanded."""
    target = Path(os.fspath(path)).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
