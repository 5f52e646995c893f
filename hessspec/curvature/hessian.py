"""The Hessian of the mean loss over a whole data set, as a linear operator.

``H = sum_b (U_b / U) * H_b`` where ``H_b`` is the Hessian of batch ``b``'s mean loss over its ``U_b`` units
(examples, or target tokens for ``lm``; see :mod:`hessspec.curvature.losses`) and ``U`` the units of all batches, so
unequal batches (a smaller last batch, sequences with different numbers of target tokens) are weighted exactly.
Products are computed with forward-over-reverse differentiation (``jvp`` of ``grad``, torch.func), so one pass over
the data serves all columns of a block: by default traced once per batch shape and split into a primal part, kept
across passes, and a tangent part per column (:mod:`hessspec.curvature.traced`), else with ``vmap`` over the columns,
or by reverse-over-reverse (double backward) where that is faster or torch.func cannot transform the model or the
loss (:mod:`hessspec.curvature.batch_products`); results are accumulated in float64.
Attention runs on differentiable kernels (:func:`hessspec.curvature.problem.exact_attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from hessspec.curvature import batch_products
from hessspec.curvature.batch_products import BatchProducts, has_attention
from hessspec.curvature.compiled import CompiledFunctions
from hessspec.curvature.losses import Loss, MeanLoss, get_loss
from hessspec.curvature.primal_cache import PrimalCache, cache_budget
from hessspec.curvature.problem import (
    ATTENTION_KERNEL,
    Batch,
    batch_size,
    check_bn_mode,
    exact_attention,
    functional_copy,
    set_population_statistics,
)
from hessspec.curvature.traced import TracedProduct, TraceError
from hessspec.data.placement import BatchSource, as_batch_source, batch_to

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BLOCK_STRATEGIES = ("auto", "traced", "vmap", "loop", "reverse")
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


class HessianOperator(BatchProducts):
    """Hessian of the mean loss over all units (examples, or target tokens) of a fixed sequence of batches.

    ``H @ v`` costs one pass over the data; ``H @ V`` for a block ``V`` of shape [n, p] costs one pass for all p
    columns. Inputs and outputs are float64; the model is evaluated in ``dtype``.

    Args:
        model: the network (never modified; a prepared copy is used, see :mod:`hessspec.curvature.problem`).
        batches: sequence of batches of any structure: ``(inputs, targets)`` pairs, tuples whose first element is
            the input, or mappings of tensors passed to the model as keyword arguments (see
            :mod:`hessspec.curvature.problem`); moved to the model's device once (floating tensors in ``dtype``).
            Or a :class:`~hessspec.data.placement.BatchSource` that delivers them to the device on every pass (kept
            in host memory, or streamed from a data set).
        loss_fn: a torch functional ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch
            (``F.cross_entropy``, ``F.mse_loss``, ...), weighted by batch size; or None. Give ``loss_fn`` or ``loss``,
            not both.
        loss: a loss name ("cross-entropy", "mse", "nll", "lm") or a :class:`~hessspec.curvature.losses.Loss`;
            None (and no ``loss_fn``) for cross-entropy.
        bn_mode: "train" (mini-batch statistics, default), "eval" (running statistics) or "population".
        params: which parameters span the Hessian: None (all that require grad), a list of names, or a
            predicate ``(name, parameter) -> bool``; the others are held fixed.
        dtype: dtype the model and floating inputs are evaluated in (default: the model's parameter dtype).
        all_reduce: sums a tensor in place across processes (data-parallel analysis), or None. Each process holds
            a disjoint shard of the batches; sums are weighted by the global number of units.
        vmap_chunk_size: evaluate at most this many columns of a block at once (bounds memory); None for all.
        block_strategy: how a block's columns are evaluated: "traced" (forward-over-reverse traced once per batch
            shape and split into a primal graph, run once per batch, and a tangent graph, run per column; the primal
            results are kept across passes within ``primal_cache``; see :mod:`hessspec.curvature.traced`), "vmap"
            (one vectorised forward-over-reverse pass, the primal computed once for all columns), "loop" (one
            forward-over-reverse pass per column), "reverse" (plain autograd: the batch gradient's graph is built
            once, then one backward through it per column; works for any twice-differentiable model and loss), or
            "auto": "reverse" on the CPU for models with attention (a tiny GPT-2 measured 1.9-2.2x a gradient per
            column against 2.0-2.4x for "vmap"), "vmap" under ``compile``, "traced" otherwise (the CIFAR CNN of
            benchmarks/vs_peers.py, one thread, 10 columns: benchmarks/RESULTS.md). Before its first product "auto"
            checks its choice on the first batch against "reverse" (the gradient and a two-column product); a model
            that cannot be traced (Python branching on tensor values, ...) or whose trace disagrees gets "vmap",
            checked alike, and it
            switches to "reverse" when torch.func fails in any way (an ``autograd.Function`` without
            ``setup_context``, an op or a built-in loss without a forward-mode derivative, e.g. ``F.huber_loss``;
            with reduction "mean", ``F.mse_loss``'s forward-mode rule, ``mse_loss_double_backward``, divides
            ``2 * tangent`` in place by the number of elements, and the tangent of the target, which has none, is an
            immutable efficient zero: "ZeroTensors are immutable") or disagrees; the reasons are kept in
            :attr:`strategy_fallback`. The choice changes only rounding, and it is deterministic, so the same seed
            gives the same results.
        primal_cache: under "traced", keep each batch's primal results across passes within this budget: "auto" (a
            quarter of the memory available on the device when the first batch is kept), a number of bytes, or
            0/None/"off" (see :mod:`hessspec.curvature.primal_cache`). It changes no number.
        compile: evaluate the per-batch products and gradients through ``torch.compile`` (inductor; see
            :mod:`hessspec.curvature.compiled`), under any strategy. Results differ from eager ones by rounding only.
            Where compilation fails the operator runs eagerly, warns once and keeps the reason in
            :attr:`compile_fallback`. "auto" checks torch.func on the first batch eagerly.

    Raises:
        ValueError: bad ``bn_mode``, empty data, unknown or empty parameter selection, both ``loss`` and
            ``loss_fn``.
        hessspec.curvature.losses.LossError: an unknown loss name, or targets the loss cannot count (also raised by
            the first product or gradient when the model's output does not fit the loss).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch] | BatchSource,
        loss_fn: LossFn | None = None,
        *,
        loss: str | Loss | None = None,
        bn_mode: str = "train",
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vmap_chunk_size: int | None = None,
        block_strategy: str = "auto",
        compile: bool = False,
        primal_cache: int | str | None = "auto",
    ) -> None:
        check_bn_mode(bn_mode)
        check_block_strategy(block_strategy)
        if loss is not None and loss_fn is not None:
            msg = "give loss_fn (a torch functional returning the batch mean) or loss, not both"
            raise ValueError(msg)
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
        self.loss = MeanLoss(loss_fn) if loss_fn is not None else get_loss(loss)
        self._all_reduce = all_reduce
        self.vmap_chunk_size = vmap_chunk_size
        self.param_names = _select(model, params)
        if compile and block_strategy == "traced":
            msg = "compile applies to the 'vmap', 'loop' and 'reverse' strategies, not to 'traced'"
            raise ValueError(msg)
        subset = len(self.param_names) < sum(1 for _ in model.parameters())
        if subset and block_strategy == "traced":
            # On torch 2.14 the trace fails inside forward-mode AD (an internal assertion under fake tensors) when
            # parameters outside the Hessian are the model's inputs beside the traced ones.
            msg = "the 'traced' strategy needs every parameter of the model in the Hessian; use 'vmap' for a subset"
            raise ValueError(msg)
        self._auto = block_strategy == "auto"
        if block_strategy == "auto":
            if self.device.type == "cpu" and has_attention(model):
                block_strategy = "reverse"
            elif compile or subset or batch_products.TRACE_FAILED:
                # Not traced: compiled products (torch.compile works on torch.func's functions), a parameter subset
                # (see above), or a process where a trace failed before (later traces can fail alike).
                block_strategy = "vmap"
            else:
                block_strategy = "traced"
        self.block_strategy = block_strategy
        # "traced": one split graph per batch structure (or why it could not be traced), and the primal results
        # kept across passes (hessspec.curvature.traced, hessspec.curvature.primal_cache).
        self._traced: dict[tuple, TracedProduct | TraceError] = {}
        self._primal_cache = PrimalCache(cache_budget(primal_cache))
        # Tangents a column at a time on the CPU (as fast as vmap there, and one column's memory), vectorised with
        # vmap elsewhere (one kernel per operation for the whole block).
        self._vectorised_tangents = self.device.type != "cpu"
        self._batch_index = 0
        self.strategy_fallback: str | None = None
        self._compiled = CompiledFunctions(self.device, self.dtype) if compile else None
        self._strategy_settled = False
        self._loss_checked = False
        # The determinism check riding on the next product pass (expect_gradient): the gradient to compare with and
        # its tolerance; the batch gradient the current batch's product computed on the way; the weighted sum of
        # those over the last accumulated pass, and whether every batch contributed one.
        self._expected_gradient: tuple[torch.Tensor, float] | None = None
        self._batch_grad: torch.Tensor | None = None
        self._pass_gradient: tuple[torch.Tensor, bool] | None = None

        self._model = functional_copy(model, bn_mode, self.dtype)
        self.batches = as_batch_source(batches, self.device, self.dtype)
        counts, sizes = [], []
        for batch in self.batches:  # one pass before the first product (it reads a streamed data set once)
            counts.append(self.loss.count(batch))
            sizes.append(batch_size(batch))
        totals = torch.tensor([float(sum(counts)), float(sum(sizes))], dtype=torch.float64).to(self.device)
        if all_reduce is not None:
            totals = all_reduce(totals)
        self.num_units, self.num_examples = (int(round(float(t))) for t in totals)
        if self.num_examples == 0:
            msg = "no data: every batch is empty"
            raise ValueError(msg)
        if self.num_units == 0:
            msg = f"no data: the loss {self.loss.name!r} has no unit to average over (every target ignored?)"
            raise ValueError(msg)
        # Per batch: 1 / its units (the batch mean is differentiated) and its share of all units. Python floats, so
        # the per-batch loop has no device-to-host sync.
        self._scales = [1.0 / c if c else 0.0 for c in counts]
        self._weights = [c / self.num_units for c in counts]
        if bn_mode == "population":
            with exact_attention():
                set_population_statistics(self._model, self.batches, all_reduce)

        named = dict(self._model.named_parameters())
        selected = set(self.param_names)
        self._fixed = {k: v.detach() for k, v in named.items() if k not in selected}
        self._fixed.update({k: v for k, v in self._model.named_buffers()})
        self._shapes = [named[k].shape for k in self.param_names]
        self._numels = [named[k].numel() for k in self.param_names]
        self.theta = torch.cat([named[k].detach().reshape(-1) for k in self.param_names])
        self.shape = (self.theta.numel(), self.theta.numel())

    # -- the data loop: the only place that iterates over batches and weights them --------------------------------
    def _weighted_batches(self, need_data: bool = True) -> Iterator[tuple[Batch, float, float]]:
        """``(batch, 1 / its units, its share of all units)`` for every batch holding at least one unit; with
        ``need_data`` False the batches are not read (None in their place)."""
        if not need_data:
            for scale, weight in zip(self._scales, self._weights, strict=True):
                if weight > 0:
                    yield None, scale, weight
            return
        # Every batch on the device, wherever the data live (hessspec.data.placement); a batch already in the
        # operator's device and dtype passes unchanged.
        batches = (batch_to(batch, self.device, self.dtype) for batch in self.batches)
        for batch, scale, weight in zip(batches, self._scales, self._weights, strict=True):
            if weight > 0:
                yield batch, scale, weight

    def _accumulate(
        self, per_batch: Callable[[Batch, float], torch.Tensor], shape: Sequence[int], need_data: bool = True
    ) -> torch.Tensor:
        """``sum_b weight_b * per_batch(b, scale_b)`` in float64 over this process's batches (not yet reduced).

        ``_batch_index`` holds the batch's position in the pass while ``per_batch`` runs (the primal cache's key);
        with ``need_data`` False the data are not read and ``per_batch`` gets None for each batch.

        While a determinism check is pending (:meth:`expect_gradient`), the batch gradients that the products
        compute on the way (``_batch_grad``) are summed alike into ``_pass_gradient``.
        """
        out = torch.zeros(tuple(shape), dtype=torch.float64, device=self.device)
        checking = self._expected_gradient is not None
        gradient = torch.zeros(self.n, dtype=torch.float64, device=self.device) if checking else None
        complete = True
        for index, (batch, scale, weight) in enumerate(self._weighted_batches(need_data)):
            self._batch_index = index
            self._batch_grad = None
            out.add_(per_batch(batch, scale).to(torch.float64), alpha=weight)
            if gradient is not None:
                if self._batch_grad is None:
                    complete = False
                else:
                    gradient.add_(self._batch_grad.to(torch.float64), alpha=weight)
            self._batch_grad = None
        self._pass_gradient = (gradient, complete) if gradient is not None else None
        return out

    # -- public operator interface -------------------------------------------------------------------------
    @property
    def compile_fallback(self) -> str | None:
        """Why products asked to be compiled ran eagerly (compilation failed, see
        :mod:`hessspec.curvature.compiled`), or None."""
        return None if self._compiled is None else self._compiled.fallback

    @property
    def n(self) -> int:
        """Number of parameters spanned by the Hessian."""
        return self.shape[0]

    def recorded_settings(self) -> dict[str, Any]:
        """How the products are evaluated, as recorded with results: the loss, the resolved block strategy (and why
        "auto" fell back to "reverse", if it did), the attention kernel, whether products were compiled and why they
        ran eagerly instead, if they did (``compile_fallback``)."""
        recorded: dict[str, Any] = {
            "loss": self.loss.name,
            "block_strategy": self.block_strategy,
            "attention_kernel": ATTENTION_KERNEL,
            "compile": self._compiled is not None,
        }
        if self.strategy_fallback is not None:
            recorded["block_strategy_fallback"] = self.strategy_fallback
        if self.compile_fallback is not None:
            recorded["compile_fallback"] = self.compile_fallback
        return recorded

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # Column-major, so that each column (a backward's grad_outputs under "reverse") is contiguous, once per
        # product rather than once per batch; each column aligned alike, so that its product is the same bits
        # whichever columns are computed beside it.
        Vc = aligned_columns(V, self.dtype)

        def compute(strategy: str) -> torch.Tensor:
            # With every batch's primal kept (strategy "traced"), a pass evaluates tangents only: no data read.
            kept = strategy == "traced" and self._primal_cache.holds_all(sum(w > 0 for w in self._weights))
            return self._accumulate(
                lambda batch, scale: self._batch_hvp(Vc, batch, scale, strategy), V.shape, need_data=not kept
            )

        out = self._reduce(self._run(compute))
        self._finish_gradient_check()
        return out

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
        """Mean loss over all units and its gradient (float64 [n]).

        Raises:
            FloatingPointError: the loss or gradient is not finite.
            hessspec.curvature.losses.LossError: the model's output does not fit the loss.
        """

        def per_batch(strategy: str) -> Callable[[Batch, float], torch.Tensor]:
            def gradient_and_loss(batch: Batch, scale: float) -> torch.Tensor:
                g, loss = self._batch_gradient(batch, scale, strategy)
                return torch.cat([g.to(torch.float64), loss.detach().to(torch.float64).reshape(1)])

            return gradient_and_loss

        acc = self._reduce(self._run(lambda strategy: self._accumulate(per_batch(strategy), (self.n + 1,))))
        if not torch.isfinite(acc).all():
            msg = "the loss or its gradient is not finite (NaN/Inf) on the analysed data"
            raise FloatingPointError(msg)
        return LossAndGradient(float(acc[-1]), acc[:-1])

    def _default_rtol(self) -> float:
        return {torch.float64: 1e-10, torch.float32: 1e-4}.get(self.dtype, 1e-2)

    def check_determinism(self, gradient: torch.Tensor | None = None, rtol: float | None = None) -> None:
        """Compute the gradient again and compare with ``gradient`` (or a first pass).

        Raises:
            DeterminismError: the passes differ by more than ``rtol`` (default: 1e-10 in float64, 1e-4 in float32,
                1e-2 in bfloat16;
                loose enough for nondeterministic GPU reductions, far below what augmentation or dropout cause).
        """
        rtol = self._default_rtol() if rtol is None else rtol
        first = self.loss_and_gradient().gradient if gradient is None else gradient
        self._compare_gradients(first, self.loss_and_gradient().gradient, rtol)

    def expect_gradient(self, gradient: torch.Tensor, rtol: float | None = None) -> None:
        """Check determinism on the next product pass instead of a pass of its own.

        Every Hessian product computes each batch's gradient on the way (the primal of forward-over-reverse, the
        first backward of reverse-over-reverse); the next :meth:`matmat` (or ``products``) sums them with the
        exact batch weights and compares the sum with ``gradient``, as :meth:`check_determinism` would, and
        raises :class:`DeterminismError` after that pass. A pass that computes no Hessian column on some batch
        (e.g. Gauss-Newton columns alone) falls back to :meth:`check_determinism`'s own gradient pass.
        """
        rtol = self._default_rtol() if rtol is None else rtol
        self._expected_gradient = (gradient.to(device=self.device, dtype=torch.float64), rtol)

    def _finish_gradient_check(self) -> None:
        if self._expected_gradient is None:
            return
        expected, rtol = self._expected_gradient
        self._expected_gradient = None
        passed, self._pass_gradient = self._pass_gradient, None
        if passed is None or not passed[1]:  # the same on every process: the same code ran on each
            self.check_determinism(expected, rtol)
            return
        self._compare_gradients(expected, self._reduce(passed[0]), rtol)

    def _compare_gradients(self, first: torch.Tensor, second: torch.Tensor, rtol: float) -> None:
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
