"""One memory plan per job, made before the first product: the data, one batch's activations, the work arrays and
the Lanczos bases, with where each lives; and, for ``hessspec analyze --dry-run``, the time per checkpoint
extrapolated from one timed batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from hessspec.analysis import plan_bases
from hessspec.curvature.hessian import HessianOperator
from hessspec.curvature.problem import call_model, exact_attention, move_batch
from hessspec.data.placement import DeviceBatches, batch_nbytes
from hessspec.linalg.lanczos import chain_groups


@dataclass(frozen=True)
class MemoryPlan:
    """What one checkpoint's analysis holds, and where.

    Attributes:
        device: the compute device.
        data_placement: "device", "host" or "stream"; ``data_reason`` says why.
        data_bytes: the stacked analysed set (where it lives; for "stream" what stacking would take).
        batch_bytes: one batch on the device.
        activation_bytes: the outputs of every module in one batch's forward pass, measured on the first batch (a
            product holds these, plus their gradients and tangents, per column pass).
        work_bytes: the float64 Lanczos work vectors and one reorthogonalisation chunk on the device.
        basis_bytes: the Lanczos bases; ``basis_placement`` where they live and ``basis_reason`` why.
        columns_per_pass: Lanczos chains evaluated in one pass over the data.
        rounds: groups of chains run one after another (``--probes-per-pass``).
        batches: batches per pass (this process's).
        lanczos_steps: Lanczos steps per chain.
        product_s, gradient_s: seconds of one batch's product (all columns of a pass) and of one batch's gradient,
            measured on the first batch (None unless timed).
    """

    device: str
    data_placement: str
    data_reason: str
    data_bytes: int
    batch_bytes: int
    activation_bytes: int
    work_bytes: int
    basis_bytes: int
    basis_placement: str
    basis_reason: str
    columns_per_pass: int
    rounds: int
    batches: int
    lanczos_steps: int
    product_s: float | None = None
    gradient_s: float | None = None

    def line(self) -> str:
        """The plan in one line."""

        def gib(value: int) -> str:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
                if value >= scale:
                    return f"{value / scale:.2f} {unit}"
            return f"{value / 2**10:.1f} KiB"

        return (
            f"memory plan: data {gib(self.data_bytes)} {self.data_placement} ({self.data_reason}); one batch "
            f"{gib(self.batch_bytes)}, its forward activations {gib(self.activation_bytes)} (measured) x "
            f"{self.columns_per_pass} column(s) per pass; Lanczos work {gib(self.work_bytes)} on {self.device}; "
            f"bases {gib(self.basis_bytes)} on {self.basis_placement} ({self.basis_reason})"
        )

    def seconds_per_checkpoint(self) -> float | None:
        """Estimated seconds of one checkpoint: one gradient pass (the determinism check rides on the first product
        pass) and ``lanczos_steps x rounds`` product passes, each ``batches`` times the timed batch. None unless
        timed."""
        if self.product_s is None or self.gradient_s is None:
            return None
        return self.batches * (self.gradient_s + self.lanczos_steps * self.rounds * self.product_s)


def _forward_activation_bytes(model: nn.Module, batch, dtype: torch.dtype) -> int:
    # The outputs of every leaf module in one forward pass of the batch (what autograd saves is of this order).
    total = [0]

    def count(_module, _inputs, output) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), exact_attention():
            first = next(model.parameters())
            call_model(model, move_batch(batch, first.device, first.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    itemsize = torch.empty((), dtype=dtype).element_size()
    model_itemsize = next(model.parameters()).element_size()
    return total[0] * itemsize // model_itemsize


def make_plan(prepared, *, timed: bool = False) -> MemoryPlan:
    """The memory plan of a prepared job (:func:`hessspec.runner.pipeline.prepare`).

    Args:
        prepared: the model and data.
        timed: also time one batch's product (with all the columns of a pass) and one batch's gradient, on the
            weights currently in the model.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        MemoryError: the Lanczos bases fit nowhere (see :func:`hessspec.analysis.plan_bases`).
    """
    settings = prepared.job.settings
    chains = settings.probes + int(settings.gradient_crosscheck)
    estimate, choice = plan_bases(prepared.num_params, settings, chains, prepared.device)
    groups = chain_groups(chains, settings.probes_per_pass)
    first = prepared.batches.first()
    placement = prepared.placement
    plan = MemoryPlan(
        device=str(prepared.device),
        data_placement=prepared.batches.placement,
        data_reason=placement.reason if placement is not None else "given",
        data_bytes=placement.data_bytes if placement is not None else 0,
        batch_bytes=batch_nbytes(first),
        activation_bytes=_forward_activation_bytes(prepared.model, first, prepared.dtype),
        work_bytes=estimate["work"],
        basis_bytes=estimate["basis"],
        basis_placement=choice.placement,
        basis_reason=choice.reason,
        columns_per_pass=len(groups[0]),
        rounds=len(groups),
        batches=len(prepared.batches),
        lanczos_steps=settings.lanczos_steps,
    )
    if not timed:
        return plan
    operator = HessianOperator(
        prepared.model,
        DeviceBatches([first], prepared.device),
        bn_mode="eval" if prepared.job.bn_mode == "population" else prepared.job.bn_mode,
        params=prepared.selector,
        dtype=prepared.dtype,
        block_strategy=prepared.job.block_strategy,
        primal_cache=prepared.job.primal_cache,
        compile=prepared.job.compile,
        loss=prepared.loss,
    )
    V = torch.randn(operator.n, plan.columns_per_pass, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    V = V.to(prepared.device)
    operator.matmat(V)  # warm-up (kernel selection, caches)
    timings = []
    for fn in (lambda: operator.matmat(V), operator.loss_and_gradient):
        _sync(prepared.device)
        t0 = time.perf_counter()
        fn()
        _sync(prepared.device)
        timings.append(time.perf_counter() - t0)
    return MemoryPlan(**{**plan.__dict__, "product_s": timings[0], "gradient_s": timings[1]})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
