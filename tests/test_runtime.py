"""hessspec.runtime: the allocator setting takes effect (observed through glibc's own statistics) and can be off."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates 64 MiB with malloc and prints how many bytes glibc holds in mmap'ed blocks while it is held
# (mallinfo2().hblkhd): by default a block that large is mmap'ed; once tuned it comes from the heap.
PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from hessspec.runtime import allocator_tuned, tune_cpu_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    tuned = tune_cpu_allocator()
    assert tuned == allocator_tuned() == tune_cpu_allocator()  # idempotent
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    held = libc.mallinfo2().hblkhd - before
    libc.free(block)
    print(tuned, held)
    """
)


def _probe(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ)
    env.pop("HESSSPEC_TUNE_ALLOCATOR", None)
    if env_value is not None:
        env["HESSSPEC_TUNE_ALLOCATOR"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, held = out.stdout.split()
    return tuned == "True", int(held)


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"), reason="needs glibc >= 2.33")
def test_tuned_allocator_serves_large_blocks_from_the_heap():
    tuned, held = _probe(None)
    assert tuned
    assert held == 0  # the 64 MiB block is not an mmap'ed region, so freeing it does not unmap it
    tuned, held = _probe("0")
    assert not tuned
    assert held >= 64 << 20  # glibc's default: a fresh mapping, unmapped again on free
