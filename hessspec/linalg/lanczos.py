"""Block-parallel Lanczos tridiagonalisation with full reorthogonalisation, in float64.

``lanczos`` runs ``p`` independent Lanczos chains in lockstep: at every step one call of ``matmat`` on an
``[n, p]`` block advances all of them, so one pass over the data serves all probes. It takes a callable and a
start block, never a model. :class:`LanczosChains` is the stepping state behind it, and
:func:`lanczos_lockstep` advances several groups of chains of different dimensions (the diagonal blocks of a
matrix, several matrices) with one operator call per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

Matmat = Callable[[torch.Tensor], torch.Tensor]

# A chain breaks down when its new residual is below this fraction of the running estimate of ||A||: with full
# reorthogonalisation in float64 the residual of an exhausted invariant subspace is O(eps * ||A||), ~1e-15.
DEFAULT_BREAKDOWN_TOL = 1e-10


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
        basis: [p, m, n] (rows are the Lanczos vectors) in the requested dtype and device, or None.
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
    n: int, steps: int, probes: int, basis_dtype: torch.dtype = torch.float64
) -> dict[str, int]:
    """Bytes needed by :func:`lanczos`: the bases plus the float64 working block (a few ``[n, p]`` arrays)."""
    return {"basis": basis_bytes(n, steps, probes, basis_dtype), "work": 6 * int(n) * int(probes) * 8}


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


_CAST_CHUNK = 16  # basis rows cast to float64 at a time when the basis is stored in float32


def _orthogonalize(W: torch.Tensor, Q: torch.Tensor, upto: int) -> torch.Tensor:
    """Classical Gram-Schmidt of each column ``W[:, i]`` against rows ``Q[i, :upto]``, twice ("twice is enough").

    Runs where the basis lives (a host-resident basis costs two [n, p] transfers per step, not a copy of the
    basis); a float32 basis is cast to float64 in chunks, so no float64 copy of the whole basis is ever made.
    """
    if upto == 0:
        return W
    Wq = W.to(Q.device)
    for _ in range(2):
        if Q.dtype == torch.float64:
            B = Q[:, :upto]  # [p, j, n]
            h = torch.bmm(B, Wq.T.unsqueeze(-1))  # [p, j, 1]
            Wq = Wq - torch.bmm(B.transpose(1, 2), h).squeeze(-1).T
        else:
            starts = range(0, upto, _CAST_CHUNK)
            hs = [torch.bmm(Q[:, s : s + _CAST_CHUNK][:, : upto - s].double(), Wq.T.unsqueeze(-1)) for s in starts]
            for s, h in zip(starts, hs, strict=True):
                B = Q[:, s : s + _CAST_CHUNK][:, : upto - s].double()
                Wq = Wq - torch.bmm(B.transpose(1, 2), h).squeeze(-1).T
    return Wq.to(W.device)


class LanczosChains:
    """The state of ``p`` Lanczos chains of one dimension ``n``, advanced one step at a time by the caller.

    The caller multiplies :attr:`current` by the operator and hands the product to :meth:`advance`. This lets
    several groups of chains of different dimensions (e.g. the diagonal blocks of one matrix) share one operator
    call per step (:func:`lanczos_lockstep`), each group storing only its own ``[p, m, n]`` basis. The arithmetic
    of a step is that of :func:`lanczos`, which is this class driven by one ``matmat``.

    Args:
        V0: [n, p] start vectors (normalised here); one chain per column.
        steps: number of Lanczos steps ``m``; ``1 <= m <= n``.
        keep_basis, basis_dtype, basis_device, reorthogonalize, generator, breakdown_tol: see :func:`lanczos`.

    Raises:
        ValueError: bad shapes, ``steps > n``, zero or non-finite start vectors.
    """

    def __init__(
        self,
        V0: torch.Tensor,
        steps: int,
        *,
        keep_basis: bool = False,
        basis_dtype: torch.dtype = torch.float64,
        basis_device: torch.device | str | None = None,
        reorthogonalize: bool = True,
        generator: torch.Generator | None = None,
        breakdown_tol: float = DEFAULT_BREAKDOWN_TOL,
    ) -> None:
        n, p = _validate(V0, steps)
        device = V0.device
        self.n, self.p, self.steps, self.device = n, p, steps, device
        self.keep_basis = keep_basis
        self.reorthogonalize = reorthogonalize
        self.breakdown_tol = breakdown_tol
        self._basis_dtype = basis_dtype
        self._basis_device = torch.device(basis_device) if basis_device is not None else device
        self._generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
        store = reorthogonalize or keep_basis
        self._Q = torch.empty((p, steps, n), dtype=basis_dtype, device=self._basis_device) if store else None
        self._alpha = torch.zeros((p, steps), dtype=torch.float64, device=device)
        self._beta = torch.zeros((p, max(steps - 1, 0)), dtype=torch.float64, device=device)
        self._restarts = torch.zeros(p, dtype=torch.int64)
        v = V0.to(torch.float64)
        self._v = v / torch.linalg.vector_norm(v, dim=0)
        self._v_prev = torch.zeros_like(self._v)
        self._beta_prev = torch.zeros(p, dtype=torch.float64, device=device)
        self._anorm = torch.zeros(p, dtype=torch.float64, device=device)
        self._w = self._v
        self._beta_last: torch.Tensor | None = None
        self.step = 0  # steps taken so far

    @property
    def done(self) -> bool:
        """Whether all ``steps`` steps have been taken."""
        return self.step >= self.steps

    @property
    def current(self) -> torch.Tensor:
        """The float64 [n, p] block whose product with the operator :meth:`advance` expects next."""
        return self._v

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
        j, v, Q = self.step, self._v, self._Q
        if Q is not None:
            Q[:, j] = v.T.to(device=self._basis_device, dtype=self._basis_dtype)
        if W.shape != v.shape:
            msg = f"matmat returned shape {tuple(W.shape)} for an input of shape {tuple(v.shape)}"
            raise ValueError(msg)
        w = W.to(device=self.device, dtype=torch.float64)
        if not torch.isfinite(w).all():
            msg = f"the operator returned non-finite values at Lanczos step {j}"
            raise FloatingPointError(msg)
        a = (v * w).sum(dim=0)
        w = w - a * v - self._beta_prev * self._v_prev
        if self.reorthogonalize:
            w = _orthogonalize(w, Q, j + 1)
        self._alpha[:, j] = a
        b = torch.linalg.vector_norm(w, dim=0)
        self._anorm = torch.maximum(self._anorm, a.abs() + b + self._beta_prev)
        self._w = w
        self.step = j + 1
        if self.done:
            self._beta_last = b
            return
        broken = b <= self.breakdown_tol * self._anorm
        # One host sync per step (not per batch): restart broken chains with a random orthogonal vector.
        if bool(broken.any()):
            fresh = torch.randn(self.n, self.p, dtype=torch.float64, device=self.device, generator=self._generator)
            fresh = _orthogonalize(fresh, Q, j + 1)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=0)
            w = torch.where(broken, fresh, w)
            b = torch.where(broken, torch.zeros_like(b), b)
            self._restarts += broken.cpu().to(torch.int64)
            v_next = torch.where(broken, fresh, w / torch.where(broken, torch.ones_like(b), b))
        else:
            v_next = w / b
        self._beta[:, j] = b
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
            residuals=self._w if self.keep_basis else None,
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
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    breakdown_tol: float = DEFAULT_BREAKDOWN_TOL,
    callback: Callable[[int], None] | None = None,
) -> LanczosResult:
    """Run ``p`` Lanczos chains in lockstep on a symmetric operator.

    Args:
        matmat: computes ``A @ V`` for a float64 block ``V`` of shape [n, p] on ``V0``'s device, returning
            a tensor of the same shape (any floating dtype; it is promoted to float64).
        V0: [n, p] start vectors (normalised here); one chain per column.
        steps: number of Lanczos steps ``m`` (matmat calls); ``1 <= m <= n``.
        keep_basis: keep the Lanczos vectors (needed for Ritz vectors) and return them.
        basis_dtype: dtype of the stored basis: float64 (default), or float32 to halve the memory (the
            recurrence and reorthogonalisation still run in float64 on the working block).
        basis_device: where the basis is stored (default: ``V0``'s device; "cpu" to keep a GPU free).
        reorthogonalize: full reorthogonalisation against all previous vectors (twice). Without it the basis
            loses orthogonality and ghost copies of converged eigenvalues appear; only for experiments.
        generator: random source for restart vectors after a breakdown (default: a fixed seed, so that results
            are reproducible).
        breakdown_tol: a chain has found an invariant subspace when its residual norm is below
            ``breakdown_tol`` times the running estimate of ``||A||``.
        callback: called with the step index after each step (progress bars).

    Returns:
        :class:`LanczosResult`.

    Raises:
        ValueError: bad shapes, ``steps > n``, zero or non-finite start vectors, or a non-finite ``A @ V``.
    """
    chains = LanczosChains(
        V0,
        steps,
        keep_basis=keep_basis,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        reorthogonalize=reorthogonalize,
        generator=generator,
        breakdown_tol=breakdown_tol,
    )
    for j in range(steps):
        chains.advance(matmat(chains.current))
        if callback is not None:
            callback(j)
    return chains.result()
