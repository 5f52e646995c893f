"""How the analysed batches reach the device on every pass over the data.

A Hessian product is one pass over the whole analysed set, and an analysis makes hundreds of them, so where the data
live between passes decides how large a data set can be analysed:

- ``device``: the set is stacked once into tensors on the compute device (fastest; the set must fit there).
- ``host``: the stacked tensors stay in host memory (pinned where there is a GPU) and are copied to the device
  batch by batch, the next batch's copy running on a side stream while the current one computes.
- ``stream``: the data set is read afresh on every pass through a ``torch.utils.data.DataLoader`` with worker
  processes, in a fixed order, without augmentation: an image folder of any size is decoded on the fly and never
  held whole.

Every placement yields the same batches (the same examples in the same order, the same dtype), so results do not
depend on it: bit for bit on the CPU. :func:`choose_placement` picks one from the measured free memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

DATA_PLACEMENTS = ("auto", "device", "host", "stream")
# "auto" keeps the stacked data on the device while they take at most this share of its free memory (the rest is
# for activations, work arrays and bases), else in host memory under the same rule, else streams them.
AUTO_SHARE = 0.5
# An explicit device or host placement is refused when the stacked set exceeds this share of the free memory.
FIT_SHARE = 0.9


class PlacementError(ValueError):
    """A data placement cannot be used as asked (unknown name, bad worker count, data that cannot fit)."""


def check_placement(placement: str, workers: int = 0) -> None:
    """Raise :class:`PlacementError` unless ``placement`` is one of :data:`DATA_PLACEMENTS` and ``workers`` a
    non-negative integer."""
    if placement not in DATA_PLACEMENTS:
        msg = f"data placement must be one of {', '.join(DATA_PLACEMENTS)}; got {placement!r}"
        raise PlacementError(msg)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        msg = f"workers must be a non-negative integer; got {workers!r}"
        raise PlacementError(msg)


def batch_to(batch: Any, device: torch.device | str, dtype: torch.dtype | None, non_blocking: bool = False) -> Any:
    """``batch`` (a tensor, or tuples, lists and mappings of them) on ``device``, floating tensors in ``dtype``.

    Integer tensors (labels, token ids) keep their dtype; other values pass through unchanged.
    """
    if isinstance(batch, torch.Tensor):
        target = dtype if (dtype is not None and batch.is_floating_point()) else batch.dtype
        return batch.to(device=device, dtype=target, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: batch_to(v, device, dtype, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple):
        return tuple(batch_to(v, device, dtype, non_blocking) for v in batch)
    if isinstance(batch, list):
        return [batch_to(v, device, dtype, non_blocking) for v in batch]
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)


def batch_len(batch: Any) -> int:
    """Number of examples in ``batch``: the leading dimension of its first tensor."""
    first = next(_tensors(batch), None)
    if first is None or first.ndim == 0:
        msg = f"cannot tell the number of examples of a batch of type {type(batch).__name__}"
        raise PlacementError(msg)
    return int(first.shape[0])


def batch_nbytes(batch: Any) -> int:
    """Bytes held by the tensors of ``batch``."""
    return sum(t.numel() * t.element_size() for t in _tensors(batch))


class BatchSource:
    """The analysed batches in a fixed order; iterating gives one pass, each batch on ``device``.

    Attributes:
        device: where the batches are delivered.
        placement: "device", "host" or "stream".
    """

    device: torch.device
    placement: str

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def sizes(self) -> list[int]:
        """Examples in each batch, in order (known without a pass over the data)."""
        raise NotImplementedError

    def first(self) -> Any:
        """The first batch, on the device (one batch read, not a pass)."""
        return next(iter(self))

    def __getitem__(self, index: int | slice) -> Any:
        """Batch ``index`` on the device, or the batches of a slice (step 1) as a source of the same placement
        (a rank's share)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One phrase for the user, e.g. ``"stream (2 workers)"``."""
        return self.placement


def _whole_slice(index: Any, length: int) -> tuple[int, int]:
    if not isinstance(index, slice) or index.step not in (None, 1):
        msg = f"a batch source is sliced by a contiguous range of batches; got {index!r}"
        raise TypeError(msg)
    start, stop, _ = index.indices(length)
    return start, max(start, stop)


class DeviceBatches(BatchSource):
    """Batches held on the device for the whole analysis (today's default).

    Args:
        batches: the batches; moved to ``device`` (floating tensors to ``dtype``) once.
        device: the compute device.
        dtype: floating dtype of the inputs (None: unchanged).
    """

    placement = "device"

    def __init__(self, batches: Sequence[Any], device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.batches = [batch_to(b, self.device, dtype) for b in batches]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def sizes(self) -> list[int]:
        return [batch_len(b) for b in self.batches]

    def first(self) -> Any:
        return self.batches[0]

    def __getitem__(self, index: int | slice) -> Any:
        if not isinstance(index, slice):
            return self.batches[index]
        start, stop = _whole_slice(index, len(self))
        return DeviceBatches(self.batches[start:stop], self.device)


class HostBatches(BatchSource):
    """Batches held in host memory (pinned when the device is a GPU), copied to the device batch by batch.

    On a CUDA device the next batch's copy is issued on a side stream (``non_blocking`` from pinned memory) while
    the current batch computes; on the CPU host memory is the device's, and the batches are used in place.

    Args:
        batches: the batches (moved to the host, floating tensors to ``dtype``, once).
        device: the compute device.
        dtype: floating dtype of the inputs (None: unchanged).
        pin: pin the host copies (default: when ``device`` is CUDA).
    """

    placement = "host"

    def __init__(
        self,
        batches: Sequence[Any],
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        pin: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        pin = self.device.type == "cuda" if pin is None else pin
        host = [batch_to(b, "cpu", dtype) for b in batches]
        self.batches = [_pinned(b) for b in host] if pin else host

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            yield from (batch_to(b, self.device, None) for b in self.batches)
            return
        yield from _prefetched(iter(self.batches), self.device)

    def __len__(self) -> int:
        return len(self.batches)

    def sizes(self) -> list[int]:
        return [batch_len(b) for b in self.batches]

    def first(self) -> Any:
        return batch_to(self.batches[0], self.device, None)

    def __getitem__(self, index: int | slice) -> Any:
        if not isinstance(index, slice):
            return batch_to(self.batches[index], self.device, None)
        start, stop = _whole_slice(index, len(self))
        part = HostBatches([], self.device)
        part.batches = self.batches[start:stop]
        return part


def _pinned(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, Mapping):
        return type(batch)({k: _pinned(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pinned(v) for v in batch)
    return batch


def _prefetched(host_batches: Iterator[Any], device: torch.device, dtype: torch.dtype | None = None) -> Iterator[Any]:
    # Copy batch i + 1 on a side stream while batch i computes on the current stream.
    side = torch.cuda.Stream(device)

    def load(batch: Any) -> Any:
        with torch.cuda.stream(side):
            return batch_to(batch, device, dtype, non_blocking=True)

    upcoming = next(host_batches, None)
    pending = load(upcoming) if upcoming is not None else None
    while pending is not None:
        current = pending
        torch.cuda.current_stream(device).wait_stream(side)
        for t in _tensors(current):
            t.record_stream(torch.cuda.current_stream(device))
        upcoming = next(host_batches, None)
        pending = load(upcoming) if upcoming is not None else None
        yield current


def _collate_pairs(items: list[Any]) -> Any:
    # default_collate, keeping tensors as they are: the inputs of (input, label) pairs are stacked, the labels
    # become int64, exactly as ``materialize`` stacks the whole set.
    from torch.utils.data import default_collate

    batch = default_collate(items)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1].to(torch.int64)
    return batch


class StreamBatches(BatchSource):
    """The data set read afresh on every pass through a ``DataLoader``: fixed order, no shuffling, no augmentation.

    Batches are the consecutive slices of ``batch_size`` examples (the last holds the remainder), exactly those of
    the stacked placements. Workers stay alive between passes; where the device is a GPU the loader pins its
    batches and the next one is copied on a side stream while the current one computes.

    Args:
        dataset: a map-style dataset, in the order to keep.
        batch_size: examples per batch.
        device: the compute device.
        dtype: floating dtype of the inputs (None: unchanged).
        workers: loader worker processes (0: read in this process).
        collate_fn: builds a batch from items (default: stacked inputs, int64 labels for (input, label) pairs).

    Raises:
        PlacementError: a negative worker count, a non-positive batch size or an empty data set.
    """

    placement = "stream"

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        *,
        workers: int = 0,
        collate_fn: Any = None,
    ) -> None:
        check_placement("stream", workers)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be an integer >= 1, got {batch_size!r}"
            raise PlacementError(msg)
        if len(dataset) < 1:  # type: ignore[arg-type]
            msg = "cannot stream an empty dataset"
            raise PlacementError(msg)
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.workers = workers
        self.collate_fn = collate_fn or _collate_pairs
        self._loader: DataLoader | None = None

    def _make_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                shuffle=False,
                drop_last=False,
                num_workers=self.workers,
                collate_fn=self.collate_fn,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
            )
        return self._loader

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self._make_loader())
        if self.device.type == "cuda":
            yield from _prefetched(batches, self.device, self.dtype)
        else:
            yield from (batch_to(b, self.device, self.dtype) for b in batches)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)  # type: ignore[arg-type]

    def sizes(self) -> list[int]:
        total = len(self.dataset)  # type: ignore[arg-type]
        return [min(self.batch_size, total - start) for start in range(0, total, self.batch_size)]

    def first(self) -> Any:
        return self[0]

    def __getitem__(self, index: int | slice) -> Any:
        if not isinstance(index, slice):  # one batch, read in this process
            start = range(len(self))[index] * self.batch_size
            stop = min(start + self.batch_size, len(self.dataset))  # type: ignore[arg-type]
            items = [self.dataset[i] for i in range(start, stop)]
            return batch_to(self.collate_fn(items), self.device, self.dtype)
        start, stop = _whole_slice(index, len(self))
        total = len(self.dataset)  # type: ignore[arg-type]
        examples = range(start * self.batch_size, min(stop * self.batch_size, total))
        return StreamBatches(
            Subset(self.dataset, list(examples)),
            self.batch_size,
            self.device,
            self.dtype,
            workers=self.workers,
            collate_fn=self.collate_fn,
        )

    def describe(self) -> str:
        return f"stream ({self.workers} worker{'s' if self.workers != 1 else ''})"


def as_batch_source(batches: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> BatchSource:
    """``batches`` as a :class:`BatchSource`: a source is returned as it is, a sequence of batches is moved to the
    device once (:class:`DeviceBatches`)."""
    if isinstance(batches, BatchSource):
        return batches
    return DeviceBatches(list(batches), device, dtype)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA's free memory plus what PyTorch's allocator caches unused; on the
    CPU, ``MemAvailable`` (which counts reclaimable page cache). None where it cannot be measured."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        if hasattr(os, "sysconf"):
            try:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError):
                return None
    return None


@dataclass(frozen=True)
class PlacementChoice:
    """A data placement and why it was chosen.

    Attributes:
        placement: "device", "host" or "stream".
        data_bytes: estimated bytes of the stacked data set.
        reason: one phrase for the user.
    """

    placement: str
    data_bytes: int
    reason: str


def choose_placement(
    requested: str,
    data_bytes: int,
    device: torch.device,
    *,
    device_free: int | None = None,
    host_free: int | None = None,
) -> PlacementChoice:
    """Resolve a requested data placement ("auto" from the measured free memory; the others as they are).

    ``auto`` keeps the stacked set on the device while it takes at most :data:`AUTO_SHARE` of the device's free
    memory, else in host memory under the same rule (on a GPU machine), else streams it.

    Args:
        requested: "auto", "device", "host" or "stream".
        data_bytes: estimated bytes of the stacked set (inputs in the analysis dtype, labels).
        device: the compute device.
        device_free, host_free: free bytes (default: measured with :func:`available_bytes`).

    Returns:
        A :class:`PlacementChoice`.
    """
    check_placement(requested)
    size = f"{data_bytes / 2**30:.2f} GiB stacked"
    cpu = torch.device("cpu")
    if requested in ("device", "host"):
        # Refuse before stacking: a set that cannot fit would otherwise end in the allocator's own error (or the
        # kernel's OOM killer) after minutes of decoding.
        if requested == "device":
            where, free = device, device_free
        else:
            where, free = cpu, host_free if host_free is not None else (device_free if device.type == "cpu" else None)
        free = available_bytes(where) if free is None else free
        if free is not None and data_bytes > FIT_SHARE * free:
            host = ", --data-placement host" if requested == "device" and device.type != "cpu" else ""
            msg = (
                f"the analysed data set needs {data_bytes / 2**30:.2f} GiB stacked in {where} memory "
                f"(--data-placement {requested}) but only {free / 2**30:.2f} GiB are free; analyse a subset with "
                f"--samples N{host}, or --data-placement stream (batches read afresh on every pass)"
            )
            raise PlacementError(msg)
    if requested != "auto":
        return PlacementChoice(requested, data_bytes, f"as asked ({size})")
    device_free = available_bytes(device) if device_free is None else device_free
    if device_free is None or data_bytes <= AUTO_SHARE * device_free:
        free = "free memory unknown" if device_free is None else f"{device_free / 2**30:.1f} GiB free on {device}"
        return PlacementChoice("device", data_bytes, f"auto: {size}, {free}")
    if device.type != "cpu":
        host_free = available_bytes(cpu) if host_free is None else host_free
        if host_free is None or data_bytes <= AUTO_SHARE * host_free:
            return PlacementChoice(
                "host", data_bytes, f"auto: {size} > half of {device_free / 2**30:.1f} GiB free on {device}"
            )
    return PlacementChoice("stream", data_bytes, f"auto: {size} > half of the free memory")


def stacked_bytes(dataset: Dataset, dtype: torch.dtype) -> int:
    """Estimated bytes of ``dataset`` stacked: its length times the bytes of item 0 (floating tensors in
    ``dtype``), read without stacking anything."""
    size = len(dataset)  # type: ignore[arg-type]
    if size < 1:
        return 0
    item = dataset[0]
    per_item = 0
    for t in _tensors(item if isinstance(item, (tuple, list, Mapping)) else (item,)):
        itemsize = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else 8
        per_item += max(1, t.numel()) * itemsize
    for value in item if isinstance(item, (tuple, list)) else ():
        if not isinstance(value, torch.Tensor):
            per_item += 8  # a Python or NumPy label, stacked to int64
    return per_item * size


def place(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    placement: str = "auto",
    workers: int = 0,
) -> tuple[BatchSource, PlacementChoice]:
    """The batches of ``dataset`` in the requested placement ("auto" chosen by :func:`choose_placement`).

    Args:
        dataset: a map-style dataset of (input, label) pairs, in the order to keep.
        batch_size: examples per batch; the last batch holds the remainder.
        device: the compute device.
        dtype: floating dtype of the inputs.
        placement: "auto", "device", "host" or "stream".
        workers: loader worker processes for "stream".

    Returns:
        ``(source, choice)``: the batches, and the placement chosen with its reason.

    Raises:
        PlacementError: an unknown placement or a bad worker count.
        hessspec.data.datasets.DatasetError: items that cannot be stacked (see ``materialize``).
    """
    from hessspec.data.datasets import materialize

    check_placement(placement)
    device = torch.device(device)
    choice = choose_placement(placement, stacked_bytes(dataset, dtype), device)
    if choice.placement == "stream":
        return StreamBatches(dataset, batch_size, device, dtype, workers=workers), choice
    if choice.placement == "host":
        return HostBatches(materialize(dataset, batch_size, "cpu", dtype), device), choice
    return DeviceBatches(materialize(dataset, batch_size, device, dtype), device), choice
