"""One checkpoint, analysed: the only place that orchestrates the numerical pieces.

``analyze(operator)`` computes the full-data loss and gradient, runs stochastic Lanczos quadrature with ``p``
Rademacher probes (plus, in the same passes over the data, one chain started from the gradient), and derives the
top eigenpairs, the gradient overlap and the trace. Defaults follow Ghorbani, Krishnan & Xiao (2019, Sec. 2):
90 Lanczos steps, 10 probes, full reorthogonalisation in float64.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hessspec.curvature.hessian import HessianOperator
from hessspec.linalg import spectrum
from hessspec.linalg.lanczos import lanczos, lanczos_memory_estimate
from hessspec.linalg.overlap import gradient_overlap, ritz_pairs
from hessspec.results import CheckpointResult

DEFAULT_LANCZOS_STEPS = 90  # Ghorbani et al. (2019), Sec. 2
DEFAULT_PROBES = 10  # ibid.
DEFAULT_TOP_K = 20


@dataclass(frozen=True)
class AnalysisSettings:
    """Settings of the SLQ analysis.

    Attributes:
        lanczos_steps: Lanczos steps m per probe (default 90, as in the paper).
        probes: number of random probes p (default 10, as in the paper).
        top_k: number of top Ritz pairs, and the largest rank of the gradient overlap.
        seed: seed of the probe generator (a CPU ``torch.Generator``, so probes are the same on every device).
        basis_dtype: "float64" or "float32" storage of the Lanczos bases.
        basis_device: where the bases live ("same" as the model, or "cpu").
        gradient_crosscheck: also run a Lanczos chain from the gradient (in the same data passes).
        determinism_check: compute the gradient twice and require the same result.
    """

    lanczos_steps: int = DEFAULT_LANCZOS_STEPS
    probes: int = DEFAULT_PROBES
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    basis_dtype: str = "float64"
    basis_device: str = "same"
    gradient_crosscheck: bool = True
    determinism_check: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def rademacher_probes(n: int, p: int, seed: int) -> torch.Tensor:
    """``p`` normalised Rademacher vectors [n, p] in float64, drawn from a CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randint(0, 2, (n, p), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    return z / np.sqrt(n)


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory cached by PyTorch's allocator but unused (e.g. a previous checkpoint's bases) is free to us.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        try:  # MemAvailable counts reclaimable page cache, unlike the free-page count
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


def check_memory(n: int, settings: AnalysisSettings, chains: int, device: torch.device) -> dict[str, int]:
    """Estimate the Lanczos memory and refuse, with advice, when it cannot fit where it would live.

    Raises:
        MemoryError: the bases do not fit in the free memory of their device.
    """
    dtype = torch.float64 if settings.basis_dtype == "float64" else torch.float32
    est = lanczos_memory_estimate(n, settings.lanczos_steps, chains, dtype)
    basis_dev = device if settings.basis_device == "same" else torch.device(settings.basis_device)
    free = _available_bytes(basis_dev)
    need = est["basis"] + (est["work"] if basis_dev == device else 0)
    if free is not None and need > 0.9 * free:
        msg = (
            f"the Lanczos bases need {need / 2**30:.2f} GiB ({n} parameters x {settings.lanczos_steps} steps x "
            f"{chains} chains x {torch.empty((), dtype=dtype).element_size()} bytes) but {basis_dev} has "
            f"{free / 2**30:.2f} GiB free; use a float32 basis, keep it on the host (cpu), or fewer probes/steps"
        )
        raise MemoryError(msg)
    return est


def analyze(
    operator: HessianOperator,
    settings: AnalysisSettings | None = None,
    *,
    step: int = 0,
    source: str = "",
    sha256: str = "",
    model_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointResult:
    """Analyse the Hessian of one checkpoint.

    Args:
        operator: the full-data Hessian.
        settings: :class:`AnalysisSettings` (defaults: the paper's).
        step, source, sha256, model_name: metadata copied into the result.
        progress: called as ``progress(done, total)`` after each Lanczos step.

    Returns:
        :class:`hessspec.results.CheckpointResult`.

    Raises:
        ValueError: settings out of range (``lanczos_steps > n``, ``probes < 1``, ``top_k > lanczos_steps``).
        FloatingPointError: non-finite loss, gradient or Hessian product.
        DeterminismError: two passes over the data differ.
        MemoryError: the Lanczos bases cannot fit.
    """
    settings = settings or AnalysisSettings()
    n = operator.n
    if settings.probes < 1:
        msg = f"probes must be at least 1; got {settings.probes}"
        raise ValueError(msg)
    if not 1 <= settings.lanczos_steps <= n:
        msg = f"lanczos_steps must lie in 1..n_params ({n}); got {settings.lanczos_steps}"
        raise ValueError(msg)
    if not 1 <= settings.top_k <= settings.lanczos_steps:
        msg = f"top_k must lie in 1..lanczos_steps ({settings.lanczos_steps}); got {settings.top_k}"
        raise ValueError(msg)
    if settings.basis_dtype not in ("float64", "float32"):
        msg = f"basis_dtype must be float64 or float32; got {settings.basis_dtype!r}"
        raise ValueError(msg)
    chains = settings.probes + int(settings.gradient_crosscheck)
    check_memory(n, settings, chains, operator.device)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    loss, g = operator.loss_and_gradient()
    timings["gradient"] = time.perf_counter() - start
    if settings.determinism_check:
        operator.check_determinism(g)
    grad_norm = float(torch.linalg.vector_norm(g))

    V0 = rademacher_probes(n, settings.probes, settings.seed).to(operator.device)
    use_grad_chain = settings.gradient_crosscheck and grad_norm > 0
    if use_grad_chain:
        V0 = torch.cat([V0, (g / grad_norm).unsqueeze(1)], dim=1)

    hvp_time = [0.0]

    def matmat(V: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = operator.matmat(V)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        hvp_time[0] += time.perf_counter() - t0
        return out

    def callback(j: int) -> None:
        if progress is not None:
            progress(j + 1, settings.lanczos_steps)

    t0 = time.perf_counter()
    basis_device = None if settings.basis_device == "same" else settings.basis_device
    result = lanczos(
        matmat,
        V0,
        settings.lanczos_steps,
        keep_basis=True,
        basis_dtype=torch.float64 if settings.basis_dtype == "float64" else torch.float32,
        basis_device=basis_device,
        generator=torch.Generator(device=operator.device).manual_seed(settings.seed + 1),
        callback=callback,
    )
    timings["lanczos"] = time.perf_counter() - t0
    timings["hvp"] = hvp_time[0]

    quad = spectrum.quadrature(result.alpha.numpy(), result.beta.numpy())
    nodes, weights = quad.nodes[: settings.probes], quad.weights[: settings.probes]
    trace, trace_stderr = spectrum.trace_estimate(nodes, weights, n)

    ritz = ritz_pairs(result, settings.top_k, chain=0)
    if grad_norm > 0:
        ov = gradient_overlap(ritz.vectors, g)
        overlap_k, overlap_ratio, cos2 = ov.k, ov.ratio, ov.cos2
    else:
        overlap_k = np.arange(1, settings.top_k + 1, dtype=np.int64)
        overlap_ratio = np.full(settings.top_k, np.nan)
        cos2 = np.full(settings.top_k, np.nan)
    del result

    return CheckpointResult(
        step=int(step),
        loss=float(loss),
        grad_norm=grad_norm,
        trace=trace,
        trace_stderr=trace_stderr,
        nodes=nodes,
        weights=weights,
        top_eigenvalues=ritz.values,
        top_residuals=ritz.residuals,
        overlap_k=overlap_k,
        overlap_ratio=overlap_ratio,
        cos2=cos2,
        n_params=n,
        n_samples=operator.num_examples,
        bn_mode=operator.bn_mode,
        dtype=str(operator.dtype).removeprefix("torch."),
        device=str(operator.device),
        seed=settings.seed,
        lanczos_steps=settings.lanczos_steps,
        probes=settings.probes,
        elapsed_s=time.perf_counter() - start,
        source=source,
        sha256=sha256,
        model=model_name,
        gradient_nodes=quad.nodes[-1] if use_grad_chain else None,
        gradient_weights=quad.weights[-1] if use_grad_chain else None,
        timings=timings,
        settings=_recorded_settings(settings, operator),
    )


def _recorded_settings(settings: AnalysisSettings, operator: HessianOperator) -> dict:
    # The settings, plus how the products were evaluated (resolved: e.g. "reverse" where "auto" was asked for).
    return {**settings.to_dict(), "block_strategy": operator.block_strategy}
