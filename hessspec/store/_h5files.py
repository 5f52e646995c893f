"""Safe access to HDF5 result files: open with a wait, rewrite by atomic copy, one writer at a time.

The mechanics behind :mod:`hessspec.store`'s crash safety (described there): :func:`rewrite` yields a writable copy
of a file that replaces the original atomically when the block ends, :class:`WriterLock` is the single-writer OS
lock on ``<path>.lock``, :func:`h5_open` waits while another program holds HDF5's own lock. With :mod:`hessspec.store`
the only modules that import h5py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

import h5py

try:  # POSIX only; elsewhere writers run without the OS lock.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"
# How long a reader waits while another program has a file open for writing through HDF5 (hessspec's writers
# never do: they write new files and rename them).
READ_WAIT_S = 10.0


class StoreError(ValueError):
    """A result file cannot be read or written as asked; the message is one line naming the file."""


def _locking_kwargs() -> dict[str, Any]:
    # "best-effort": use HDF5's own file lock, but do not fail on filesystems without lock support (NFS, Lustre).
    version = h5py.version.hdf5_version_tuple
    if version >= (1, 12, 1) or (1, 10, 7) <= version < (1, 11):
        return {"locking": "best-effort"}
    return {}  # pragma: no cover


LOCKING = _locking_kwargs()


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def _translate_open_error(path: str, exc: OSError) -> StoreError:
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return StoreError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError) or os.path.isdir(path):
        return StoreError(f"{path} is a directory, not a result file")
    if isinstance(exc, BlockingIOError):
        return StoreError(f"{path} is held open by another process (HDF5 file lock); try again when it is closed")
    if "signature not found" in text:
        return StoreError(f"{path} is not an HDF5 file (expected a hessspec result file)")
    if "truncated file" in text:
        return StoreError(f"{path} is a truncated HDF5 file (interrupted copy or full disk?): {one_line(text)}")
    return StoreError(f"cannot open {path} as HDF5: {one_line(text)}")


def h5_open(path: str, mode: str, wait_s: float) -> h5py.File:
    """``h5py.File`` that waits while another process holds HDF5's own lock on the file."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode, **LOCKING)
        except BlockingIOError as exc:
            if time.monotonic() >= deadline:
                raise _translate_open_error(path, exc) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
        except OSError as exc:
            raise _translate_open_error(path, exc) from None


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # some filesystems cannot fsync a directory; a file must be synced
            raise
    finally:
        os.close(fd)


def partial_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def temporary_for(tmp: str, target: str) -> Iterator[None]:
    """Around the writing of ``tmp`` (which is to become ``target``): delete it if the block fails, and turn an
    OSError into a one-line :class:`StoreError` naming ``target``."""
    try:
        yield
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        msg = f"cannot write {target}: {one_line(exc)}"
        raise StoreError(msg) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def rewrite(path: str) -> Iterator[h5py.File]:
    """Yield a writable copy of ``path`` (a new file if missing) that replaces it atomically when the block ends.

    If the block raises or the process dies, ``path`` is left as it was.
    """
    partial = partial_name(path)
    with temporary_for(partial, path):
        if os.path.exists(path):
            shutil.copyfile(path, partial)
            shutil.copymode(path, partial)
            mode = "r+"
        else:
            mode = "w"
        with h5py.File(partial, mode, **LOCKING) as f:
            yield f
        fsync(partial)
        os.replace(partial, path)
        fsync(os.path.dirname(path) or ".")


# --------------------------------------------------------------------------------------------------------------
# The single-writer lock


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<path>.lock``, held for a writer's lifetime.

    The lock file holds the holder's host and pid for error messages and is removed on release. Because a releasing
    holder unlinks it, a newcomer checks after locking that the path still names the file it locked, else retries.
    """

    def __init__(self, target: str) -> None:
        self.path = target + LOCK_SUFFIX
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                msg = (
                    f"another process{holder} is writing {target} (it holds {self.path}); "
                    "wait for it to finish, or write to another file and merge"
                )
                raise StoreError(msg) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                warnings.warn(
                    f"cannot lock {self.path} ({exc.strerror}; the filesystem does not support flock): make sure no "
                    "other process writes this file at the same time",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so nobody can lock the file that is about to disappear.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        return ""
    return f" (pid {text[1]} on {text[0]})" if len(text) == 2 else ""


def refuse_if_being_written(path: str) -> None:
    """Raise if a writer currently holds ``<path>.lock`` (a shard that is still running)."""
    lock_path = path + LOCK_SUFFIX
    if fcntl is None or not os.path.exists(lock_path):
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        msg = f"{path} is still being written by another process{holder}; merge it when that run has finished"
        raise StoreError(msg) from None
    except OSError:
        pass
    finally:
        os.close(fd)
