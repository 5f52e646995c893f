"""One checkpoint, analysed: the only place that orchestrates the numerical pieces.

``analyze(operator)`` computes the full-data loss and gradient, runs stochastic Lanczos quadrature with ``p``
Rademacher probes (plus, in the same passes over the data, one chain started from the gradient), and derives the
top eigenpairs, the gradient overlap and the trace. Defaults follow Ghorbani, Krishnan & Xiao (2019, Sec. 2):
90 Lanczos steps, 10 probes, full reorthogonalisation in float64.

``analyze_many(operator, settings)`` does this for several curvatures (the Hessian and its Gauss-Newton family,
:mod:`hessspec.curvature.gauss_newton`) and for the diagonal blocks of each (:mod:`hessspec.curvature.blocks`), all
in the same passes over the data: every (curvature, block) has its own Lanczos chains, all advanced in lockstep
(:func:`hessspec.linalg.lanczos.lanczos_lockstep`), and each Lanczos step is one pass over the data whatever the
number of curvatures and blocks. The whole-model result of a curvature does not change (bitwise, under the
"reverse" product strategy; to rounding under "vmap") when blocks or other curvatures are analysed alongside: its
probes, its chains and its columns' products are the same.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from hessspec.curvature.blocks import WHOLE, Block, block_probes, check_block_specs, resolve_blocks, restart_seeds
from hessspec.curvature.gauss_newton import check_curvature
from hessspec.curvature.hessian import HessianOperator
from hessspec.data.placement import available_bytes as _available_bytes
from hessspec.linalg import spectrum
from hessspec.linalg.basis import BasisChoice, BasisStorage, check_basis_placement, disk_free, resolve_basis_placement
from hessspec.linalg.lanczos import (
    LanczosChains,
    LanczosResult,
    chain_groups,
    lanczos_lockstep,
    lanczos_memory_estimate,
    merge_results,
)
from hessspec.linalg.overlap import gradient_overlap
from hessspec.linalg.ritz import union_ritz_pairs
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
        basis_device: the older spelling of the basis placement: "same" (see ``basis_placement``) or "cpu" (host
            memory, when ``basis_placement`` is "auto").
        gradient_crosscheck: also run a Lanczos chain from the gradient (in the same data passes), for the
            whole-model Hessian: the spectral measure of ``g / ||g||`` (an independent check of the overlap) and a
            Krylov space that joins the probes' in the Rayleigh-Ritz step. Off by default: it adds one column to
            every product (+10% of the run at 10 probes, +33% at 3; benchmarks/RESULTS.md), and the overlap comes
            from the Ritz vectors without it. The other curvatures and the blocks have no such chain.
        determinism_check: require the gradient of the first product pass (computed on the way) to equal the
            gradient pass's (no extra pass; :meth:`HessianOperator.expect_gradient`).
        curvatures: the matrices analysed (:data:`hessspec.curvature.gauss_newton.CURVATURES`), the Hessian by
            default; all share the data passes (see :func:`analyze_many`).
        blocks: block specs (:mod:`hessspec.curvature.blocks`): each curvature is also analysed on the diagonal
            block of each named group of parameters, in the same data passes. Empty for the whole model only.
        probes_per_pass: advance at most this many chains of each (curvature, block) per pass over the data (the
            probes, then the gradient chain), when the activations of all columns at once do not fit; the groups
            run one after another, ``ceil(chains / probes_per_pass)`` times the passes. None: all at once. It
            changes no stored number (bitwise under the "reverse" and "loop" strategies; rounding under "vmap").
        basis_placement: where the bases live: "auto" (the device while they fit, else host memory, else a
            scratch file), "device", "host" or "disk" (:mod:`hessspec.linalg.basis`). Changes no number.
        scratch_dir: directory of the scratch files of "disk" (default: the system's temporary directory; the
            command line uses the result file's directory).
    """

    lanczos_steps: int = DEFAULT_LANCZOS_STEPS
    probes: int = DEFAULT_PROBES
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    basis_dtype: str = "float64"
    basis_device: str = "same"
    gradient_crosscheck: bool = False
    determinism_check: bool = True
    curvatures: tuple[str, ...] = ("hessian",)
    blocks: tuple[str, ...] = ()
    probes_per_pass: int | None = None
    basis_placement: str = "auto"
    scratch_dir: str | None = None

    def __post_init__(self) -> None:
        curvatures = (self.curvatures,) if isinstance(self.curvatures, str) else tuple(self.curvatures)
        blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
        object.__setattr__(self, "curvatures", curvatures)
        object.__setattr__(self, "blocks", blocks)

    def check(self) -> None:
        """Raise ValueError for unknown or repeated curvatures and malformed block specs (before any model exists)."""
        if not self.curvatures:
            msg = "at least one curvature is needed"
            raise ValueError(msg)
        for name in self.curvatures:
            check_curvature(name)
        if len(set(self.curvatures)) != len(self.curvatures):
            msg = f"a curvature is named twice in {list(self.curvatures)}"
            raise ValueError(msg)
        check_block_specs(self.blocks)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["curvatures"], out["blocks"] = list(self.curvatures), list(self.blocks)
        return out


def resolvable_top_k(settings: AnalysisSettings, n: int | None = None) -> int:
    """The largest ``top_k`` the Krylov spaces of the whole model's Hessian can resolve.

    The top pairs come from a Rayleigh-Ritz over the union of all chains' Krylov spaces
    (:func:`hessspec.linalg.ritz.union_ritz_pairs`), of dimension ``d <= min(n, m * chains)``. Its Ritz values
    approximate both ends of the spectrum and the bulk between them, so at most about half of them can approximate
    top eigenvalues: ``top_k <= d // 2``, and never more than one per Lanczos step (``top_k <= m``). When the chains
    can span the whole space (``m * chains >= n``), Rayleigh-Ritz gives eigenpairs and the limit is ``min(m, n)``.
    Within the limit each pair carries a converged flag; beyond it a top list is certain to hold bulk Ritz values.
    Blocks and curvatures without the gradient chain are clamped to their own limit (:func:`krylov_top_k_limit`).

    Args:
        settings: the settings (``lanczos_steps``, ``probes``, ``gradient_crosscheck``).
        n: the dimension of the operator, when known.

    Returns:
        The limit (at least 1).
    """
    return krylov_top_k_limit(settings.lanczos_steps, settings.probes + int(settings.gradient_crosscheck), n)


def krylov_top_k_limit(steps: int, chains: int, n: int | None = None) -> int:
    """Top pairs resolvable from ``chains`` Lanczos chains of ``steps`` steps in dimension ``n`` (see
    :func:`resolvable_top_k`): ``min(steps, steps * chains // 2)``, or ``min(steps, n)`` when they can span it."""
    if n is not None and steps * chains >= n:
        return max(1, min(steps, int(n)))
    return max(1, min(steps, steps * chains // 2))


def top_k_limit_reason(settings: AnalysisSettings, n: int | None = None) -> str:
    """One clause saying why ``top_k`` is limited to :func:`resolvable_top_k` (for error messages)."""
    chains = settings.probes + int(settings.gradient_crosscheck)
    dimension = settings.lanczos_steps * chains
    space = f"{chains} chain(s) of {settings.lanczos_steps} Lanczos steps span at most {dimension} dimensions"
    if n is not None and dimension >= n:
        return f"{space} (the operator has {n}), and the top list holds one pair per step"
    return f"{space}, whose Ritz values spread over both ends of the spectrum, and the top list holds one per step"


def rademacher_probes(n: int, p: int, seed: int) -> torch.Tensor:
    """``p`` normalised Rademacher vectors [n, p] in float64: the whole model's probes.

    Probe ``i`` comes from its own CPU generator seeded by a hash of ``(seed, i)``
    (:func:`hessspec.curvature.blocks.block_probes` of the whole model), so it depends on ``(seed, i)`` alone: a
    run with more probes extends one with fewer, and probes can run in groups (``probes_per_pass``).
    """
    return block_probes(n, p, seed, WHOLE)


def plan_bases(
    n: int, settings: AnalysisSettings, chains: int, device: torch.device, *, block_sizes: Sequence[int] = ()
) -> tuple[dict[str, int], BasisChoice]:
    """Estimate the Lanczos memory and choose where the bases live (``settings.basis_placement``).

    Args:
        n: parameters of the whole model.
        settings: the analysis settings (steps, basis dtype and placement, the number of curvatures).
        chains: chains of the whole-model Hessian (probes plus the gradient chain).
        device: where the products run.
        block_sizes: the dimensions of the blocks analysed besides the whole model.

    Returns:
        ``(estimate, choice)``: bytes of the bases and of the work arrays, and the basis placement.

    Raises:
        MemoryError: with advice, when the bases fit nowhere (or not where they were asked to be).
    """
    dtype = torch.float64 if settings.basis_dtype == "float64" else torch.float32
    m, p = settings.lanczos_steps, settings.probes
    curvatures = max(1, len(settings.curvatures))
    # n * m * chains for the whole Hessian; each other curvature n * m * p; each block n_b * min(m, n_b) * p.
    elements = n * m * chains + (curvatures - 1) * n * m * p + curvatures * sum(b * min(m, b) * p for b in block_sizes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    est = lanczos_memory_estimate(n, m, chains, dtype)
    est["basis"] = int(elements) * itemsize
    per_pass = settings.probes_per_pass or chains
    columns = min(chains, per_pass) + ((curvatures - 1) + curvatures * len(block_sizes)) * min(p, per_pass)
    est["work"] = 6 * int(n) * columns * 8 + est["work"] - 6 * int(n) * chains * 8
    device_free = _available_bytes(device)
    if device_free is not None:
        device_free = max(0, device_free - est["work"])
    host_free = device_free if device.type == "cpu" else _available_bytes(torch.device("cpu"))
    choice = resolve_basis_placement(
        _requested_basis_placement(settings),
        est["basis"],
        device,
        device_free=device_free,
        host_free=host_free,
        disk_free_bytes=disk_free(settings.scratch_dir or tempfile.gettempdir()),
    )
    return est, choice


def check_memory(
    n: int, settings: AnalysisSettings, chains: int, device: torch.device, *, block_sizes: Sequence[int] = ()
) -> dict[str, int]:
    """Estimate the Lanczos memory and refuse, with advice, when the bases cannot fit anywhere (see
    :func:`plan_bases`).

    Raises:
        MemoryError: the bases fit nowhere, or not where ``settings.basis_placement`` puts them.
    """
    return plan_bases(n, settings, chains, device, block_sizes=block_sizes)[0]


def _requested_basis_placement(settings: AnalysisSettings) -> str:
    # basis_device="cpu" is the older spelling of basis_placement="host".
    if settings.basis_placement == "auto" and settings.basis_device == "cpu":
        return "host"
    return settings.basis_placement


@dataclass
class _Group:
    # The Lanczos chains of one (curvature, block): ``block`` None for the whole model. ``parts`` are the groups of
    # at most probes_per_pass chains that run in one pass, all writing into one basis storage; a part's chains are
    # made when its round starts (:meth:`part`), so only the running chains hold work vectors.
    curvature: str
    block: Block | None
    V0: torch.Tensor
    steps: int
    seeds: list[int]
    parts: list[range]
    basis: torch.Tensor
    probes: int
    gradient_chain: bool

    @property
    def name(self) -> str:
        return WHOLE if self.block is None else self.block.name

    @property
    def n(self) -> int:
        return self.V0.shape[0]

    def part(self, k: int) -> LanczosChains:
        r = self.parts[k]
        return LanczosChains(
            self.V0[:, r.start : r.stop],
            self.steps,
            keep_basis=True,
            basis=self.basis[r.start : r.stop],
            restart_seeds=self.seeds[r.start : r.stop],
        )


def _check_settings(settings: AnalysisSettings, n: int) -> None:
    if settings.probes < 1:
        msg = f"probes must be at least 1; got {settings.probes}"
        raise ValueError(msg)
    if not 1 <= settings.lanczos_steps <= n:
        msg = f"lanczos_steps must lie in 1..n_params ({n}); got {settings.lanczos_steps}"
        raise ValueError(msg)
    resolvable = resolvable_top_k(settings, n)
    if not 1 <= settings.top_k <= resolvable:
        msg = f"top_k must lie in 1..{resolvable}: {top_k_limit_reason(settings, n)}; got {settings.top_k}"
        raise ValueError(msg)
    if settings.basis_dtype not in ("float64", "float32"):
        msg = f"basis_dtype must be float64 or float32; got {settings.basis_dtype!r}"
        raise ValueError(msg)
    check_basis_placement(settings.basis_placement)
    per_pass = settings.probes_per_pass
    if per_pass is not None and (isinstance(per_pass, bool) or not isinstance(per_pass, int) or per_pass < 1):
        msg = f"probes_per_pass must be a positive integer or None; got {per_pass!r}"
        raise ValueError(msg)
    settings.check()


def operator_blocks(operator: HessianOperator, settings: AnalysisSettings) -> list[Block]:
    """The blocks named by ``settings.blocks`` over the operator's parameters.

    Raises:
        hessspec.curvature.blocks.BlockError: see :func:`hessspec.curvature.blocks.resolve_blocks`.
    """
    if not settings.blocks:
        return []
    return resolve_blocks(settings.blocks, operator.param_names, operator._numels)


def analyze(operator: HessianOperator, settings: AnalysisSettings | None = None, **metadata: Any) -> CheckpointResult:
    """Analyse the Hessian (or the one curvature the settings name) of one checkpoint, on the whole model.

    Args:
        operator: the full-data Hessian (a :class:`~hessspec.curvature.gauss_newton.CurvatureOperator` for another
            curvature).
        settings: :class:`AnalysisSettings` (defaults: the paper's) naming one curvature and no blocks.
        **metadata: ``step``, ``source``, ``sha256``, ``model_name`` (copied into the result) and ``progress``
            (called as ``progress(done, total)`` after each Lanczos step), as for :func:`analyze_many`.

    Returns:
        :class:`hessspec.results.CheckpointResult`.

    Raises:
        ValueError: settings out of range (``lanczos_steps > n``, ``probes < 1``, ``top_k`` above
            :func:`resolvable_top_k`), or
            several curvatures or blocks (use :func:`analyze_many`).
        FloatingPointError: non-finite loss, gradient or Hessian product.
        DeterminismError: two passes over the data differ.
        MemoryError: the Lanczos bases cannot fit.
    """
    settings = settings or AnalysisSettings()
    if len(settings.curvatures) != 1 or settings.blocks:
        msg = "analyze gives one result: for several curvatures or blocks use analyze_many"
        raise ValueError(msg)
    return analyze_many(operator, settings, **metadata)[0]


def analyze_many(
    operator: HessianOperator,
    settings: AnalysisSettings | None = None,
    *,
    step: int = 0,
    source: str = "",
    sha256: str = "",
    model_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CheckpointResult, ...]:
    """Analyse each curvature of ``settings.curvatures``, on the whole model and on each block, in shared passes.

    Every (curvature, block) gets ``settings.probes`` Lanczos chains of ``min(lanczos_steps, n_block)`` steps;
    all chains advance in lockstep, one pass over the data per step (:func:`analyze` documents the whole-model
    analysis, unchanged). A block's probes depend on (seed, block name, probe index) only; the whole model's on
    the seed only, the same for every curvature. The overlap of a block is that of the block's part of the
    gradient with the block's top Ritz vectors.

    Args:
        operator: a :class:`~hessspec.curvature.gauss_newton.CurvatureOperator` (a plain
            :class:`~hessspec.curvature.hessian.HessianOperator` serves the Hessian alone).
        settings: :class:`AnalysisSettings`.
        step, source, sha256, model_name: metadata copied into the results.
        progress: called as ``progress(done, total)`` after each Lanczos step.

    Returns:
        One :class:`~hessspec.results.CheckpointResult` per (curvature, block): for each curvature in the order
        given, the whole model ("all") first, then the blocks in the order of their specs.

    Raises:
        ValueError: bad settings, a curvature the operator cannot compute.
        hessspec.curvature.blocks.BlockError: bad block specs for this model.
        FloatingPointError, DeterminismError, MemoryError: as for :func:`analyze`.
    """
    settings = settings or AnalysisSettings()
    n = operator.n
    _check_settings(settings, n)
    if set(settings.curvatures) - {"hessian"} and not hasattr(operator, "products"):
        msg = f"curvatures {list(settings.curvatures)} need a CurvatureOperator; got {type(operator).__name__}"
        raise ValueError(msg)
    blocks = operator_blocks(operator, settings)
    chains = settings.probes + int(settings.gradient_crosscheck)
    _, basis_choice = plan_bases(n, settings, chains, operator.device, block_sizes=[b.n for b in blocks])

    timings: dict[str, float] = {}
    start = time.perf_counter()
    loss, g = operator.loss_and_gradient()
    timings["gradient"] = time.perf_counter() - start
    if settings.determinism_check:
        # Checked on the first product pass, from the batch gradients it computes anyway (no pass of its own).
        operator.expect_gradient(g)
    if hasattr(operator, "remember_gradient"):
        operator.remember_gradient(g)
    grad_norm = float(torch.linalg.vector_norm(g))

    # The bases live in storage (device, host memory or a scratch file, removed on leaving, even on an error).
    with BasisStorage(basis_choice.placement, operator.device, settings.scratch_dir) as storage:
        groups = _plan(operator, settings, blocks, g, grad_norm, storage)
        hvp_time = [0.0]

        rounds = max(len(group.parts) for group in groups)
        passes = settings.lanczos_steps * rounds

        t0 = time.perf_counter()
        parts: list[list[LanczosResult]] = [[] for _ in groups]
        for k in range(rounds):
            # Round k advances the k-th part of every (curvature, block) in lockstep: one data pass per step.
            active = [i for i, group in enumerate(groups) if k < len(group.parts)]

            def callback(j: int, done: int = k * settings.lanczos_steps) -> None:
                if progress is not None:
                    progress(done + j + 1, passes)

            matmat = _group_matmat(operator, [groups[i] for i in active], hvp_time)
            runs = lanczos_lockstep([groups[i].part(k) for i in active], matmat, callback=callback)
            for i, run in zip(active, runs, strict=True):
                parts[i].append(run)
        runs = [merge_results(p, group.basis) for p, group in zip(parts, groups, strict=True)]
        timings["lanczos"] = time.perf_counter() - t0
        timings["hvp"] = hvp_time[0]

        meta = {
            "loss": float(loss),
            "n_samples": operator.num_examples,
            "bn_mode": operator.bn_mode,
            "dtype": str(operator.dtype).removeprefix("torch."),
            "device": str(operator.device),
            "seed": settings.seed,
            "probes": settings.probes,
            "source": source,
            "sha256": sha256,
            "model": model_name,
            "timings": timings,
            "settings": {**_recorded_settings(settings, operator), "basis_placement": basis_choice.placement},
        }
        results = [_result(group, run, g, int(step), settings, meta) for group, run in zip(groups, runs, strict=True)]
    elapsed = time.perf_counter() - start
    return tuple(replace(r, elapsed_s=elapsed) for r in results)


def _plan(
    operator: HessianOperator,
    settings: AnalysisSettings,
    blocks: list[Block],
    g: torch.Tensor,
    grad_norm: float,
    storage: BasisStorage,
) -> list[_Group]:
    n, device = operator.n, operator.device
    dtype = torch.float64 if settings.basis_dtype == "float64" else torch.float32
    where = storage
    probes = rademacher_probes(n, settings.probes, settings.seed).to(device)
    groups = []
    for curvature in settings.curvatures:
        gradient_chain = curvature == "hessian" and settings.gradient_crosscheck and grad_norm > 0
        V0 = torch.cat([probes, (g / grad_norm).unsqueeze(1)], dim=1) if gradient_chain else probes
        seeds = restart_seeds(settings.seed, WHOLE, settings.probes, gradient_chain)
        groups.append(_group(curvature, None, V0, settings.lanczos_steps, seeds, settings, dtype, where))
        for block in blocks:
            V0 = block_probes(block.n, settings.probes, settings.seed, block.name).to(device)
            seeds = restart_seeds(settings.seed, block.name, settings.probes)
            steps = min(settings.lanczos_steps, block.n)
            groups.append(_group(curvature, block, V0, steps, seeds, settings, dtype, where))
    return groups


def _group(
    curvature: str,
    block: Block | None,
    V0: torch.Tensor,
    steps: int,
    seeds: list[int],
    settings: AnalysisSettings,
    dtype: torch.dtype,
    where: BasisStorage,
) -> _Group:
    n, p = V0.shape
    basis = where.empty((p, steps, n), dtype)
    parts = chain_groups(p, settings.probes_per_pass)
    return _Group(curvature, block, V0, steps, seeds, parts, basis, settings.probes, p > settings.probes)


def _group_matmat(
    operator: HessianOperator, groups: list[_Group], hvp_time: list[float]
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    # One call of the operator per Lanczos step: per curvature, the whole model's columns, then each block's
    # columns embedded (zero-padded) into the whole parameter vector; the products' block rows are returned.
    n = operator.n
    curvatures = list(dict.fromkeys(group.curvature for group in groups))

    def matmat(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        columns, layout = {}, []
        for curvature in curvatures:
            parts, start = [], 0
            for i, group in enumerate(groups):
                if group.curvature != curvature:
                    continue
                V = blocks[i]
                parts.append(V if group.block is None else group.block.embed(V, n))
                layout.append((i, curvature, start, V.shape[1]))
                start += V.shape[1]
            columns[curvature] = torch.cat(parts, dim=1)
        if hasattr(operator, "products"):
            products = operator.products(columns)
        else:
            products = {"hessian": operator.matmat(columns["hessian"])}
        out: list[torch.Tensor] = [None] * len(groups)  # type: ignore[list-item]
        for i, curvature, start, width in layout:
            W = products[curvature][:, start : start + width]
            out[i] = W if groups[i].block is None else groups[i].block.restrict(W)
        if any(t.is_cuda for t in out):
            torch.cuda.synchronize(out[0].device)
        hvp_time[0] += time.perf_counter() - t0
        return out

    return matmat


def _result(
    group: _Group, run: LanczosResult, g: torch.Tensor, step: int, settings: AnalysisSettings, meta: dict
) -> CheckpointResult:
    quad = spectrum.quadrature(run.alpha.numpy(), run.beta.numpy())
    p = group.probes
    nodes, weights = quad.nodes[:p], quad.weights[:p]
    n = group.n
    trace, trace_stderr = spectrum.trace_estimate(nodes, weights, n)
    # The whole model's top_k was checked against resolvable_top_k; a block or a curvature without the gradient
    # chain may resolve fewer (its dimension, its chains): clamped.
    top_k = min(settings.top_k, krylov_top_k_limit(group.steps, run.alpha.shape[0], n))
    ritz = union_ritz_pairs(run, top_k)
    gb = g if group.block is None else group.block.restrict(g)
    grad_norm = float(torch.linalg.vector_norm(gb))
    if grad_norm > 0:
        ov = gradient_overlap(ritz.vectors, gb)
        overlap_k, overlap_ratio, cos2 = ov.k, ov.ratio, ov.cos2
    else:
        overlap_k = np.arange(1, top_k + 1, dtype=np.int64)
        overlap_ratio = np.full(top_k, np.nan)
        cos2 = np.full(top_k, np.nan)
    return CheckpointResult(
        step=step,
        grad_norm=grad_norm,
        trace=trace,
        trace_stderr=trace_stderr,
        nodes=nodes,
        weights=weights,
        top_eigenvalues=ritz.values,
        top_residuals=ritz.residuals,
        top_converged=ritz.converged,
        overlap_k=overlap_k,
        overlap_ratio=overlap_ratio,
        cos2=cos2,
        n_params=n,
        lanczos_steps=group.steps,
        elapsed_s=0.0,
        gradient_nodes=quad.nodes[-1] if group.gradient_chain else None,
        gradient_weights=quad.weights[-1] if group.gradient_chain else None,
        curvature=group.curvature,
        block=group.name,
        **meta,
    )


def _recorded_settings(settings: AnalysisSettings, operator: HessianOperator) -> dict:
    # The settings, plus how the products were evaluated (resolved: e.g. "reverse" where "auto" was asked for).
    return {**settings.to_dict(), **operator.recorded_settings()}
