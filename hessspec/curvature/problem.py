"""Preparing a user's model for functional Hessian products.

The user's module is never modified: hessspec works on a copy whose dropout is off and whose BatchNorm layers are
set up for the requested ``bn_mode``:

- ``train``: normalise with the statistics of each mini-batch, as during training. BN running statistics are
  removed from the copy (torch.func cannot trace the in-place running-statistics update).
- ``eval``: normalise with the running statistics stored in the checkpoint.
- ``population``: normalise with statistics recomputed over the whole analysed set, then held fixed (the
  population-BN experiment of Ghorbani et al. 2019, Sec. 3.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("train", "eval", "population")

Batch = tuple[torch.Tensor, torch.Tensor]
AllReduce = Callable[[torch.Tensor], torch.Tensor]


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


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass early."""


@torch.no_grad()
def set_population_statistics(fmodel: nn.Module, batches: Sequence[Batch], all_reduce: AllReduce | None = None) -> None:
    """Set every BatchNorm layer's statistics to those of its input over all ``batches``.

    The layers are visited in forward order and each one's statistics are computed with all earlier layers
    already using theirs, so the result is the exact population normalisation of the fixed network (not an
    average of mini-batch statistics). The variance is the biased (population) variance, as BatchNorm uses in
    training. Costs one truncated forward pass over the data per BatchNorm layer.

    Args:
        fmodel: a copy from :func:`functional_copy` (modified in place; it must be in eval mode).
        batches: the analysed data.
        all_reduce: sums a tensor across processes (data-parallel analysis), or None.
    """
    layers = [bn for _, bn in batch_norm_layers(fmodel)]
    if not layers:
        return
    order: list[_BatchNorm] = []
    hooks = [bn.register_forward_pre_hook(lambda m, _inp: order.append(m)) for bn in layers]
    try:
        fmodel(batches[0][0])
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
            for x, _ in batches:
                try:
                    fmodel(x)
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
