"""The per-batch functions behind :class:`~hessspec.curvature.hessian.HessianOperator` and the choice of its block
strategy.

Each strategy computes, for one batch, ``(g_b, H_b V)``: the batch gradient comes with every product (the jvp's
primal, reverse's first backward, the traced primal graph), which is what lets the determinism check ride on a
product pass. "auto" settles the strategy on the first batch before the first product (``_settle_strategy``): it
checks its choice against plain autograd, then falls back from "traced" to "vmap" and from torch.func to "reverse",
keeping each reason; a failure later in a run falls back to "reverse" (``_run``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from hessspec.curvature.compiled import CompiledFunctions
from hessspec.curvature.compiled import first_line as _first_line
from hessspec.curvature.primal_cache import tensor_bytes
from hessspec.curvature.problem import Batch, exact_attention, model_arguments
from hessspec.curvature.traced import TracedProduct, TraceError, batch_signature, trace_product

TRACE_FAILED = False  # set by the first failed trace of the process (see HessianOperator's "auto")


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an attention layer (``nn.MultiheadAttention``, or a module named ``*Attention*``, as
    Hugging Face and timm name theirs)."""
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())


def _traceable(batch: Batch) -> Batch:
    # A mapping torch's pytree does not open (a UserDict such as transformers' BatchEncoding) as a plain dict, whose
    # tensors the traced graphs take as inputs; the model gets the same keyword arguments from either.
    if isinstance(batch, Mapping) and type(batch) is not dict:
        return dict(batch)
    return batch


@functools.cache
def _load_jvp_decompositions() -> None:
    """Load torch's forward-mode decompositions once, with exactly the warning they raise silenced.

    ``torch.autograd.forward_ad`` loads them on its first use through the deprecated ``torch.jit.script``, whose
    FutureWarning (torch's internals, nothing a user can change) would otherwise reach users of the Python API.
    """
    from torch.autograd import forward_ad

    load = getattr(forward_ad, "_maybe_load_decompositions", None)
    if load is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        load()


class BatchProducts:
    """The per-batch functions of :class:`~hessspec.curvature.hessian.HessianOperator` and the choice of its block
    strategy; a mixin: the operator's ``__init__`` sets every attribute used here (``_model``, ``_fixed``, ``theta``,
    ``loss``, the strategy and cache state)."""

    # -- functional pieces: pure per-batch functions ---------------------------------------------------------------
    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self._numels)
        return {k: t.view(s) for k, t, s in zip(self.param_names, parts, self._shapes, strict=True)}

    def _forward(self, theta: torch.Tensor, batch: Batch) -> Any:
        args, kwargs = model_arguments(batch)
        output = functional_call(self._model, {**self._fixed, **self._unflatten(theta)}, args, kwargs)
        if not self._loss_checked:  # on the first forward pass: the output fits the loss (no extra pass)
            self.loss.check(output, batch)
            self._loss_checked = True
        return output

    def _batch_loss(self, theta: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
        """The batch's mean loss over its units (``scale`` = 1 / its units)."""
        return self.loss(self._forward(theta, batch), batch) * scale

    def _loss_with(self, theta: torch.Tensor, fixed: dict[str, torch.Tensor], batch: Batch, scale: Any) -> torch.Tensor:
        # _batch_loss with the fixed parameters and buffers as an argument (inputs of a traced graph, not constants).
        args, kwargs = model_arguments(batch)
        output = functional_call(self._model, {**fixed, **self._unflatten(theta)}, args, kwargs)
        return self.loss(output, batch) * scale

    def _gradient_torch_func(self, theta: torch.Tensor, batch: Batch, scale: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_and_value(self._batch_loss)(theta, batch, scale)

    def _gradient_reverse(self, theta: torch.Tensor, batch: Batch, scale: Any) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._batch_loss(theta, batch, scale)
            (g,) = torch.autograd.grad(loss, theta, allow_unused=True)
        return (torch.zeros_like(theta) if g is None else g), loss.detach()

    def _hvp_reverse(
        self, theta: torch.Tensor, V: torch.Tensor, batch: Batch, scale: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Reverse-over-reverse: the batch gradient's graph is built once, then each column costs one backward
        # through it (retained until the last column). Returns (the batch gradient, H_b V).
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._batch_loss(theta, batch, scale), theta, create_graph=True)
        if not g.requires_grad:  # the loss is at most linear in the parameters: the Hessian is zero
            return g.detach(), torch.zeros_like(V)
        last = V.shape[1] - 1
        cols = [torch.autograd.grad(g, theta, V[:, i], retain_graph=i < last)[0] for i in range(last + 1)]
        return g.detach(), torch.stack(cols, dim=1)

    def _hvp_torch_func(
        self, theta: torch.Tensor, V: torch.Tensor, batch: Batch, scale: Any, strategy: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Returns (the batch gradient, H_b V): the gradient is the primal of the jvp, computed anyway.
        def gradient(t: torch.Tensor) -> torch.Tensor:
            return grad(self._batch_loss)(t, batch, scale)

        def hvp(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(gradient, (theta,), (v,))  # (the batch gradient, H_b v)

        if V.shape[1] == 1 or strategy == "loop":
            g, first = hvp(V[:, 0])
            return g, torch.stack([first, *(hvp(V[:, i])[1] for i in range(1, V.shape[1]))], dim=1)
        # In chunks of columns, as vmap's chunk_size would (it cannot return the unbatched gradient beside them).
        width = self.vmap_chunk_size or V.shape[1]
        parts = []
        for start in range(0, V.shape[1], width):
            g, HV = vmap(hvp, in_dims=1, out_dims=(None, 1))(V[:, start : start + width])
            parts.append(HV)
        return g, (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def _traced_product(self, batch: Batch, scale: torch.Tensor) -> TracedProduct:
        """The split graphs of ``batch``'s structure, traced on first use (raises the TraceError of a failed trace)."""
        key = batch_signature(batch)
        traced = self._traced.get(key)
        if traced is None:
            if not self._loss_checked:  # the loss's one-off check of the model's output runs eagerly
                with torch.no_grad():
                    self._forward(self.theta, batch)

            def product(theta: torch.Tensor, scale_: torch.Tensor, inputs: Any, v: torch.Tensor):
                fixed, b = inputs
                return jvp(lambda t: grad(self._loss_with)(t, fixed, b, scale_), (theta,), (v,))

            try:
                traced = trace_product(product, self.theta, scale, (self._fixed, batch))
            except TraceError as error:
                global TRACE_FAILED  # noqa: PLW0603
                TRACE_FAILED = True
                traced = error
            self._traced[key] = traced
        if isinstance(traced, TraceError):
            raise traced
        return traced

    def _scale_tensor(self, scale: float) -> torch.Tensor:
        # The model's dtype, as a Python float scale would be converted: the same arithmetic as eagerly. One tensor
        # per distinct scale, so a pass that recomputes primals copies nothing to the device per batch.
        scales = self.__dict__.setdefault("_traced_scales", {})
        if scale not in scales:
            scales[scale] = torch.tensor(scale, dtype=self.dtype, device=self.device)
        return scales[scale]

    @functools.cached_property
    def _resident_storages(self) -> set[int]:
        # Storages held anyway, not counted against the primal cache's budget: parameters, fixed tensors, and the
        # batches when they live on the device. Collected once (they do not change), not once per batch kept.
        tensors = [self.theta, *self._fixed.values()]
        if getattr(self.batches, "placement", None) == "device":
            from torch.utils._pytree import tree_leaves

            tensors += [t for b in self.batches for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
        return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}

    def _hvp_traced(self, V: torch.Tensor, batch: Batch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # (the batch gradient, H_b V): the primal from the cache, or computed (and offered to the cache).
        entry = self._primal_cache.get(self._batch_index)
        if entry is None:
            batch = _traceable(batch)
            scale_t = self._scale_tensor(scale)
            traced = self._traced_product(batch, scale_t)
            g, saved = traced.primal(self.theta, scale_t, (self._fixed, batch))
            entry = (traced, g, saved)
            cache = self._primal_cache
            if cache.enabled and not cache.full:
                cache.offer(self._batch_index, entry, tensor_bytes((g, saved), self._resident_storages), self.device)
        traced, g, saved = entry
        return g, traced.tangents(saved, V, self._vectorised_tangents, self.vmap_chunk_size)

    def _product_function(self, strategy: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The pure per-batch product ``(theta, V, batch, scale) -> (batch gradient, H_b V)`` of ``strategy``."""
        if strategy == "reverse":
            return self._hvp_reverse
        return functools.partial(self._hvp_torch_func, strategy=strategy)

    def _compiled_call(
        self, compiled: CompiledFunctions, name: str, function: Callable[..., Any], batch: Batch, scale: float, *args
    ) -> Any:
        # The loss's one-off check of the model's output runs eagerly, before anything is traced.
        if not self._loss_checked:
            with torch.no_grad():
                self._forward(self.theta, batch)
        return compiled.call(
            name,
            function,
            lambda: function(self.theta, *args, batch, scale),
            self.theta,
            *args,
            batch,
            compiled.scale(scale),
            autograd=name.endswith("reverse"),
        )

    def _batch_gradient(self, batch: Batch, scale: float, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
        function = self._gradient_reverse if strategy == "reverse" else self._gradient_torch_func
        if self._compiled is None:
            return function(self.theta, batch, scale)
        kind = "reverse" if strategy == "reverse" else "torch.func"
        return self._compiled_call(self._compiled, f"gradient {kind}", function, batch, scale)

    def _batch_hvp(self, V: torch.Tensor, batch: Batch, scale: float, strategy: str) -> torch.Tensor:
        if strategy != "reverse":
            _load_jvp_decompositions()
        if strategy == "traced":
            g, HV = self._hvp_traced(V, batch, scale)
            self._batch_grad = g.detach()
            return HV
        function = self._product_function(strategy)
        if self._compiled is None:
            g, HV = function(self.theta, V, batch, scale)
        else:
            g, HV = self._compiled_call(self._compiled, f"product {strategy}", function, batch, scale, V)
        # The batch gradient came with the product, for the determinism check (expect_gradient), at no extra cost.
        self._batch_grad = g.detach()
        return HV

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t) if self._all_reduce is not None else t

    # -- strategy and checks, once -----------------------------------------------------------------------------------
    def _torch_func_disagrees(self, batch: Batch, scale: float) -> str | None:
        # torch.func on one batch against plain autograd: the gradient and a two-column product (vmap'd under
        # "vmap"). Any exception counts, whatever its text; so does a difference beyond rounding (sqrt(eps)
        # relative: rounding differences of the two orders of differentiation are near eps, a wrong or missing
        # derivative is O(1)).
        V = torch.randn(self.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        V = V.to(device=self.device, dtype=self.dtype)
        # Eager on both sides, also under ``compile``: the check is about torch.func's derivatives, which compiling
        # does not change, and a compiled two-column product would compile a graph that nothing else uses.
        _load_jvp_decompositions()
        checks = []
        try:
            g, _ = self._gradient_torch_func(self.theta, batch, scale)
            if self.block_strategy == "traced":
                batch = _traceable(batch)
                scale_t = self._scale_tensor(scale)
                traced = self._traced_product(batch, scale_t)
                g_primal, saved = traced.primal(self.theta, scale_t, (self._fixed, batch))
                HV = traced.tangents(saved, V, self._vectorised_tangents, self.vmap_chunk_size)
                checks.append(("traced gradient", g_primal))
            else:
                HV = self._hvp_torch_func(self.theta, V, batch, scale, self.block_strategy)[1]
        except TraceError as error:
            return str(error)
        except Exception as error:
            return f"torch.func failed: {_first_line(error)}"
        g_ref, _ = self._gradient_reverse(self.theta, batch, scale)
        HV_ref = self._hvp_reverse(self.theta, V, batch, scale)[1]
        tol = float(torch.finfo(self.dtype).eps) ** 0.5
        for name, a, b in (("gradient", g, g_ref), ("product", HV, HV_ref), *((n, t, g_ref) for n, t in checks)):
            a, b = a.to(torch.float64), b.to(torch.float64)
            scale_b = float(torch.linalg.vector_norm(b))
            diff = float(torch.linalg.vector_norm(a - b))
            if not diff <= tol * scale_b and not (scale_b == 0 and diff == 0):
                return f"torch.func's {name} differs from autograd's by {diff / max(scale_b, 1e-300):.1e} relative"
        return None

    def _settle_strategy(self) -> None:
        """Under "auto", before the first gradient or product: keep torch.func only if it works on the first batch."""
        if self._strategy_settled or not self._auto or self.block_strategy == "reverse":
            return
        batch, scale, _ = next(self._weighted_batches(), (None, 0.0, 0.0))
        reason = None if batch is None else self._torch_func_disagrees(batch, scale)
        # Every process of a data-parallel run must switch alike: any process's reason switches all.
        if self.block_strategy == "traced":
            flag = torch.tensor([0.0 if reason is None else 1.0], dtype=torch.float64, device=self.device)
            if float(self._reduce(flag)[0]) > 0:
                # Untraceable (data-dependent control flow, ...): torch.func without the trace, checked alike.
                self.block_strategy = "vmap"
                self.strategy_fallback = f"traced: {reason or 'failed on another process'}"
                reason = None if batch is None else self._torch_func_disagrees(batch, scale)
        flag = torch.tensor([0.0 if reason is None else 1.0], dtype=torch.float64, device=self.device)
        if float(self._reduce(flag)[0]) > 0:
            traced_reason = self.strategy_fallback
            self.block_strategy = "reverse"
            self.strategy_fallback = reason or "torch.func failed on another process"
            if traced_reason is not None:
                self.strategy_fallback = f"{traced_reason}; then {self.strategy_fallback}"
        self._strategy_settled = True

    def _run(self, compute: Callable[[str], torch.Tensor]) -> torch.Tensor:
        # Under "auto", torch.func failing later (another batch, memory) still falls back to plain autograd.
        with exact_attention():
            self._settle_strategy()
            strategy = self.block_strategy
            if strategy == "reverse" or not self._auto:
                return compute(strategy)
            try:
                return compute(strategy)
            except Exception as error:
                if self._all_reduce is not None:  # other processes may be inside a collective: do not diverge
                    raise
                self.block_strategy = "reverse"
                self.strategy_fallback = f"torch.func failed: {_first_line(error)}"
            return compute("reverse")
