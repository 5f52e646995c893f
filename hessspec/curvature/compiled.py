"""Per-batch products and gradients through ``torch.compile`` (``HessianOperator(..., compile=True)``).

What is compiled is the operator's pure per-batch function, ``(theta, V, batch, scale) -> H_b V`` (and
``(theta, batch, scale) -> (g_b, loss_b)``): under "vmap" and "loop" the torch.func composition (``jvp`` of
``grad``, ``vmap`` over the columns), under "reverse" the double backward itself, traced into the graph with
``torch._dynamo.config.trace_autograd_ops`` (torch >= 2.11; without it "reverse" runs eagerly, which is said in one
warning). The default inductor backend compiles each function with ``fullgraph=True``: under a torch.func transform
Dynamo cannot split a graph, and without ``fullgraph`` a model with a graph break would run wholly eagerly without a
word (measured: zero graphs compiled). ``dynamic=False``: one graph per shape (the full batches, a smaller last
batch, each block width); a new shape recompiles once. Symbolic shapes are no option here: on torch 2.14 tracing
the forward-mode derivative of a convolution with a symbolic batch size fails inside torch
(``_new_zeros_with_same_feature_meta``), so with dynamic shapes a CNN would not compile at all. A new operator on
the same model and shapes (the next checkpoint) reuses the graphs: weights are inputs, not constants. Dynamo keeps
at most ``recompile_limit`` (8) graphs per function; a process that goes past it (many models, shapes or dtypes)
gets the fallback below, not silently eager products.

The batch's ``scale`` (1 / its units) enters as a 0-d tensor, so a batch with another number of units (a smaller
last batch, token counts of a language model) does not recompile for a new constant, and the arithmetic is the
eager one's (a bfloat16 model multiplies by a float32 scale, as by a Python float). The Lanczos recurrence and the
float64 accumulation over batches are unchanged: compiled products differ from eager ones by rounding only.

Wherever compilation fails, when the function is made or on any call (a first call compiles, a new shape
recompiles), the operator falls back to its eager functions for good, with one one-line warning
(:class:`~hessspec.results.HessspecWarning`, each reason once per process), and records why
(:attr:`CompiledFunctions.fallback`, stored with the results).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hessspec.results import HessspecWarning

_WARNED: set[str] = set()  # reasons already shown: an operator per checkpoint must not repeat the same line


def first_line(error: BaseException) -> str:
    """``"ErrorType: first non-empty line of the message"`` (torch's compile errors span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def warn_once(message: str) -> None:
    """Warn (:class:`~hessspec.results.HessspecWarning`) with ``message`` unless it was shown in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, HessspecWarning, stacklevel=4)


def can_trace_autograd() -> bool:
    """Whether Dynamo can trace ``torch.autograd.grad`` into a graph (``trace_autograd_ops``, torch >= 2.11)."""
    from torch import _dynamo

    return hasattr(_dynamo.config, "trace_autograd_ops")


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # While Dynamo and inductor compile, some of their failures are logged (with C++ and Python tracebacks, at level
    # ERROR) before they are raised; the fallback says it in one line instead.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    from torch.utils._pytree import tree_leaves

    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in tree_leaves(args))


class CompiledFunctions:
    """Compiled versions of an operator's per-batch functions, with one fallback to the eager ones.

    Args:
        device: the operator's device (where the 0-d scales live).
        dtype: the dtype the model is evaluated in.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.fallback: str | None = None
        self._functions: dict[str, Callable[..., Any]] = {}
        self._scales: dict[float, torch.Tensor] = {}
        self._seen: set[tuple[Any, ...]] = set()  # (name, shapes) of the calls made: a new one compiles

    def scale(self, value: float) -> torch.Tensor:
        """``value`` as a 0-d tensor on the device (one per distinct value: no copy per batch)."""
        tensor = self._scales.get(value)
        if tensor is None:
            tensor = self._scales[value] = torch.tensor(value, dtype=self.scale_dtype, device=self.device)
        return tensor

    def disable(self, reason: str) -> None:
        """Fall back to eager evaluation for good, saying ``reason`` in one warning."""
        if self.fallback is None:
            self.fallback = reason
            warn_once(f"--compile: {reason}; the products run eagerly")

    def call(
        self, name: str, function: Callable[..., Any], eager: Callable[[], Any], *args: Any, autograd: bool = False
    ) -> Any:
        """``function(*args)`` compiled (once per ``name``), or ``eager()`` once compilation has failed.

        Args:
            name: which function (a compiled function is made once per name).
            function: the pure per-batch function to compile.
            eager: computes the same without compiling (called after a failure, and from then on).
            *args: the arguments of ``function``.
            autograd: ``function`` calls ``torch.autograd.grad`` (the "reverse" strategy): traced with
                ``trace_autograd_ops``, or eager with a warning where Dynamo cannot trace it.

        Returns:
            What ``function`` returns.
        """
        if self.fallback is None and autograd and not can_trace_autograd():
            self.disable(f"torch {torch.__version__} cannot compile double backward (the 'reverse' strategy)")
        if self.fallback is not None:
            return eager()
        try:
            compiled = self._functions.get(name)
            if compiled is None:
                compiled = self._functions[name] = torch.compile(function, fullgraph=True, dynamic=False)
            from torch import _dynamo

            tracing = _dynamo.config.patch(trace_autograd_ops=True) if autograd else contextlib.nullcontext()
            key = (name, _signature(args))
            compiles = key not in self._seen
            self._seen.add(key)
            with tracing, _quiet_logging() if compiles else contextlib.nullcontext():
                return compiled(*args)
        except Exception as error:  # any failure to compile or to run compiled: eager, said once
            self.disable(f"torch.compile failed ({name}): {first_line(error)}")
        return eager()
