"""Process-wide settings of the CPU runtime that make full-data Hessian-vector products fast.

A full-data HVP allocates and frees the same few large activation tensors (tens of MB each) for every batch and
every column. glibc's allocator serves blocks that large with ``mmap`` and gives them back with ``munmap`` on free,
so every allocation page-faults its memory in again: on the CPU benchmark model this kernel time made a gradient
1.7x and an HVP 1.7-2.6x slower (``benchmarks/allocator.py``, ``benchmarks/RESULTS.md``). :func:`tune_cpu_allocator`
tells glibc to serve large blocks from its heap and to keep freed memory for reuse, which removes that cost. The
price is that the process keeps its peak memory until it exits, which is what an analysis process needs anyway.

The command line applies it when it analyses on the CPU; library users call it once at start-up. It changes the
whole process, so the library never calls it by itself. ``HESSSPEC_TUNE_ALLOCATOR=0`` in the environment turns it
off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed memory at the top of the heap

_applied = False


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel at every free.

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, not from fresh ``mmap`` regions that are unmapped
    when freed) and a large ``M_TRIM_THRESHOLD`` (freed memory at the top of the heap is kept). Idempotent.

    Returns:
        True if the settings are in effect, False where they do not apply: not glibc (macOS, Windows, musl), or
        ``HESSSPEC_TUNE_ALLOCATOR=0`` in the environment.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("HESSSPEC_TUNE_ALLOCATOR", "1").strip() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has taken effect in this process."""
    return _applied


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TensorFloat-32 in CUDA matrix products and cuDNN convolutions, process-wide.

    TF32 rounds the inputs of float32 products to 10-bit mantissas on Ampere and later GPUs; it has no effect on
    the CPU. ``hessspec analyze --tf32`` calls it.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
