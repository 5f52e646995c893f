"""Block-parallel Lanczos tridiagonalisation with full reorthogonalisation, in float64.

``lanczos`` runs ``p`` independent Lanczos chains in lockstep: at every step one call of ``matmat`` on an
``[n, p]`` block advances all of them, so one pass over the data serves all probes. It takes a callable and a
start block, never a model. :class:`LanczosChains` is the stepping state behind it, and
:func:`lanczos_lockstep` advances several groups of chains of different dimensions (the diagonal blocks of a
matrix, several matrices) with one operator call per step. With ``chains_per_pass`` the chains run in consecutive
groups (one pass per group and step) when the product of all columns at once does not fit.

Every chain is computed by its own vector operations (dot products, norms, a reorthogonalisation against its own
basis over fixed chunks of rows, restart vectors from its own seeded generator), so a chain's numbers do not depend
on which other chains run beside it, nor on where its basis is stored: with a ``matmat`` whose columns are computed
independently (:class:`~hessspec.curvature.hessian.HessianOperator` under the "reverse" and "loop" strategies),
grouping and basis placement change no bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

Matmat = Callable[[torch.Tensor], torch.Tensor]

# A chain breaks down when its new residual is below this fraction of the running estimate of ||A||: with full
# reorthogonalisation in float64 the residual of an exhausted invariant subspace is O(eps * ||A||), ~1e-15.
DEFAULT_BREAKDOWN_TOL = 1e-10
# Reorthogonalisation reads a chain's basis in chunks of at most this many bytes (in float64 on the compute device),
# so the device never holds more than one chunk of a basis kept elsewhere.
REORTH_CHUNK_BYTES = 64 * 2**20
_MAX_CHUNK_ROWS = 32


class LanczosResult(NamedTuple):
    """Tridiagonals (and optionally bases) of ``p`` Lanczos chains of ``m`` steps.

    For each chain ``i`` with orthonormal basis ``Q_i`` ([n, m]) and tridiagonal ``T_i`` (diagonal ``alpha[i]``,
    off-diagonal ``beta[i]``), the Lanczos relation ``A Q_i = Q_i T_i + r_i e_m^T`` holds, with ``r_i`` orthogonal
    to ``Q_i`` and ``||r_i|| = residual_norms[i]``.

    Attributes:
        alpha: float64 [p, m] diagonals (on the CPU).
        beta: float64 [p, m-1] off-diagonals (on the CPU); a zero marks a breakdown after which the chain was
            restarted with a random vector orthogonal to its basis (the quadrature weight of the new block is 0).
        residual_norms: float64 [p], ``||r_i||`` after the last step.
        restarts: int64 [p], number of breakdowns (invariant subspaces found) in each chain.
        basis: [p, m, n] (rows are the Lanczos vectors) in the requested dtype, wherever it was stored (on a
            device, in host memory or memory-mapped from a scratch file), or None.
        residuals: [n, p] float64, the final residual vectors ``r_i`` (only when the basis is kept), or None.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    residual_norms: torch.Tensor
    restarts: torch.Tensor
    basis: torch.Tensor | None
    residuals: torch.Tensor | None


def basis_bytes(n: int, steps: int, probes: int, dtype: torch.dtype = torch.float64) -> int:
    """Memory of the Lanczos bases of ``probes`` chains: ``n * steps * probes * itemsize`` bytes."""
    return int(n) * int(steps) * int(probes) * torch.empty((), dtype=dtype).element_size()


def lanczos_memory_estimate(
    n: int, steps: int, probes: int, basis_dtype: torch.dtype = torch.float64, chains_per_pass: int | None = None
) -> dict[str, int]:
    """Bytes needed by :func:`lanczos`.

    Returns:
        ``{"basis": ..., "work": ...}``: the bases of all chains, and the float64 working vectors of the chains
        that run at once (six of length n per chain) plus one reorthogonalisation chunk.
    """
    group = probes if chains_per_pass is None else min(int(chains_per_pass), int(probes))
    chunk = reorth_chunk_rows(n) * int(n) * 8
    return {"basis": basis_bytes(n, steps, probes, basis_dtype), "work": 6 * int(n) * group * 8 + chunk}


def reorth_chunk_rows(n: int) -> int:
    """Rows of a basis read at once by the reorthogonalisation (and for Ritz vectors): a function of ``n`` only,
    so that the arithmetic, and hence every bit of the result, is the same wherever the basis is stored."""
    return max(1, min(_MAX_CHUNK_ROWS, REORTH_CHUNK_BYTES // (8 * max(int(n), 1))))


def basis_chunks(n: int, upto: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` below ``upto`` of a chain's basis of vectors of length ``n``, in the fixed
    chunks of :func:`reorth_chunk_rows`."""
    rows = reorth_chunk_rows(n)
    return [(s, min(s + rows, upto)) for s in range(0, upto, rows)]


def basis_rows(Q: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``[start, stop)`` of a chain's basis ``Q`` ([m, n]) in float64 on ``device``: a view where the basis
    already is float64 there, else a copy of those rows (the basis itself may be on a host or memory-mapped)."""
    return Q[start:stop].to(device=device, dtype=torch.float64, non_blocking=Q.is_pinned())


def orthogonalize(w: torch.Tensor, Q: torch.Tensor, upto: int) -> torch.Tensor:
    """``w`` ([n], float64) made orthogonal to rows ``Q[:upto]`` of one chain's basis ([m, n], any dtype, any
    device): block Gram-Schmidt over the fixed chunks of :func:`basis_chunks`, twice ("twice is enough").

    Each chunk is brought to ``w``'s device in float64 and applied as two matrix-vector products, so the device
    holds one chunk of a basis kept elsewhere, never the whole.
    """
    if upto == 0:
        return w
    chunks = basis_chunks(Q.shape[-1], upto)
    for _ in range(2):
        for start, stop in chunks:
            C = basis_rows(Q, start, stop, w.device)
            w = w - (C @ w) @ C
    return w


def stream_seed(seed: int, *key: int) -> int:
    """The 63-bit seed of the random stream named by ``(seed, *key)``, independent of every other key: the state
    of ``numpy.random.SeedSequence(seed, spawn_key=key)``.

    Raises:
        ValueError: a negative seed or key.
    """
    if int(seed) < 0 or any(int(k) < 0 for k in key):
        msg = f"seeds must be non-negative integers; got seed {seed} and key {key}"
        raise ValueError(msg)
    state = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def chain_groups(p: int, chains_per_pass: int | None) -> list[range]:
    """The consecutive groups of chains that run together (one group when ``chains_per_pass`` is None)."""
    size = p if chains_per_pass is None else max(1, int(chains_per_pass))
    return [range(start, min(p, start + size)) for start in range(0, p, size)]


def _validate(V0: torch.Tensor, steps: int) -> tuple[int, int]:
    if V0.ndim != 2:
        msg = f"the start block must have shape [n, p]; got shape {tuple(V0.shape)}"
        raise ValueError(msg)
    n, p = V0.shape
    if p < 1:
        msg = f"need at least one start vector (p >= 1); got p={p}"
        raise ValueError(msg)
    if not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive integer; got {steps!r}"
        raise ValueError(msg)
    if steps > n:
        msg = f"steps ({steps}) cannot exceed the dimension n ({n}): a Krylov space has at most n dimensions"
        raise ValueError(msg)
    if not torch.isfinite(V0).all():
        msg = "the start block contains non-finite values"
        raise ValueError(msg)
    norms = torch.linalg.vector_norm(V0.double(), dim=0)
    if (norms == 0).any():
        msg = f"start vectors must be non-zero; columns {torch.nonzero(norms == 0).flatten().tolist()} are zero"
        raise ValueError(msg)
    return n, p


class LanczosChains:
    """The state of ``p`` Lanczos chains of one dimension ``n``, advanced one step at a time by the caller.

    The caller multiplies :attr:`current` by the operator and hands the product to :meth:`advance`. This lets
    several groups of chains of different dimensions (e.g. the diagonal blocks of one matrix) share one operator
    call per step (:func:`lanczos_lockstep`), each group storing only its own ``[p, m, n]`` basis. The arithmetic
    of a step is that of :func:`lanczos`, which is this class driven by one ``matmat``. Each chain's vectors are
    separate tensors and each chain's arithmetic its own (see the module docstring).

    Args:
        V0: [n, p] start vectors (normalised here); one chain per column.
        steps: number of Lanczos steps ``m``; ``1 <= m <= n``.
        keep_basis, basis_dtype, basis_device, basis, reorthogonalize, restart_seeds, breakdown_tol: see
            :func:`lanczos`.

    Raises:
        ValueError: bad shapes, ``steps > n``, zero or non-finite start vectors, a basis storage of the wrong
            shape, a wrong number of restart seeds.
    """

    def __init__(
        self,
        V0: torch.Tensor,
        steps: int,
        *,
        keep_basis: bool = False,
        basis_dtype: torch.dtype = torch.float64,
        basis_device: torch.device | str | None = None,
        basis: torch.Tensor | None = None,
        reorthogonalize: bool = True,
        restart_seeds: Sequence[int] | None = None,
        breakdown_tol: float = DEFAULT_BREAKDOWN_TOL,
    ) -> None:
        n, p = _validate(V0, steps)
        device = V0.device
        self.n, self.p, self.steps, self.device = n, p, steps, device
        self.keep_basis = keep_basis
        self.reorthogonalize = reorthogonalize
        self.breakdown_tol = breakdown_tol
        seeds = [stream_seed(0, i) for i in range(p)] if restart_seeds is None else [int(s) for s in restart_seeds]
        if len(seeds) != p:
            msg = f"{len(seeds)} restart seeds for {p} chains"
            raise ValueError(msg)
        self._restart_seeds = seeds
        self._generators: dict[int, torch.Generator] = {}
        if basis is not None and tuple(basis.shape) != (p, steps, n):
            msg = f"the basis storage must have shape [{p}, {steps}, {n}]; got {tuple(basis.shape)}"
            raise ValueError(msg)
        if basis is None and (reorthogonalize or keep_basis):
            where = torch.device(basis_device) if basis_device is not None else device
            basis = torch.empty((p, steps, n), dtype=basis_dtype, device=where)
        self._Q = basis
        self._alpha = torch.zeros((p, steps), dtype=torch.float64, device=device)
        self._beta = torch.zeros((p, max(steps - 1, 0)), dtype=torch.float64, device=device)
        self._restarts = torch.zeros(p, dtype=torch.int64)
        # Separate allocations: every chain's vectors are aligned alike whatever the group (vectorised kernels
        # round by alignment).
        self._v = [(col / torch.linalg.vector_norm(col)).contiguous() for col in V0.to(torch.float64).T]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._v_prev = [torch.zeros_like(v) for v in self._v]
        self._beta_prev = [zero] * p
        self._anorm = [zero] * p
        self._w = list(self._v)
        self._beta_last: torch.Tensor | None = None
        self.step = 0  # steps taken so far

    @property
    def done(self) -> bool:
        """Whether all ``steps`` steps have been taken."""
        return self.step >= self.steps

    @property
    def current(self) -> torch.Tensor:
        """The float64 [n, p] block whose product with the operator :meth:`advance` expects next."""
        return torch.stack(self._v, dim=1)

    def _fresh(self, i: int, upto: int) -> torch.Tensor:
        # A restart vector for chain i, from its own stream, orthogonal to its basis.
        if i not in self._generators:
            self._generators[i] = torch.Generator().manual_seed(self._restart_seeds[i])
        fresh = torch.randn(self.n, dtype=torch.float64, generator=self._generators[i]).to(self.device)
        if self._Q is not None:
            fresh = orthogonalize(fresh, self._Q[i], upto)
        return fresh / torch.linalg.vector_norm(fresh)

    def advance(self, W: torch.Tensor) -> None:
        """Take one step, given ``W = A @ current``.

        Raises:
            RuntimeError: the chains are already done.
            ValueError: ``W`` has the wrong shape.
            FloatingPointError: ``W`` is not finite.
        """
        if self.done:
            msg = f"the chains have already taken all {self.steps} steps"
            raise RuntimeError(msg)
        j, v, Q, p = self.step, self._v, self._Q, self.p
        if Q is not None:
            for i in range(p):
                Q[i, j].copy_(v[i])
        if tuple(W.shape) != (self.n, p):
            msg = f"matmat returned shape {tuple(W.shape)} for an input of shape {(self.n, p)}"
            raise ValueError(msg)
        W = W.to(device=self.device, dtype=torch.float64)
        if not torch.isfinite(W).all():
            msg = f"the operator returned non-finite values at Lanczos step {j}"
            raise FloatingPointError(msg)
        columns = [W[:, i].contiguous() for i in range(p)]
        a = [torch.dot(v[i], columns[i]) for i in range(p)]
        w = [columns[i] - a[i] * v[i] - self._beta_prev[i] * self._v_prev[i] for i in range(p)]
        if self.reorthogonalize:
            w = [orthogonalize(w[i], Q[i], j + 1) for i in range(p)]
        b = [torch.linalg.vector_norm(wi) for wi in w]
        self._alpha[:, j] = torch.stack(a)
        self._anorm = [torch.maximum(self._anorm[i], a[i].abs() + b[i] + self._beta_prev[i]) for i in range(p)]
        self._w = w
        self.step = j + 1
        if self.done:
            self._beta_last = torch.stack(b)
            return
        # One host sync per step (not per batch): restart broken chains with a random orthogonal vector.
        broken = (torch.stack(b) <= self.breakdown_tol * torch.stack(self._anorm)).cpu().tolist()
        v_next = []
        for i in range(p):
            if broken[i]:
                self._restarts[i] += 1
                b[i] = torch.zeros_like(b[i])
                w[i] = self._fresh(i, j + 1)
                v_next.append(w[i])
            else:
                v_next.append(w[i] / b[i])
        self._beta[:, j] = torch.stack(b)
        self._v_prev, self._v, self._beta_prev = v, v_next, b

    def result(self) -> LanczosResult:
        """The tridiagonals (and the basis, if kept) once all steps are taken.

        Raises:
            RuntimeError: steps remain.
        """
        if not self.done:
            msg = f"the chains have taken {self.step} of {self.steps} steps"
            raise RuntimeError(msg)
        return LanczosResult(
            alpha=self._alpha.cpu(),
            beta=self._beta.cpu(),
            residual_norms=self._beta_last.cpu(),
            restarts=self._restarts,
            basis=self._Q if self.keep_basis else None,
            residuals=torch.stack(self._w, dim=1) if self.keep_basis else None,
        )


def merge_results(parts: Sequence[LanczosResult], basis: torch.Tensor | None = None) -> LanczosResult:
    """One :class:`LanczosResult` from the results of consecutive groups of chains (in chain order).

    Args:
        parts: the groups' results, all with the same number of steps.
        basis: the storage all groups wrote their bases into ([p, m, n]), or None (then the groups' bases are
            concatenated, when kept).
    """
    if len(parts) == 1:
        return parts[0]
    kept = parts[0].basis is not None
    if kept and basis is None:
        basis = torch.cat([r.basis for r in parts])
    return LanczosResult(
        alpha=torch.cat([r.alpha for r in parts]),
        beta=torch.cat([r.beta for r in parts]),
        residual_norms=torch.cat([r.residual_norms for r in parts]),
        restarts=torch.cat([r.restarts for r in parts]),
        basis=basis if kept else None,
        residuals=torch.cat([r.residuals for r in parts], dim=1) if kept else None,
    )


GroupMatmat = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


def lanczos_lockstep(
    groups: Sequence[LanczosChains], matmat: GroupMatmat, *, callback: Callable[[int], None] | None = None
) -> list[LanczosResult]:
    """Advance several groups of chains (of different dimensions and lengths) with one operator call per step.

    Args:
        groups: the chains, each group with its own dimension ``n_g``, number of chains ``p_g`` and steps ``m_g``.
        matmat: given one float64 block per group, ``[n_g, p_g]`` for a group still running and ``[n_g, 0]`` for
            one that has taken all its steps, returns their products (same shapes) in one call.
        callback: called with the step index after each step.

    Returns:
        One :class:`LanczosResult` per group, in order.

    Raises:
        ValueError: ``matmat`` returned the wrong number of blocks or a wrong shape.
        FloatingPointError: a non-finite product.
    """
    steps = max((g.steps for g in groups), default=0)
    for j in range(steps):
        blocks = [g.current if not g.done else g.current[:, :0] for g in groups]
        products = list(matmat(blocks))
        if len(products) != len(groups):
            msg = f"matmat returned {len(products)} blocks for {len(groups)} groups"
            raise ValueError(msg)
        for group, product in zip(groups, products, strict=True):
            if not group.done:
                group.advance(product)
        if callback is not None:
            callback(j)
    return [g.result() for g in groups]


def lanczos(
    matmat: Matmat,
    V0: torch.Tensor,
    steps: int,
    *,
    keep_basis: bool = False,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
    basis: torch.Tensor | None = None,
    reorthogonalize: bool = True,
    chains_per_pass: int | None = None,
    restart_seeds: Sequence[int] | None = None,
    breakdown_tol: float = DEFAULT_BREAKDOWN_TOL,
    callback: Callable[[int], None] | None = None,
) -> LanczosResult:
    """Run ``p`` Lanczos chains on a symmetric operator, in lockstep (or in lockstep groups).

    Args:
        matmat: computes ``A @ V`` for a float64 block ``V`` of shape [n, g] on ``V0``'s device (g chains at
            once), returning a tensor of the same shape (any floating dtype; it is promoted to float64).
        V0: [n, p] start vectors (normalised here); one chain per column.
        steps: number of Lanczos steps ``m`` (matmat calls per group); ``1 <= m <= n``.
        keep_basis: keep the Lanczos vectors (needed for Ritz vectors) and return them.
        basis_dtype: dtype of the stored basis: float64 (default), or float32 to halve the memory (the
            recurrence and reorthogonalisation still run in float64 on the working vectors).
        basis_device: where the basis is stored when ``basis`` is not given (default: ``V0``'s device).
        basis: storage for the basis, [p, m, n] of a floating dtype, wherever it lives (a device, host memory, a
            memory-mapped file: see :mod:`hessspec.linalg.basis`); overrides ``basis_dtype``/``basis_device``.
        reorthogonalize: full reorthogonalisation against all previous vectors (twice). Without it the basis
            loses orthogonality and ghost copies of converged eigenvalues appear; only for experiments.
        chains_per_pass: run at most this many chains at once (``matmat`` gets blocks of at most this many
            columns), the groups one after another. None: all at once.
        restart_seeds: one seed per chain: chain ``i`` restarts after a breakdown with vectors from a CPU
            generator seeded with ``restart_seeds[i]``, whatever else runs beside it (default:
            :func:`stream_seed` ``(0, i)``).
        breakdown_tol: a chain has found an invariant subspace when its residual norm is below
            ``breakdown_tol`` times the running estimate of ``||A||``.
        callback: called after each step with the number of steps done before it over all groups (``g * m + j``
            after step ``j`` of group ``g``).

    Returns:
        :class:`LanczosResult`.

    Raises:
        ValueError: bad shapes, ``steps > n``, zero or non-finite start vectors, a wrong ``basis`` shape.
        FloatingPointError: a non-finite ``A @ V``.
    """
    n, p = _validate(V0, steps)
    seeds = [stream_seed(0, i) for i in range(p)] if restart_seeds is None else list(restart_seeds)
    if basis is not None and tuple(basis.shape) != (p, steps, n):
        msg = f"the basis storage must have shape [{p}, {steps}, {n}]; got {tuple(basis.shape)}"
        raise ValueError(msg)
    if basis is None and (reorthogonalize or keep_basis):
        where = torch.device(basis_device) if basis_device is not None else V0.device
        basis = torch.empty((p, steps, n), dtype=basis_dtype, device=where)
    parts = []
    for index, group in enumerate(chain_groups(p, chains_per_pass)):
        chains = LanczosChains(
            V0[:, group.start : group.stop],
            steps,
            keep_basis=keep_basis,
            basis=None if basis is None else basis[group.start : group.stop],
            reorthogonalize=reorthogonalize,
            restart_seeds=seeds[group.start : group.stop],
            breakdown_tol=breakdown_tol,
        )
        for j in range(steps):
            chains.advance(matmat(chains.current))
            if callback is not None:
                callback(index * steps + j)
        parts.append(chains.result())
    return merge_results(parts, basis if keep_basis else None)
