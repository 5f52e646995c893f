"""Where the Lanczos bases live: on the compute device, in host memory, or in a memory-mapped scratch file.

A chain's basis is ``m`` vectors of ``n`` parameters: 8·n·m bytes per chain in float64, ~185 GB for ResNet-50 at
m = 90 and 10 probes, more than any device holds. The recurrence needs only a few vectors per chain on the device;
the basis is read back in fixed chunks of rows for the reorthogonalisation (:func:`hessspec.linalg.lanczos.
orthogonalize`), so it can live anywhere:

- ``device``: a tensor on the compute device (fastest).
- ``host``: a tensor in host memory.
- ``disk``: a tensor memory-mapped from a scratch file (``torch.from_file``, shared), in ``scratch_dir``. The file
  is removed when the storage is closed, after success or failure; it is locked while in use, so a file left by a
  killed run (unlocked) is removed by the next run in that directory (:func:`remove_stale_scratch`).

The arithmetic is the same in every placement, so the results are the same bits on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BASIS_PLACEMENTS = ("auto", "device", "host", "disk")
SCRATCH_PREFIX = ".hessspec-basis-"
SCRATCH_SUFFIX = ".scratch"
# "auto" keeps the bases on the device while they take at most this share of its free memory (the rest is for
# the data, activations and work arrays), else in host memory under the same rule, else on disk.
AUTO_SHARE = 0.5

try:  # POSIX advisory locks; elsewhere stale files are only recognised by their owner's process id
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class BasisPlacementError(ValueError):
    """A basis placement cannot be used as asked (unknown name, scratch directory missing or not writable)."""


def check_basis_placement(placement: str) -> None:
    """Raise :class:`BasisPlacementError` unless ``placement`` is one of :data:`BASIS_PLACEMENTS`."""
    if placement not in BASIS_PLACEMENTS:
        msg = f"basis placement must be one of {', '.join(BASIS_PLACEMENTS)}; got {placement!r}"
        raise BasisPlacementError(msg)


def _locked(handle) -> bool:
    # True when another process holds the lock (the file is in use).
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def remove_stale_scratch(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the basis scratch files in ``directory`` that no running process holds (left by a killed run).

    Returns:
        The files removed.
    """
    removed = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"{SCRATCH_PREFIX}*{SCRATCH_SUFFIX}"):
        try:
            with open(path, "rb") as handle:
                if _locked(handle):
                    continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


class BasisStorage:
    """Storage for Lanczos bases in one placement; allocations live until :meth:`close` (or the ``with`` block).

    Args:
        placement: "device", "host" or "disk".
        device: the compute device.
        scratch_dir: directory of the scratch files ("disk"); default the system's temporary directory.

    Raises:
        BasisPlacementError: an unknown placement, or a scratch directory that is missing or not writable.
    """

    def __init__(
        self, placement: str, device: torch.device | str, scratch_dir: str | os.PathLike[str] | None = None
    ) -> None:
        check_basis_placement(placement)
        if placement == "auto":
            msg = "resolve 'auto' first (resolve_basis_placement)"
            raise BasisPlacementError(msg)
        self.placement = placement
        self.device = torch.device(device)
        self.scratch_dir = Path(scratch_dir if scratch_dir is not None else tempfile.gettempdir()).expanduser()
        self.files: list[Path] = []
        self._handles: list = []
        if placement == "disk":
            if not self.scratch_dir.is_dir() or not os.access(self.scratch_dir, os.W_OK):
                msg = f"scratch directory {str(self.scratch_dir)!r} does not exist or is not writable (--scratch)"
                raise BasisPlacementError(msg)
            remove_stale_scratch(self.scratch_dir)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` in this placement.

        Raises:
            OSError: the scratch file cannot be created or sized (e.g. the disk is full).
        """
        if self.placement == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.placement == "host":
            return torch.empty(shape, dtype=dtype, device="cpu")
        numel = 1
        for size in shape:
            numel *= int(size)
        itemsize = torch.empty((), dtype=dtype).element_size()
        path = self.scratch_dir / f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{SCRATCH_SUFFIX}"
        handle = open(path, "wb+")  # noqa: SIM115 - held open (and locked) until close()
        self.files.append(path)
        self._handles.append(handle)
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.truncate(max(1, numel * itemsize))
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def close(self) -> None:
        """Remove the scratch files (the tensors mapped from them stay readable until freed)."""
        for path in self.files:
            with contextlib.suppress(OSError):
                path.unlink()
        for handle in self._handles:
            with contextlib.suppress(OSError):
                handle.close()
        self.files, self._handles = [], []

    def __enter__(self) -> BasisStorage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class BasisChoice:
    """A basis placement and why it was chosen.

    Attributes:
        placement: "device", "host" or "disk".
        reason: one phrase for the user.
    """

    placement: str
    reason: str


def disk_free(directory: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system of ``directory`` (None when it cannot be measured)."""
    try:
        return int(shutil.disk_usage(directory).free)
    except OSError:
        return None


def resolve_basis_placement(
    requested: str,
    need: int,
    device: torch.device,
    *,
    device_free: int | None,
    host_free: int | None,
    disk_free_bytes: int | None,
) -> BasisChoice:
    """Resolve a requested basis placement; "auto" picks the fastest place that holds ``need`` bytes.

    ``auto`` keeps the bases on the device while they take at most :data:`AUTO_SHARE` of its free memory, else (on
    a GPU machine) in host memory under the same rule, else on disk while they fit in 90% of its free space.

    Raises:
        MemoryError: nothing can hold them (with advice), or an explicit placement that cannot.
    """
    check_basis_placement(requested)
    gib = need / 2**30

    def fits(free: int | None, share: float) -> bool:
        return free is None or need <= share * free

    if requested == "auto":
        if fits(device_free, AUTO_SHARE):
            return BasisChoice("device", f"auto: {gib:.2f} GiB on {device}")
        if device.type != "cpu" and fits(host_free, AUTO_SHARE):
            return BasisChoice("host", f"auto: {gib:.2f} GiB in host memory, too much for {device}")
        if fits(disk_free_bytes, 0.9):
            return BasisChoice("disk", f"auto: {gib:.2f} GiB in a scratch file, too much for memory")
        free = "unknown" if disk_free_bytes is None else f"{disk_free_bytes / 2**30:.1f} GiB"
        msg = (
            f"the Lanczos bases need {gib:.2f} GiB, more than the device, the host memory and the scratch disk "
            f"({free} free) can hold; use --basis-dtype float32, fewer --probes or --lanczos-steps, --params for a "
            "subset of the parameters, or --scratch DIR on a larger disk"
        )
        raise MemoryError(msg)
    free, share, where = {
        "device": (device_free, 0.9, str(device)),
        "host": (host_free, 0.9, "host memory"),
        "disk": (disk_free_bytes, 0.9, "the scratch disk"),
    }[requested]
    if not fits(free, share):
        msg = (
            f"the Lanczos bases need {gib:.2f} GiB but {where} has {free / 2**30:.2f} GiB free; use "
            "--basis-placement auto (or host/disk), --basis-dtype float32, or fewer probes/steps"
        )
        raise MemoryError(msg)
    return BasisChoice(requested, f"as asked ({gib:.2f} GiB)")
