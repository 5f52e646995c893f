"""Dense float64 references: exact Hessians of tiny problems, built independently of hessspec's operator.

References use ``torch.autograd.functional.hessian`` (double backward) on the full-data loss, never
``torch.func.hessian``, which is wrong through train-mode BatchNorm (see DESIGN.md, "Pitfalls").
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def tiny_mlp(bn: bool, dropout: float = 0.0) -> nn.Module:
    """Linear-[BN]-tanh-Linear-[BN]-tanh-Linear: 6 inputs, 3 classes, about 100 parameters."""
    layers: list[nn.Module] = [nn.Linear(6, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 3))
    return nn.Sequential(*layers).double()


def tiny_cnn(bn: bool) -> nn.Module:
    """Two 3x3 convolutions with [BN] and tanh on 1x6x6 inputs, then a linear head: about 170 parameters."""
    layers: list[nn.Module] = [nn.Conv2d(1, 2, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(2))
    layers += [nn.Tanh(), nn.Conv2d(2, 3, 3, stride=2, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)]
    return nn.Sequential(*layers).double()


def make_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def warm_running_stats(model: nn.Module, x: torch.Tensor, passes: int = 3) -> None:
    """Give BatchNorm layers non-trivial running statistics (train-mode forward passes, no grad)."""
    was = model.training
    model.train()
    with torch.no_grad():
        for i in range(passes):
            model(x[i::passes] * (1.0 + 0.3 * i) + 0.1 * i)
    model.train(was)


def flat_params(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names = [k for k, _ in model.named_parameters()]
    return names, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflatten(model: nn.Module, names: list[str], theta: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out, i = {}, 0
    for k in names:
        n = params[k].numel()
        out[k] = theta[i : i + n].view(params[k].shape)
        i += n
    return out


def module_outputs(model: nn.Module, mode: str):
    """``(out, theta)``: ``out(th, x)`` is the model's output on ``x`` as a function of the flat parameters ``th``,
    through a copy of the nn.Module in train mode ("train": batch statistics; its running-statistics updates are
    harmless) or eval mode ("eval"). Dropout layers must be absent (they would be random in train mode)."""
    m = copy.deepcopy(model)
    m.train(mode == "train")
    names, theta = flat_params(m)
    buffers = dict(m.named_buffers())

    def out(th: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(m, {**_unflatten(m, names, th), **buffers}, (x,))

    return out, theta


def cross_entropy_per_unit(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, y, reduction="none")


def module_loss(model: nn.Module, batches, mode: str, per_unit=cross_entropy_per_unit):
    """Full-data mean loss as a function of the flat parameters, through the nn.Module itself (see
    :func:`module_outputs` for ``mode``); ``per_unit(output, y)`` gives the vector of per-unit losses."""
    out, theta = module_outputs(model, mode)
    total = sum(len(per_unit(out(theta, x), y)) for x, y in batches)

    def f(th: torch.Tensor) -> torch.Tensor:
        return sum(per_unit(out(th, x), y).sum() for x, y in batches) / total

    return f, theta


def dense_ggn(model: nn.Module, batches, mode: str, per_unit=cross_entropy_per_unit) -> torch.Tensor:
    """``G = (1/U) sum_b J_b^T H_l,b J_b`` from explicit Jacobians of each batch's whole output
    (``torch.autograd.functional.jacobian``) and the Hessian of its summed loss in the outputs."""
    out, theta = module_outputs(model, mode)
    n, total, G = theta.numel(), 0, torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for x, y in batches:
        J = torch.autograd.functional.jacobian(lambda th, x=x: out(th, x), theta).reshape(-1, n)
        o = out(theta, x).detach()
        Hl = torch.autograd.functional.hessian(lambda o_, y=y: per_unit(o_, y).sum(), o)
        G += J.T @ Hl.reshape(J.shape[0], J.shape[0]) @ J
        total += len(per_unit(o, y))
    return G / total


def per_unit_gradients(model: nn.Module, batches, mode: str, per_unit=cross_entropy_per_unit) -> torch.Tensor:
    """[U, n]: the gradient of each unit's loss, one ``torch.autograd.grad`` per unit (each unit's loss evaluated
    on its whole batch, so in train mode it depends on the batch statistics)."""
    out, theta = module_outputs(model, mode)
    rows = []
    for x, y in batches:
        th = theta.clone().requires_grad_(True)
        losses = per_unit(out(th, x), y)
        rows += [torch.autograd.grad(losses[i], th, retain_graph=True)[0] for i in range(len(losses))]
    return torch.stack(rows)


def dense_hessian(f, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(f, theta)


def manual_mlp_loss(model: nn.Module, batches, stats: str):
    """The tiny BN MLP written out by hand, BatchNorm formula included.

    stats "batch": each mini-batch's biased statistics; "population": statistics over all examples, computed
    layer by layer with the earlier layers already normalised by theirs.
    """
    names, theta = flat_params(model)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    eps = [m.eps for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    total = sum(len(x) for x, _ in batches)
    x_all = torch.cat([x for x, _ in batches])

    def bn(h, mean, var, w, b, e):
        return (h - mean) / torch.sqrt(var + e) * w + b

    def forward(P, x, pop):
        h = x @ P["0.weight"].T + P["0.bias"]
        mean, var = pop[0] if pop else (h.mean(0), h.var(0, unbiased=False))
        h = torch.tanh(bn(h, mean, var, P["1.weight"], P["1.bias"], eps[0]))
        h = h @ P["3.weight"].T + P["3.bias"]
        mean, var = pop[1] if pop else (h.mean(0), h.var(0, unbiased=False))
        h = torch.tanh(bn(h, mean, var, P["4.weight"], P["4.bias"], eps[1]))
        return h @ P["6.weight"].T + P["6.bias"]

    def population(P):
        # Statistics are constants of the analysed network: computed from the fixed parameters, not differentiated.
        with torch.no_grad():
            h = x_all @ P["0.weight"].T + P["0.bias"]
            s0 = (h.mean(0), h.var(0, unbiased=False))
            h = torch.tanh(bn(h, *s0, P["1.weight"], P["1.bias"], eps[0]))
            h = h @ P["3.weight"].T + P["3.bias"]
            s1 = (h.mean(0), h.var(0, unbiased=False))
        return [s0, s1]

    def unflat(th):
        out, i = {}, 0
        for k in names:
            n = int(np.prod(shapes[k]))
            out[k] = th[i : i + n].view(shapes[k])
            i += n
        return out

    pop = population(unflat(theta)) if stats == "population" else None

    def f(th):
        P = unflat(th)
        return sum(F.cross_entropy(forward(P, x, pop), y) * (len(x) / total) for x, y in batches)

    return f, theta


def symmetric_with_spectrum(eigenvalues, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense symmetric float64 matrix ``U diag(eigenvalues) U^T`` with a random orthogonal ``U``."""
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), dtype=torch.float64, generator=g))
    return (U * ev) @ U.T, U


def wasserstein1(nodes_a, weights_a, nodes_b, weights_b) -> float:
    """1-Wasserstein distance between two discrete measures on the line (integral of |F_a - F_b|)."""
    xa, wa = np.ravel(nodes_a), np.ravel(weights_a) / np.sum(weights_a)
    xb, wb = np.ravel(nodes_b), np.ravel(weights_b) / np.sum(weights_b)
    x = np.concatenate([xa, xb])
    w = np.concatenate([wa, -wb])
    order = np.argsort(x, kind="stable")
    x, cdf_diff = x[order], np.cumsum(w[order])
    return float(np.sum(np.abs(cdf_diff[:-1]) * np.diff(x)))


def trained_digits_mlp(hidden: int, steps: int = 200):
    """A 64-hidden-hidden-10 tanh MLP in float64 after ``steps`` SGD steps (lr 0.1, batches of 64) on scikit-learn's
    digits; returns ``(model, x, y)`` with the standardised inputs and labels of all 1,797 examples."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x, y
