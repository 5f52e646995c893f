"""The Gauss-Newton family beside the Hessian, on the Hessian's data loop.

With ``U`` units (examples, or target tokens for a language model) of per-unit losses ``l_u``, the analysed loss is
``L = (1/U) sum_u l_u`` and its Hessian ``H``. Per batch ``b`` let ``f_b`` be the model's outputs on the batch and
``J_b = d f_b / d theta`` their Jacobian. The family:

- ``ggn``: the generalised Gauss-Newton matrix ``G = (1/U) sum_b J_b^T H_l,b J_b`` with ``H_l,b`` the Hessian of
  the batch's summed loss in the outputs ``f_b``. For cross-entropy on logits (and ``lm``, per token) it equals
  the Fisher information of the model's predictive distribution; for ``mse`` it is ``(2/U) sum_b J_b^T J_b``. The
  split is where the model's output meets the loss: ``nll`` is linear in its input (log-probabilities), so with a
  model ending in ``log_softmax`` G = 0 and R = H; put the softmax into the loss (cross-entropy on the logits) to
  get the Fisher.
- ``empirical-fisher``: ``F = (1/U) sum_u g_u g_u^T`` with ``g_u = d l_u / d theta`` the per-unit gradients.
- ``gradient-covariance``: ``C = F - g g^T`` with ``g = (1/U) sum_u g_u`` the gradient of ``L``: the covariance of
  the per-unit gradients (the uncentred ``F`` minus the outer product of their mean).
- ``residual``: ``R = H - G``, the part of the Hessian that involves the second derivatives of the network.

**BatchNorm in train mode.** The outputs of a batch then depend on all its examples through the batch statistics.
``J_b`` is the Jacobian of the whole batch's outputs (all examples' outputs with respect to the parameters, through
the batch statistics), so ``G`` is ``J_b^T H_l,b J_b`` summed over batches, not a sum of per-example terms
``J_i^T H_l,i J_i``; ``H = G + R`` still holds exactly. Likewise ``g_u`` is the gradient of unit ``u``'s loss
including its dependence, through the batch statistics, on the other examples of its batch, and
``sum_u g_u`` is still ``U`` times the gradient. In "eval" and "population" modes the statistics are constants and
every term is per example.

**Products, no Jacobian materialised.** Per batch, one forward pass with its autograd graph serves all columns
of all members of the family: ``J V`` by the double-backward trick (``w = J^T u`` with a dummy ``u``, then
``J v = d(w . v)/du``), ``H_l (J V)`` by differentiating the loss twice in the outputs, and ``J^T (.)`` by one
backward per column; ``F V = J_l^T J_l V / U`` with ``J_l`` the Jacobian of the vector of the batch's per-unit
losses (the same trick on that vector), which is exact in every BatchNorm mode. The Hessian's columns are computed
as by :class:`~hessspec.curvature.hessian.HessianOperator` (its strategy, its own forward); ``R V = H V - G V``.
All columns of all requested matrices share one pass over the data, accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hessspec.curvature.compiled import warn_once
from hessspec.curvature.hessian import HessianOperator
from hessspec.curvature.losses import prediction
from hessspec.curvature.problem import Batch

CURVATURES = ("hessian", "ggn", "empirical-fisher", "gradient-covariance", "residual")
# Which products each curvature's columns need: the Hessian ("H"), the Gauss-Newton matrix ("G"), the empirical
# Fisher ("F").
_NEEDS = {
    "hessian": ("H",),
    "ggn": ("G",),
    "empirical-fisher": ("F",),
    "gradient-covariance": ("F",),
    "residual": ("H", "G"),
}


def check_curvature(curvature: str) -> None:
    """Raise ValueError unless ``curvature`` is one of :data:`CURVATURES`."""
    if curvature not in CURVATURES:
        msg = f"curvature must be one of {', '.join(CURVATURES)}; got {curvature!r}"
        raise ValueError(msg)


def _jacobian_columns(y: torch.Tensor, theta: torch.Tensor, V: torch.Tensor) -> list[torch.Tensor]:
    """``J v`` for each column ``v`` of ``V`` with ``J = dy/dtheta``, by double backward (no Jacobian formed)."""
    u = torch.zeros_like(y, requires_grad=True)
    (w,) = torch.autograd.grad(y, theta, u, create_graph=True, allow_unused=True)
    if w is None or not w.requires_grad:  # y does not depend on theta
        return [torch.zeros_like(y) for _ in range(V.shape[1])]
    last = V.shape[1] - 1
    return [torch.autograd.grad(w, u, V[:, i], retain_graph=i < last)[0] for i in range(V.shape[1])]


def _transpose_columns(y: torch.Tensor, theta: torch.Tensor, columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """``J^T z`` for each ``z`` of ``columns`` (shaped like ``y``), stacked as [n, len(columns)]."""
    out = []
    for z in columns:
        (t,) = torch.autograd.grad(y, theta, z, retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(theta) if t is None else t)
    return torch.stack(out, dim=1)


class CurvatureOperator(HessianOperator):
    """The Hessian or a member of its Gauss-Newton family, over one data loop (see the module docstring).

    ``op @ V`` is the product with the matrix named by ``curvature``; :meth:`products` computes the products of
    several members with their own blocks of columns in one pass over the data. The other arguments are those of
    :class:`~hessspec.curvature.hessian.HessianOperator`; with ``curvature="hessian"`` the products are exactly
    (bitwise) the Hessian operator's.

    Args:
        model, batches, loss_fn: as for :class:`~hessspec.curvature.hessian.HessianOperator` (its ``loss`` keyword
            too: the family uses the loss's per-unit losses, :meth:`hessspec.curvature.losses.Loss.per_unit`).
        curvature: one of :data:`CURVATURES` (default "hessian").
        **kwargs: the keyword arguments of :class:`~hessspec.curvature.hessian.HessianOperator`.

    Raises:
        ValueError: an unknown curvature, and see
            :class:`~hessspec.curvature.hessian.HessianOperator`.
    """

    def __init__(self, model, batches, loss_fn=None, *, curvature: str = "hessian", **kwargs) -> None:
        check_curvature(curvature)
        super().__init__(model, batches, loss_fn, **kwargs)
        self.curvature = curvature
        self._mean_gradient: torch.Tensor | None = None
        self._eager_family: list[str] = []  # curvatures whose G or F columns ran eagerly under ``compile``

    # -- per-batch functions --------------------------------------------------------------------------------
    def _batch_gauss_newton(self, VG: torch.Tensor, VF: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
        """``[G_b VG, F_b VF]`` for one batch, of its summed loss times ``scale``, from one forward pass."""
        theta = self.theta.detach().requires_grad_(True)
        parts = []
        with torch.enable_grad():
            # The loss as a function of the output tensor (the logits of a structured model output).
            out = prediction(self._forward(theta, batch), self.loss.name)
            if VG.shape[1]:
                JV = _jacobian_columns(out, theta, VG)
                o = out.detach().requires_grad_(True)
                (gl,) = torch.autograd.grad(self.loss(o, batch), o, create_graph=True)
                HJV = [
                    torch.autograd.grad(gl, o, jv, retain_graph=True, allow_unused=True)[0]
                    if gl.requires_grad
                    else None
                    for jv in JV
                ]
                HJV = [torch.zeros_like(o) if t is None else t * scale for t in HJV]
                parts.append(_transpose_columns(out, theta, HJV))
            if VF.shape[1]:
                losses = self.loss.per_unit(out, batch)
                JlV = _jacobian_columns(losses, theta, VF)
                parts.append(_transpose_columns(losses, theta, [t * scale for t in JlV]))
        return torch.cat(parts, dim=1)

    # -- the shared data loop ------------------------------------------------------------------------------
    def remember_gradient(self, gradient: torch.Tensor) -> None:
        """Use ``gradient`` (from :meth:`loss_and_gradient`) as the mean gradient of the gradient covariance."""
        self._mean_gradient = gradient.to(device=self.device, dtype=torch.float64)

    def mean_gradient(self) -> torch.Tensor:
        """The gradient of the mean loss (float64 [n]), computed once and kept (for the gradient covariance)."""
        if self._mean_gradient is None:
            self._mean_gradient = self.loss_and_gradient().gradient
        return self._mean_gradient

    def products(self, columns: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The products of several members of the family with their own columns, in one pass over the data.

        Args:
            columns: ``{curvature: V}`` with ``V`` of shape [n, p_curvature] (p may differ, and be 0).

        Returns:
            ``{curvature: M V}``, float64 on the operator's device.

        Raises:
            ValueError: an unknown curvature or a bad block.
        """
        for name, V in columns.items():
            check_curvature(name)
            if V.ndim != 2 or V.shape[0] != self.n:
                msg = f"expected a block of shape [{self.n}, p] for {name!r}; got {tuple(V.shape)}"
                raise ValueError(msg)
        if set(columns) <= {"hessian"} and "hessian" in columns:
            return {"hessian": HessianOperator._matmat(self, columns["hessian"].to(self.device))}
        stacks: dict[str, list[tuple[str, torch.Tensor]]] = {"H": [], "G": [], "F": []}
        for name, V in columns.items():
            for kind in _NEEDS[name]:
                stacks[kind].append((name, V))
        blocks = {
            kind: torch.cat([V.to(device=self.device, dtype=self.dtype) for _, V in items], dim=1)
            if items
            else torch.zeros(self.n, 0, dtype=self.dtype, device=self.device)
            for kind, items in stacks.items()
        }
        widths = {kind: block.shape[1] for kind, block in blocks.items()}
        if self._compiled is not None and (widths["G"] or widths["F"]):
            self._note_eager_family([name for name in columns if name != "hessian"])
        # Column-major, so that each column (a backward's grad_outputs) is contiguous, once per product.
        blocks = {kind: block.T.contiguous().T for kind, block in blocks.items()}
        total = sum(widths.values())

        def compute(strategy: str) -> torch.Tensor:
            def per_batch(batch: Batch, scale: float) -> torch.Tensor:
                parts = []
                if widths["H"]:
                    parts.append(self._batch_hvp(blocks["H"], batch, scale, strategy))
                if widths["G"] or widths["F"]:
                    parts.append(self._batch_gauss_newton(blocks["G"], blocks["F"], batch, scale))
                return torch.cat(parts, dim=1)

            return self._accumulate(per_batch, (self.n, total))

        acc = self._reduce(self._run(compute))
        self._finish_gradient_check()
        split = dict(zip(("H", "G", "F"), acc.split([widths["H"], widths["G"], widths["F"]], dim=1), strict=True))
        taken = {kind: 0 for kind in split}
        per_kind: dict[tuple[str, str], torch.Tensor] = {}
        for kind, items in stacks.items():
            for name, V in items:
                per_kind[(name, kind)] = split[kind][:, taken[kind] : taken[kind] + V.shape[1]]
                taken[kind] += V.shape[1]
        result = {}
        for name, V in columns.items():
            if name == "residual":
                result[name] = per_kind[(name, "H")] - per_kind[(name, "G")]
            elif name == "gradient-covariance":
                g = self.mean_gradient()
                result[name] = per_kind[(name, "F")] - torch.outer(g, g @ V.to(device=self.device, dtype=torch.float64))
            else:
                result[name] = per_kind[(name, _NEEDS[name][0])]
        return result

    def _note_eager_family(self, names: Sequence[str]) -> None:
        new = [name for name in names if name not in self._eager_family]
        if new:
            self._eager_family += new
            warn_once(
                f"--compile: the Gauss-Newton family's products ({', '.join(self._eager_family)}) run eagerly; only "
                "the Hessian's are compiled"
            )

    def recorded_settings(self) -> dict[str, Any]:
        """As :meth:`HessianOperator.recorded_settings`, plus ``compile_eager``: the curvatures whose Gauss-Newton
        products ran eagerly under ``compile`` (they are not compiled), if any."""
        recorded = super().recorded_settings()
        if self._eager_family:
            recorded["compile_eager"] = ", ".join(self._eager_family)
        return recorded

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.products({self.curvature: V})[self.curvature]
