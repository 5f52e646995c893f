"""Preparing a user's model and batches for functional Hessian products.

Batches of any structure pass through one adapter (:func:`move_batch`, :func:`model_arguments`,
:func:`batch_size`, :func:`slice_batch`):

- a tensor: the model's input (no target);
- a tuple or list: the first element is the model's input, the second (if any) the target; further elements are
  left to the loss (e.g. a loss factory). An input that is itself a mapping is passed as keyword arguments;
- a mapping (``dict``, ``collections.UserDict``, transformers' ``BatchEncoding``) of tensors: passed to the model as
  keyword arguments, except the target entries :data:`TARGET_KEYS` (``labels``, ...), which only the loss sees.
  Hugging Face models must never receive ``labels``: they would compute their own loss (in float32).

The user's module is never modified: hessspec works on a copy whose dropout is off and whose BatchNorm layers are
set up for the requested ``bn_mode``:

- ``train``: normalise with the statistics of each mini-batch, as during training. BN running statistics are
  removed from the copy (torch.func cannot trace the in-place running-statistics update).
- ``eval``: normalise with the running statistics stored in the checkpoint.
- ``population``: normalise with statistics recomputed over the whole analysed set, then held fixed (the
  population-BN experiment of Ghorbani et al. 2019, Sec. 3.2).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("train", "eval", "population")

Batch = Any  # a tensor, a tuple/list whose first element is the input, or a mapping of tensors (see above)
AllReduce = Callable[[torch.Tensor], torch.Tensor]
TARGET_KEYS = ("labels", "label", "target", "targets")  # mapping entries the loss reads and the model never gets


def _rebuild(batch: Any, values: Any) -> Any:
    # The same container type when it can be rebuilt from its items (dict, UserDict, BatchEncoding, tuple, list).
    if is_mapping(batch):
        try:
            return type(batch)(values)
        except Exception:  # a mapping type that cannot be built from a dict: a plain dict works as keyword args
            return dict(values)
    try:
        return type(batch)(values)
    except Exception:
        return tuple(values)


def is_mapping(batch: Any) -> bool:
    """Whether ``batch`` is a mapping of entries (``dict``, ``UserDict``, ``BatchEncoding``, ...)."""
    # BatchEncoding is a UserDict (a Mapping); accept any object with keys() and item access as well.
    return isinstance(batch, Mapping) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__"))


def move_batch(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """``batch`` with every tensor on ``device``; floating tensors in ``dtype``, integer ones (token ids, labels)
    kept integer. Nested tuples, lists and mappings keep their structure; other values pass unchanged."""
    if isinstance(batch, torch.Tensor):
        target = dtype if (dtype is not None and batch.is_floating_point()) else batch.dtype
        return batch.to(device=device, dtype=target)
    if is_mapping(batch):
        return _rebuild(batch, {key: move_batch(batch[key], device, dtype) for key in batch.keys()})
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [move_batch(item, device, dtype) for item in batch])
    return batch


def model_arguments(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the model is called with for ``batch`` (see the module docstring).

    Raises:
        TypeError: an empty tuple or list.
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            msg = "a batch is an empty tuple; expected (inputs, ...) with the model's input first"
            raise TypeError(msg)
        batch = batch[0]
    if is_mapping(batch):
        return (), {key: batch[key] for key in batch.keys() if key not in TARGET_KEYS}
    return (batch,), {}


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model`` applied to ``batch``'s inputs (see :func:`model_arguments`)."""
    args, kwargs = model_arguments(batch)
    return model(*args, **kwargs)


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = [batch[key] for key in batch.keys()] if is_mapping(batch) else batch
    if isinstance(items, (tuple, list)):
        for item in items:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Batch) -> int:
    """Number of examples in ``batch``: the leading dimension of its first tensor (inputs first).

    Raises:
        TypeError: the batch holds no tensor, or a zero-dimensional first tensor.
    """
    first = _first_tensor(batch)
    if first is None or first.ndim == 0:
        msg = f"cannot tell the number of examples of a batch of {describe_batch(batch)}"
        raise TypeError(msg)
    return int(first.shape[0])


def slice_batch(batch: Batch, stop: int) -> Batch:
    """The first ``stop`` examples of ``batch`` (every tensor with a leading dimension is sliced)."""
    if isinstance(batch, torch.Tensor):
        return batch[:stop] if batch.ndim > 0 else batch
    if is_mapping(batch):
        return _rebuild(batch, {key: slice_batch(batch[key], stop) for key in batch.keys()})
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [slice_batch(item, stop) for item in batch])
    return batch


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure for error messages, e.g. ``dict(input_ids=int64 [4, 9])``."""
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')} {list(batch.shape)}"
    if is_mapping(batch):
        inner = ", ".join(f"{key}={describe_batch(batch[key])}" for key in batch.keys())
        return f"{type(batch).__name__}({inner})"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe_batch(item) for item in batch)
        return f"({inner})" if isinstance(batch, tuple) else f"[{inner}]"
    return type(batch).__name__


def batch_norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The model's BatchNorm modules (any dimension, SyncBatchNorm included) with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        msg = f"bn_mode must be one of {', '.join(BN_MODES)}; got {bn_mode!r}"
        raise ValueError(msg)


def functional_copy(model: nn.Module, bn_mode: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode (dropout off) with BatchNorm prepared for ``bn_mode``.

    Args:
        model: the user's module (left untouched).
        bn_mode: "train", "eval" or "population" (population statistics are set by
            :func:`set_population_statistics`; until then the copy behaves as in "eval").
        dtype: floating dtype of the copy's parameters and buffers (default: unchanged).

    Returns:
        The prepared copy.
    """
    check_bn_mode(bn_mode)
    fmodel = copy.deepcopy(model)
    if dtype is not None:
        fmodel = fmodel.to(dtype)
    fmodel.eval()
    for _, bn in batch_norm_layers(fmodel):
        if bn_mode == "train":
            # With no running statistics, batch_norm normalises with batch statistics in any mode.
            bn.track_running_stats = False
            bn.running_mean = None
            bn.running_var = None
            bn.num_batches_tracked = None
        elif bn.running_mean is None:
            if bn_mode == "eval":
                msg = (
                    "bn_mode 'eval' needs BatchNorm running statistics, but the model's BatchNorm layers were "
                    "built with track_running_stats=False; use bn_mode 'train' or 'population'"
                )
                raise ValueError(msg)
            p = next(iter(bn.parameters()), None)
            kw = {"device": p.device if p is not None else None, "dtype": dtype or torch.float32}
            bn.track_running_stats = True
            bn.register_buffer("running_mean", torch.zeros(bn.num_features, **kw))
            bn.register_buffer("running_var", torch.ones(bn.num_features, **kw))
            bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=kw["device"]))
    return fmodel


ATTENTION_KERNEL = "math"  # recorded with results: the scaled_dot_product_attention kernel products run with


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """Run attention through differentiable kernels: ``scaled_dot_product_attention`` on its math kernel, and
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` without their fused inference fast path.

    The fused kernels (flash, memory-efficient, the fast path's ``_transformer_encoder_layer_fwd``) have no second
    derivative or no forward-mode rule; the math kernel computes the same function with plain differentiable ops.
    The previous fast-path setting is restored on exit.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass early."""


@torch.no_grad()
def set_population_statistics(
    fmodel: nn.Module, batches: Sequence[Batch] | Any, all_reduce: AllReduce | None = None
) -> None:
    """Set every BatchNorm layer's statistics to those of its input over all ``batches``.

    The layers are visited in forward order and each one's statistics are computed with all earlier layers
    already using theirs, so the result is the exact population normalisation of the fixed network (not an
    average of mini-batch statistics). The variance is the biased (population) variance, as BatchNorm uses in
    training. Costs one truncated forward pass over the data per BatchNorm layer.

    Args:
        fmodel: a copy from :func:`functional_copy` (modified in place; it must be in eval mode).
        batches: the analysed data: a sequence of batches on the model's device, or a
            :class:`~hessspec.data.placement.BatchSource`.
        all_reduce: sums a tensor across processes (data-parallel analysis), or None.
    """
    layers = [bn for _, bn in batch_norm_layers(fmodel)]
    if not layers:
        return
    order: list[_BatchNorm] = []
    hooks = [bn.register_forward_pre_hook(lambda m, _inp: order.append(m)) for bn in layers]
    try:
        call_model(fmodel, batches.first() if hasattr(batches, "first") else batches[0])
    finally:
        for h in hooks:
            h.remove()
    seen: set[int] = set()
    ordered = [m for m in order if not (id(m) in seen or seen.add(id(m)))]
    ordered += [bn for bn in layers if id(bn) not in seen]  # layers the first batch did not reach

    for bn in ordered:
        sums = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
        squares = torch.zeros_like(sums)
        count = torch.zeros((), dtype=torch.float64, device=sums.device)

        def capture(_m, inputs, sums=sums, squares=squares, count=count):
            x = inputs[0].to(torch.float64)
            dims = [d for d in range(x.ndim) if d != 1]
            sums.add_(x.sum(dim=dims))
            squares.add_((x * x).sum(dim=dims))
            count.add_(x.numel() / x.shape[1])
            raise _Stop

        handle = bn.register_forward_pre_hook(capture)
        try:
            for batch in batches:
                try:
                    call_model(fmodel, batch)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if all_reduce is not None:
            packed = all_reduce(torch.cat([sums, squares, count.reshape(1)]))
            sums, squares, count = packed[: bn.num_features], packed[bn.num_features : -1], packed[-1]
        mean = sums / count
        var = (squares / count - mean * mean).clamp_min(0)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
