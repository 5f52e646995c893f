"""The Gauss-Newton family against dense float64 references built from explicit Jacobians and per-unit gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from hessspec.curvature.gauss_newton import CURVATURES, CurvatureOperator
from tests import reference as ref
from tests.test_operators import BATCH, _data, _model, _relerr

# float64 products of ~100-170 parameter networks against references that are exact up to rounding: O(1e-15)
# relative; 1e-12 leaves three orders of magnitude for accumulation over batches.
RTOL64 = 1e-12
CASES = [("mlp", False, "train"), ("mlp", True, "train"), ("mlp", True, "eval"), ("mlp", True, "population")]
CASES += [("cnn", False, "train"), ("cnn", True, "train"), ("cnn", True, "eval"), ("cnn", True, "population")]


def _references(model, batches, op, per_unit=ref.cross_entropy_per_unit):
    """Dense H, G, F and C of the operator's problem, built independently of the operator."""
    if op.bn_mode == "population":
        # The operator's copy holds the population statistics (tested in test_operators) and uses them as
        # constants, as eval mode does with running statistics.
        module, mode = copy.deepcopy(op._model), "eval"
    else:
        module, mode = model, op.bn_mode
    f, theta = ref.module_loss(module, batches, mode, per_unit)
    H = ref.dense_hessian(f, theta)
    G = ref.dense_ggn(module, batches, mode, per_unit)
    grads = ref.per_unit_gradients(module, batches, mode, per_unit)
    F = grads.T @ grads / len(grads)
    mean = grads.mean(0)
    return {"hessian": H, "ggn": G, "empirical-fisher": F, "gradient-covariance": F - torch.outer(mean, mean),
            "residual": H - G}  # fmt: skip


@pytest.mark.parametrize(("kind", "bn", "bn_mode"), CASES)
def test_every_curvature_matches_its_dense_matrix(kind, bn, bn_mode):
    x, y = _data(kind)
    model = _model(kind, bn)
    if bn:
        ref.warm_running_stats(model, x)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches, bn_mode=bn_mode, block_strategy="reverse")
    dense = _references(model, batches, op)
    for curvature in CURVATURES:
        op.curvature = curvature
        assert _relerr(op.to_dense(), dense[curvature]) <= RTOL64, curvature
    # The mean of the per-unit gradients is the operator's gradient; G and F are positive semi-definite.
    grads = ref.per_unit_gradients(*((copy.deepcopy(op._model), batches, "eval") if bn_mode == "population"
                                     else (model, batches, bn_mode)))  # fmt: skip
    assert _relerr(op.loss_and_gradient().gradient, grads.mean(0)) <= RTOL64
    for name in ("ggn", "empirical-fisher", "gradient-covariance"):
        assert float(torch.linalg.eigvalsh(dense[name])[0]) >= -1e-12 * float(dense[name].abs().max())


def test_products_of_several_curvatures_share_one_pass_and_equal_each_alone():
    x, y = _data("mlp")
    model = _model("mlp", True)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches, block_strategy="reverse")
    gen = torch.Generator().manual_seed(3)
    columns = {name: torch.randn(op.n, 1 + i, dtype=torch.float64, generator=gen) for i, name in enumerate(CURVATURES)}
    op.mean_gradient()  # the gradient covariance needs the gradient: one pass, once, before the products
    calls = []
    handle = op._model.register_forward_hook(lambda *_: calls.append(1))
    try:
        together = op.products(columns)
        forwards = len(calls)
    finally:
        handle.remove()
    # One pass: a forward per batch for the Hessian's columns, one per batch shared by G, F, C and R.
    assert forwards == 2 * len(batches)
    for name, V in columns.items():
        op.curvature = name
        assert _relerr(together[name], op @ V) <= 1e-14, name


def test_hessian_curvature_is_bitwise_the_hessian_operator():
    from hessspec.curvature.hessian import HessianOperator

    x, y = _data("cnn")
    model = _model("cnn", True)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches)
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(op @ V, HessianOperator(model, batches) @ V)


def test_unknown_curvature_is_refused():
    x, y = _data("mlp")
    with pytest.raises(ValueError, match="curvature must be one of"):
        CurvatureOperator(_model("mlp", False), ref.make_batches(x, y, BATCH), curvature="fisher")


def _mse_per_unit(output, y):
    return (output - y).square().sum(1)  # summed over outputs, averaged over examples (the "mse" loss)


def _nll_per_unit(output, y):
    return torch.nn.functional.nll_loss(output, y, reduction="none")


def _lm_per_unit(output, y):
    # Next-token cross-entropy over the target tokens that are not ignored (-100): one unit per target token.
    logits, targets = output[:, :-1].reshape(-1, output.shape[-1]), y[:, 1:].reshape(-1)
    kept = targets != -100
    return torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="none")


def _loss_problem(loss: str, bn: bool):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    if loss == "lm":  # a tiny token model: 7-token vocabulary, sequences of 5, some targets ignored, batches of 4
        x = torch.randint(0, 7, (11, 5), generator=g)
        y = x.clone()
        y[::3, 2] = -100
        layers = [torch.nn.Embedding(7, 4), torch.nn.Tanh(), torch.nn.Linear(4, 7)]
        return torch.nn.Sequential(*layers).double(), x, y, _lm_per_unit, 4
    x = torch.randn(37, 6, dtype=torch.float64, generator=g)
    model = ref.tiny_mlp(bn)
    if loss == "mse":
        return model, x, torch.randn(37, 3, dtype=torch.float64, generator=g), _mse_per_unit, BATCH
    model = torch.nn.Sequential(*model, torch.nn.LogSoftmax(dim=1))
    return model, x, torch.randint(0, 3, (37,), generator=g), _nll_per_unit, BATCH


@pytest.mark.parametrize(("loss", "bn"), [("mse", False), ("mse", True), ("nll", True), ("lm", False)])
def test_every_curvature_for_every_loss(loss, bn):
    """Units are examples for mse and nll, target tokens for lm (unequal across batches: some are ignored)."""
    model, x, y, per_unit, batch_size = _loss_problem(loss, bn)
    batches = ref.make_batches(x, y, batch_size)
    op = CurvatureOperator(model, batches, loss=loss, bn_mode="train", block_strategy="reverse")
    dense = _references(model, batches, op, per_unit)
    scale = float(torch.linalg.matrix_norm(dense["hessian"]))
    for curvature in CURVATURES:
        op.curvature = curvature
        M = op.to_dense()
        if loss == "nll" and curvature == "ggn":
            # nll is linear in the model's outputs (log-probabilities): H_l = 0, so G = 0 exactly and R = H.
            assert float(dense["ggn"].abs().max()) == 0.0 and float(M.abs().max()) == 0.0
            continue
        assert float(torch.linalg.matrix_norm(M - dense[curvature])) <= RTOL64 * scale, curvature
        assert _relerr(M, dense[curvature]) <= RTOL64, curvature
