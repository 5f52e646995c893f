"""The Hessian of the mean loss over a whole data set, as a linear operator.

``H = sum_b (|b| / N) * H_b`` where ``H_b`` is the Hessian of batch ``b``'s mean loss and ``N`` the number of
examples, so unequal batches (a smaller last batch) are weighted exactly. Products are computed with
forward-over-reverse differentiation (``jvp`` of ``grad``, torch.func) and ``vmap`` over the columns of a block,
so one pass over the data serves all columns, or by reverse-over-reverse (double backward) where that is faster or
torch.func cannot transform the model; results are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from hessspec.curvature.problem import Batch, check_bn_mode, functional_copy, set_population_statistics

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BLOCK_STRATEGIES = ("auto", "vmap", "loop", "reverse")
ParamSelector = Sequence[str] | Callable[[str, nn.Parameter], bool] | None


class DeterminismError(RuntimeError):
    """Two passes over the same data gave different results (augmentation or randomness in model or data)."""


class LossAndGradient(NamedTuple):
    """Full-data loss (float) and gradient (float64 [n])."""

    loss: float
    gradient: torch.Tensor


def _select(model: nn.Module, params: ParamSelector) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [k for k, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [k for k, p in named.items() if params(k, p)]
    else:
        names = list(params)
        unknown = [k for k in names if k not in named]
        if unknown:
            msg = f"unknown parameter names {unknown[:5]}; the model has e.g. {list(named)[:5]}"
            raise ValueError(msg)
    if not names:
        msg = "no parameters selected for the Hessian"
        raise ValueError(msg)
    return names


def check_block_strategy(block_strategy: str) -> None:
    """Raise ValueError unless ``block_strategy`` is one of :data:`BLOCK_STRATEGIES`."""
    if block_strategy not in BLOCK_STRATEGIES:
        msg = f"block_strategy must be one of {', '.join(BLOCK_STRATEGIES)}; got {block_strategy!r}"
        raise ValueError(msg)


def _torch_func_unsupported(error: BaseException) -> bool:
    text = str(error)
    return any(
        marker in text
        for marker in ("functorch transforms", "forward AD", "forward-mode AD", "does not have a jvp", "Batching rule")
    )


def aligned_columns(V: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``V`` ([n, p]) in ``dtype``, column-major, every column starting on a 64-byte boundary.

    Vectorised kernels round differently at different alignments; with every column aligned alike, a column's
    product does not depend on its position in the block (nor on the block's width, under "reverse" and "loop").
    """
    n, p = V.shape
    per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    stride = -(-n // per_line) * per_line
    buffer = torch.empty((p, stride), dtype=dtype, device=V.device)
    buffer[:, :n] = V.T
    return buffer[:, :n].T


class HessianOperator:
    """Hessian of the mean loss over all examples of a fixed sequence of batches.

    ``H @ v`` costs one pass over the data; ``H @ V`` for a block ``V`` of shape [n, p] costs one pass for all p
    columns. Inputs and outputs are float64; the model is evaluated in ``dtype``.

    Args:
        model: the network (never modified; a prepared copy is used, see :mod:`hessspec.curvature.problem`).
        batches: sequence of ``(inputs, targets)``; moved to the model's device once.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch (default cross-entropy).
        bn_mode: "train" (mini-batch statistics, default), "eval" (running statistics) or "population".
        params: which parameters span the Hessian: None (all that require grad), a list of names, or a
            predicate ``(name, parameter) -> bool``; the others are held fixed.
        dtype: dtype the model and inputs are evaluated in (default: the model's parameter dtype).
        all_reduce: sums a tensor in place across processes (data-parallel analysis), or None. Each process holds
            a disjoint shard of the batches; sums are weighted by the global number of examples.
        vmap_chunk_size: evaluate at most this many columns of a block at once (bounds memory); None for all.
        block_strategy: how a block's columns are evaluated: "vmap" (one vectorised forward-over-reverse pass, the
            primal computed once for all columns), "loop" (one forward-over-reverse pass per column), "reverse"
            (plain autograd: the batch gradient's graph is built once, then one backward through it per column;
            works for any twice-differentiable model), or "auto": "reverse" on the CPU for models with
            convolutions, where vmap turns the batched weight tangents into grouped convolutions, holds p copies of
            every activation and measured 2.0-4.5x a gradient per column with BatchNorm across runs, against
            2.2-3.0x for "reverse" (benchmarks/RESULTS.md), "vmap" otherwise;
            "auto" also switches to "reverse" when torch.func cannot transform the model (an
            ``autograd.Function`` without ``setup_context``, an op without a forward-mode derivative). The
            choice changes only rounding, and it is deterministic, so the same seed gives the same results.

    Raises:
        ValueError: bad ``bn_mode``, empty data, unknown or empty parameter selection.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        loss_fn: LossFn = F.cross_entropy,
        *,
        bn_mode: str = "train",
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vmap_chunk_size: int | None = None,
        block_strategy: str = "auto",
    ) -> None:
        check_bn_mode(bn_mode)
        check_block_strategy(block_strategy)
        if len(batches) == 0:
            msg = "no data: the sequence of batches is empty"
            raise ValueError(msg)
        first = next(iter(model.parameters()), None)
        if first is None:
            msg = "the model has no parameters"
            raise ValueError(msg)
        self.device = first.device
        self.dtype = dtype or first.dtype
        self.bn_mode = bn_mode
        self.loss_fn = loss_fn
        self._all_reduce = all_reduce
        self.vmap_chunk_size = vmap_chunk_size
        self.param_names = _select(model, params)
        self._auto = block_strategy == "auto"
        if block_strategy == "auto":
            has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
            block_strategy = "reverse" if (self.device.type == "cpu" and has_conv) else "vmap"
        self.block_strategy = block_strategy

        self._model = functional_copy(model, bn_mode, self.dtype)
        self.batches = [
            (x.to(self.device, self.dtype if x.is_floating_point() else x.dtype), y.to(self.device)) for x, y in batches
        ]
        sizes = torch.tensor([float(len(x)) for x, _ in self.batches], dtype=torch.float64)
        total = sizes.sum().to(self.device)
        if all_reduce is not None:
            total = all_reduce(total)
        self.num_examples = int(round(float(total)))
        if self.num_examples == 0:
            msg = "no data: every batch is empty"
            raise ValueError(msg)
        # Weights are Python floats: no device-to-host sync inside the per-batch loop.
        self._weights = (sizes / float(total)).tolist()
        if bn_mode == "population":
            set_population_statistics(self._model, self.batches, all_reduce)

        named = dict(self._model.named_parameters())
        selected = set(self.param_names)
        self._fixed = {k: v.detach() for k, v in named.items() if k not in selected}
        self._fixed.update({k: v for k, v in self._model.named_buffers()})
        self._shapes = [named[k].shape for k in self.param_names]
        self._numels = [named[k].numel() for k in self.param_names]
        self.theta = torch.cat([named[k].detach().reshape(-1) for k in self.param_names])
        self.shape = (self.theta.numel(), self.theta.numel())

    # -- functional pieces -------------------------------------------------------------------------------
    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self._numels)
        return {k: t.view(s) for k, t, s in zip(self.param_names, parts, self._shapes, strict=True)}

    def _batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self._model, {**self._fixed, **self._unflatten(theta)}, (x,))
        return self.loss_fn(out, y)

    def _batch_gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block_strategy != "reverse":
            return grad_and_value(self._batch_loss)(self.theta, x, y)
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._batch_loss(theta, x, y)
            (g,) = torch.autograd.grad(loss, theta)
        return g, loss.detach()

    def _batch_hvp_reverse(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Reverse-over-reverse: the batch gradient's graph is built once, then each column costs one backward
        # through it (retained until the last column).
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._batch_loss(theta, x, y), theta, create_graph=True)
        if not g.requires_grad:  # the loss is at most linear in the parameters: the Hessian is zero
            return torch.zeros_like(V)
        last = V.shape[1] - 1
        cols = [torch.autograd.grad(g, theta, V[:, i], retain_graph=i < last)[0] for i in range(last + 1)]
        return torch.stack(cols, dim=1)

    def _batch_hvp(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.block_strategy == "reverse":
            return self._batch_hvp_reverse(V, x, y)

        def gradient(theta: torch.Tensor) -> torch.Tensor:
            return grad(self._batch_loss)(theta, x, y)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return jvp(gradient, (self.theta,), (v,))[1]

        if V.shape[1] == 1:
            return hvp(V[:, 0]).unsqueeze(1)
        if self.block_strategy == "loop":
            return torch.stack([hvp(V[:, i]) for i in range(V.shape[1])], dim=1)
        return vmap(hvp, in_dims=1, out_dims=1, chunk_size=self.vmap_chunk_size)(V)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t) if self._all_reduce is not None else t

    # -- public operator interface -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of parameters spanned by the Hessian."""
        return self.shape[0]

    def _with_fallback(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        # "auto" falls back to plain autograd for models that torch.func cannot transform (an autograd.Function
        # without setup_context/jvp, an op without a forward-mode derivative). Every process of a data-parallel
        # run meets the same model on its first batch, so all switch alike.
        try:
            return compute()
        except (RuntimeError, NotImplementedError) as error:
            if not (self._auto and self.block_strategy != "reverse" and _torch_func_unsupported(error)):
                raise
        self.block_strategy = "reverse"
        return compute()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # Column-major, so that each column (a backward's grad_outputs under "reverse") is contiguous, once per
        # product rather than once per batch; each column aligned alike, so that its product is the same bits
        # whichever columns are computed beside it.
        Vc = aligned_columns(V, self.dtype)

        def compute() -> torch.Tensor:
            out = torch.zeros(V.shape, dtype=torch.float64, device=self.device)
            for (x, y), w in zip(self.batches, self._weights, strict=True):
                out.add_(self._batch_hvp(Vc, x, y).to(torch.float64), alpha=w)
            return out

        return self._reduce(self._with_fallback(compute))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for a block ``V`` of shape [n, p]; float64 [n, p] on the operator's device."""
        if V.ndim != 2 or V.shape[0] != self.n:
            msg = f"expected a block of shape [{self.n}, p]; got {tuple(V.shape)}"
            raise ValueError(msg)
        if not V.is_floating_point():
            msg = f"expected a floating-point block; got dtype {V.dtype}"
            raise TypeError(msg)
        return self._matmat(V.to(self.device))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for ``v`` of shape [n] (or a block [n, p]); float64 of the same shape."""
        if v.ndim == 1:
            if v.shape[0] != self.n:
                msg = f"expected a vector of shape [{self.n}]; got {tuple(v.shape)}"
                raise ValueError(msg)
            return self.matmat(v.unsqueeze(1)).squeeze(1)
        return self.matmat(v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def loss_and_gradient(self) -> LossAndGradient:
        """Mean loss over all examples and its gradient (float64 [n]).

        Raises:
            FloatingPointError: the loss or gradient is not finite.
        """

        def compute() -> torch.Tensor:
            acc = torch.zeros(self.n + 1, dtype=torch.float64, device=self.device)
            for (x, y), w in zip(self.batches, self._weights, strict=True):
                g, loss = self._batch_gradient(x, y)
                acc[:-1].add_(g.to(torch.float64), alpha=w)
                acc[-1:].add_(loss.detach().to(torch.float64).reshape(1), alpha=w)
            return acc

        acc = self._reduce(self._with_fallback(compute))
        if not torch.isfinite(acc).all():
            msg = "the loss or its gradient is not finite (NaN/Inf) on the analysed data"
            raise FloatingPointError(msg)
        return LossAndGradient(float(acc[-1]), acc[:-1])

    def check_determinism(self, gradient: torch.Tensor | None = None, rtol: float | None = None) -> None:
        """Compute the gradient again and compare with ``gradient`` (or a first pass).

        Raises:
            DeterminismError: the passes differ by more than ``rtol`` (default: 1e-4 in float32, 1e-10 in float64;
                loose enough for nondeterministic GPU reductions, far below what augmentation or dropout cause).
        """
        if rtol is None:
            rtol = 1e-10 if self.dtype == torch.float64 else 1e-4
        first = self.loss_and_gradient().gradient if gradient is None else gradient
        second = self.loss_and_gradient().gradient
        scale = torch.linalg.vector_norm(first)
        diff = torch.linalg.vector_norm(first - second)
        if float(diff) > rtol * float(scale):
            msg = (
                f"two passes over the same data gave different gradients (relative difference "
                f"{float(diff / scale):.2e} > {rtol:.0e}): the model or the data is random (augmentation, dropout, "
                "random sampling); hessspec needs a fixed, deterministic loss"
            )
            raise DeterminismError(msg)

    def to_dense(self) -> torch.Tensor:
        """The whole Hessian as a float64 [n, n] matrix (n products; for tests and tiny models)."""
        eye = torch.eye(self.n, dtype=torch.float64, device=self.device)
        return torch.cat([self.matmat(eye[:, i : i + 64]) for i in range(0, self.n, 64)], dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, on the CPU), e.g. for ``eigsh`` as a reference."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.as_tensor(x, dtype=torch.float64, device=self.device)
            t = t.reshape(self.n, -1)
            return self.matmat(t).cpu().numpy().reshape(x.shape)

        return LinearOperator(self.shape, matvec=mv, matmat=mv, dtype="float64")
