"""The primal results of traced products, kept across passes within a memory budget.

Under the "traced" strategy (:mod:`hessspec.curvature.traced`) a batch's product splits into a primal part (forward
pass, gradient, the intermediates the tangents read) and a tangent part per column. The parameters and the data of
an operator never change, so the primal part of every pass is the same: :class:`PrimalCache` keeps it, batch by
batch in pass order, as long as the kept tensors fit in the budget. A batch that does not fit is recomputed on every
pass as before, so the budget trades memory for speed and never changes a result: a kept primal is the same bits a
recomputed one would be.

The budget: ``"auto"`` (a quarter of the memory available on the compute device when the first batch is kept: the
host's ``MemAvailable``, or the GPU's free memory), a number of bytes, or ``0``/``None``/``"off"`` for no cache.
"""

from __future__ import annotations

from typing import Any

import torch

from hessspec.data.placement import available_bytes

AUTO_FRACTION = 0.25


def cache_budget(spec: int | str | None) -> int | str:
    """Check ``spec`` ("auto", bytes, or 0/None/"off") and return it as bytes or "auto" (resolved when used).

    Raises:
        ValueError: a negative size or an unknown word.
    """
    if spec is None or spec == "off":
        return 0
    if spec == "auto":
        return "auto"
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
        msg = f"primal_cache must be 'auto', 'off' or a number of bytes >= 0; got {spec!r}"
        raise ValueError(msg)
    return spec


def tensor_bytes(tensors: Any, exclude: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a pytree), leaving out the storages in ``exclude``
    (``data_ptr`` of storages that are resident anyway: the parameters, the fixed buffers)."""
    from torch.utils._pytree import tree_leaves

    seen = set(exclude)
    total = 0
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


class PrimalCache:
    """Per batch (its position in the pass): the traced product, the batch gradient and the saved tensors."""

    def __init__(self, budget: int | str) -> None:
        self._budget = budget
        self._entries: dict[int, tuple[Any, torch.Tensor, tuple]] = {}
        self.bytes = 0
        self.full = False  # a batch did not fit: the later ones are not tried (each would be measured in vain)

    @property
    def enabled(self) -> bool:
        return self._budget != 0

    def get(self, index: int) -> tuple[Any, torch.Tensor, tuple] | None:
        return self._entries.get(index)

    def holds_all(self, count: int) -> bool:
        """Whether every one of ``count`` batches is kept (a pass then needs no data)."""
        return count > 0 and len(self._entries) == count

    def offer(self, index: int, entry: tuple[Any, torch.Tensor, tuple], nbytes: int, device: torch.device) -> bool:
        """Keep ``entry`` for batch ``index`` if it fits in the budget; return whether it was kept."""
        if not self.enabled or self.full or index in self._entries:
            return index in self._entries
        if self._budget == "auto":
            available = available_bytes(device)
            self._budget = int(AUTO_FRACTION * available) if available is not None else 0
        if self.bytes + nbytes > self._budget:
            self.full = True
            return False
        self._entries[index] = entry
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self.full = False
