"""The HDF5 result file, format versions 1 and 2: write, read, resume, merge, upgrade.

This package is the only place that imports h5py. The layout is documented for users in ``docs/FORMAT.md``; the
names there are a contract. In short, version 2 (what new files are)::

    results.h5                      attrs format="hessspec", format_version=2, generated_by, created, label, config
    results.h5.d/step_00000300.h5   one file per checkpoint; attrs format="hessspec-checkpoint", step, sha256
        /results/<i>/               one group per (curvature, block): attrs curvature, block, step, ..., config;
                                    slq/nodes, slq/weights, top/..., overlap/..., gradient/... (optional)

and version 1 (still read, and appended to with whole-model Hessian results)::

    /                     attrs format="hessspec", format_version=1, generated_by, created, label, config (JSON)
    /checkpoints/<key>/   one group per checkpoint (attrs: step, source, sha256, ..., complete=True)

Crash safety. HDF5 does not survive a process killed while it updates a file in place: killing a writer in the
few milliseconds of a write left files whose earlier checkpoints could no longer be read ("addr overflow", broken
symbol tables; measured here with h5py 3.16 / HDF5 2.0). So no writer modifies a stored HDF5 file. Version 2 writes
each checkpoint's file whole under a temporary name, fsyncs and renames it (atomic on POSIX): its cost does not
depend on how many checkpoints are stored (``benchmarks/store.py``). Version 1 copies the whole file to
``.<name>.<pid>.partial``, adds the checkpoint there, fsyncs the copy and renames it over the original. A killed
writer leaves what was stored intact (plus a temporary file, which the next writer removes). One writer at a time
is enforced by an OS lock on ``<path>.lock``. The modules: :mod:`~hessspec.store.writer` (:class:`ResultWriter`),
:mod:`~hessspec.store.reader` (:func:`load_results`), :mod:`~hessspec.store.convert` (:func:`merge`,
:func:`upgrade`), :mod:`~hessspec.store.summary` (tables), and the layouts ``_v1``, ``_v2``, ``_format``, ``_h5files``.
"""

from __future__ import annotations

from hessspec.store._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    NON_NUMERIC_CONFIG_KEYS,
    TMP_PREFIX,
    config_differences,
)
from hessspec.store._h5files import READ_WAIT_S, StoreError
from hessspec.store._v2 import PARTS_SUFFIX, parts_dir
from hessspec.store.convert import merge, upgrade
from hessspec.store.reader import RunResults, load_results
from hessspec.store.writer import ResultWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NON_NUMERIC_CONFIG_KEYS",
    "PARTS_SUFFIX",
    "READ_WAIT_S",
    "TMP_PREFIX",
    "ResultWriter",
    "RunResults",
    "StoreError",
    "config_differences",
    "load_results",
    "merge",
    "parts_dir",
    "upgrade",
]
