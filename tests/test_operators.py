"""HessianOperator against exact dense Hessians in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hessspec.curvature.hessian import DeterminismError, HessianOperator
from tests import reference as ref

# float64 products of ~100-300 parameter networks: both sides are exact up to rounding, so the relative Frobenius
# error is O(1e-15); 1e-12 leaves three orders of magnitude for accumulation over batches.
RTOL64 = 1e-12
N_EXAMPLES, BATCH = 37, 16  # batches of 16, 16 and 5: the unequal last batch must be weighted exactly


def _data(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (N_EXAMPLES, 6) if kind == "mlp" else (N_EXAMPLES, 1, 6, 6)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N_EXAMPLES,), generator=g)
    return x, y


def _model(kind: str, bn: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ref.tiny_mlp(bn) if kind == "mlp" else ref.tiny_cnn(bn)
    return m


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("strategy", ["traced", "vmap", "loop", "reverse"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(("bn", "bn_mode"), [(False, "train"), (True, "train"), (True, "eval")])
def test_dense_hessian_matches_double_backward(kind, bn, bn_mode, strategy):
    x, y = _data(kind)
    model = _model(kind, bn)
    if bn:
        ref.warm_running_stats(model, x)
    batches = ref.make_batches(x, y, BATCH)
    op = HessianOperator(model, batches, bn_mode=bn_mode, block_strategy=strategy)
    f, theta = ref.module_loss(model, batches, "train" if bn_mode == "train" else "eval")
    H_ref = ref.dense_hessian(f, theta)
    H = op.to_dense()
    assert _relerr(H, H_ref) <= RTOL64
    # One vector, one block: same numbers as the dense columns.
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _relerr(op.matvec(v), H_ref @ v) <= RTOL64
    V = torch.randn(op.n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _relerr(op @ V, H_ref @ V) <= RTOL64


@pytest.mark.parametrize("stats", ["batch", "population"])
def test_bn_modes_match_handwritten_network(stats):
    """Second, independent reference: the BN MLP written out by hand (BatchNorm formula included)."""
    x, y = _data("mlp")
    model = _model("mlp", True)
    ref.warm_running_stats(model, x)
    batches = ref.make_batches(x, y, BATCH)
    op = HessianOperator(model, batches, bn_mode="train" if stats == "batch" else "population")
    f, theta = ref.manual_mlp_loss(model, batches, stats)
    assert _relerr(op.to_dense(), ref.dense_hessian(f, theta)) <= RTOL64
    loss, g = op.loss_and_gradient()
    theta = theta.clone().requires_grad_()
    loss_ref = f(theta)
    g_ref = torch.autograd.grad(loss_ref, theta)[0]
    assert loss == pytest.approx(float(loss_ref.detach()), rel=1e-14)
    assert _relerr(g, g_ref) <= RTOL64


def test_population_mode_on_cnn_uses_whole_set_statistics():
    x, y = _data("cnn")
    model = _model("cnn", True)
    batches = ref.make_batches(x, y, BATCH)
    op = HessianOperator(model, batches, bn_mode="population")
    # Reference: the module in eval mode with running statistics set layer by layer from the whole set.
    m = copy.deepcopy(model).eval()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    with torch.no_grad():
        h = m[0](x)
        bns[0].running_mean.copy_(h.mean((0, 2, 3)))
        bns[0].running_var.copy_(h.var((0, 2, 3), unbiased=False))
        h = m[3](m[2](m[1](h)))
        bns[1].running_mean.copy_(h.mean((0, 2, 3)))
        bns[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    f, theta = ref.module_loss(m, batches, "eval")
    assert _relerr(op.to_dense(), ref.dense_hessian(f, theta)) <= RTOL64


def test_unequal_last_batch_is_weighted_by_size():
    x, y = _data("mlp")
    model = _model("mlp", False)
    whole = HessianOperator(model, [(x, y)]).to_dense()
    split = HessianOperator(model, ref.make_batches(x, y, BATCH)).to_dense()
    assert _relerr(split, whole) <= RTOL64
    # The naive mean of per-batch Hessians is measurably different, so the test above can fail.
    naive = sum(HessianOperator(model, [b]).to_dense() for b in ref.make_batches(x, y, BATCH)) / 3
    assert _relerr(naive, whole) > 1e-3


def test_parameter_subset_is_the_principal_submatrix():
    x, y = _data("cnn")
    model = _model("cnn", True)
    batches = ref.make_batches(x, y, BATCH)
    full = HessianOperator(model, batches).to_dense()
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    conv = [k for k in names if k.endswith("weight") and k.split(".")[0] in ("0", "3")]
    idx = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i, k in enumerate(names) if k in conv])
    by_name = HessianOperator(model, batches, params=conv)
    by_predicate = HessianOperator(model, batches, params=lambda k, p: p.ndim == 4)
    assert by_name.n == len(idx) == by_predicate.n
    assert _relerr(by_name.to_dense(), full[idx][:, idx]) <= RTOL64
    assert torch.equal(by_name.to_dense(), by_predicate.to_dense())


def test_dropout_is_off():
    x, y = _data("mlp")
    torch.manual_seed(0)
    with_dropout = ref.tiny_mlp(True, dropout=0.5)
    torch.manual_seed(0)
    without = ref.tiny_mlp(True)
    batches = ref.make_batches(x, y, BATCH)
    a = HessianOperator(with_dropout, batches).to_dense()
    b = HessianOperator(without, batches).to_dense()
    assert torch.equal(a, b)


def test_model_buffers_and_rng_are_untouched():
    x, y = _data("cnn")
    model = _model("cnn", True)
    ref.warm_running_stats(model, x)
    model.train()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    for mode in ("train", "eval", "population"):
        for strategy in ("vmap", "reverse"):
            op = HessianOperator(model, ref.make_batches(x, y, BATCH), bn_mode=mode, block_strategy=strategy)
            op.loss_and_gradient()
            op.matmat(torch.ones(op.n, 2, dtype=torch.float64))
            op.check_determinism()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_float32_model_is_close_to_float64():
    x, y = _data("cnn")
    model = _model("cnn", True)
    batches = ref.make_batches(x, y, BATCH)
    H64 = HessianOperator(model, batches).to_dense()
    op32 = HessianOperator(model, batches, dtype=torch.float32)
    H32 = op32.to_dense()
    assert H32.dtype == torch.float64 and op32.dtype == torch.float32
    # float32 evaluation: relative error of a few hundred ulps of float32 (1.2e-7).
    assert _relerr(H32, H64) <= 1e-5


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3).double()

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn_like(x))


def test_determinism_check_catches_randomness():
    x, y = _data("mlp")
    op = HessianOperator(_Noisy(), [(x, y)])
    with pytest.raises(DeterminismError, match="different gradients"):
        op.check_determinism()
    HessianOperator(_model("mlp", True), [(x, y)]).check_determinism()


@pytest.mark.parametrize("strategy", ["traced", "vmap", "loop", "reverse"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_determinism_check_rides_on_the_next_product_pass(strategy, chunk):
    """expect_gradient: the next product pass compares the batch gradients it computes on the way (weighted exactly,
    with an unequal last batch) with the given gradient, changes no product bit, and adds no pass of its own."""
    x, y = _data("mlp")
    op = HessianOperator(_model("mlp", True), ref.make_batches(x, y, 7), block_strategy=strategy, vmap_chunk_size=chunk)
    g = op.loss_and_gradient().gradient
    V = torch.randn(op.n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = op.matmat(V)
    calls = []
    handle = op._model.register_forward_hook(lambda *_: calls.append(1))
    try:
        op.expect_gradient(g)
        checked = op.matmat(V)
    finally:
        handle.remove()
    assert torch.equal(checked, plain)
    # As many forwards per batch as without the check: one per column under loop, one per chunk of columns under
    # vmap, one under reverse; none under traced, whose graphs do not call the module and whose primal results
    # are kept from the first pass.
    forwards = {"loop": V.shape[1], "vmap": -(-V.shape[1] // (chunk or V.shape[1])), "reverse": 1, "traced": 0}
    forwards = forwards[strategy]
    assert len(calls) == forwards * len(op.batches)
    # A gradient that differs by 1e-9 relative (above the float64 tolerance of 1e-10) is caught, once.
    op.expect_gradient(g * (1 + 1e-9))
    with pytest.raises(DeterminismError, match="different gradients"):
        op.matmat(V)
    op.matmat(V)  # the check is spent


def test_determinism_check_on_the_product_pass_catches_randomness():
    x, y = _data("mlp")
    op = HessianOperator(_Noisy(), [(x, y)], block_strategy="reverse")
    op.expect_gradient(op.loss_and_gradient().gradient)
    with pytest.raises(DeterminismError, match="different gradients"):
        op.matmat(torch.ones(op.n, 1, dtype=torch.float64))


def test_bad_input_raises_clear_errors():
    x, y = _data("mlp")
    model = _model("mlp", True)
    op = HessianOperator(model, [(x, y)])
    with pytest.raises(ValueError, match=r"shape \[\d+\]"):
        op.matvec(torch.ones(op.n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \[\d+, p\]"):
        op.matmat(torch.ones(3, op.n, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        op.matvec(torch.ones(op.n, dtype=torch.int64))
    with pytest.raises(ValueError, match="bn_mode"):
        HessianOperator(model, [(x, y)], bn_mode="batch")
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, [])
    with pytest.raises(ValueError, match="unknown parameter"):
        HessianOperator(model, [(x, y)], params=["nope.weight"])
    with pytest.raises(ValueError, match="no parameters selected"):
        HessianOperator(model, [(x, y)], params=lambda k, p: False)
    no_stats = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    with pytest.raises(ValueError, match="running statistics"):
        HessianOperator(no_stats, [(x, y)], bn_mode="eval")
    broken = _model("mlp", False)
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        HessianOperator(broken, [(x, y)]).loss_and_gradient()


def test_to_scipy_agrees():
    x, y = _data("mlp")
    op = HessianOperator(_model("mlp", True), ref.make_batches(x, y, BATCH))
    H = op.to_dense().numpy()
    lin = op.to_scipy()
    v = torch.randn(op.n, dtype=torch.float64).numpy()
    assert abs(lin @ v - H @ v).max() <= 1e-12 * abs(H @ v).max()


def test_block_strategy_choice():
    model = _model("cnn", True)
    batches = ref.make_batches(*_data("cnn"), BATCH)
    assert HessianOperator(model, batches).block_strategy == "traced"
    assert HessianOperator(model, batches, bn_mode="eval").block_strategy == "traced"
    assert HessianOperator(model, batches, bn_mode="population").block_strategy == "traced"
    assert HessianOperator(_model("cnn", False), batches).block_strategy == "traced"
    assert HessianOperator(_model("mlp", True), ref.make_batches(*_data("mlp"), BATCH)).block_strategy == "traced"
    # Compiled products: torch.func's vmap (the traced graphs are not compiled).
    assert HessianOperator(model, batches, compile=True).block_strategy == "vmap"
    with pytest.raises(ValueError, match="traced"):
        HessianOperator(model, batches, block_strategy="traced", compile=True)
    # Attention on the CPU: reverse-over-reverse.
    attention = nn.MultiheadAttention(6, 2, batch_first=True).double()

    class _Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = attention, nn.Linear(6, 3).double()

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    x = torch.randn(4, 5, 6, dtype=torch.float64)
    assert HessianOperator(_Attend(), [(x, torch.tensor([0, 1, 2, 0]))]).block_strategy == "reverse"
    with pytest.raises(ValueError, match="block_strategy"):
        HessianOperator(model, batches, block_strategy="fast")


class _Square(torch.autograd.Function):
    """x ** 2 as an old-style autograd.Function: no setup_context and no jvp, so torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output


class _SquareNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(_Square.apply(self.hidden(x))))


def test_auto_falls_back_to_autograd_for_models_torch_func_cannot_transform():
    x, y = _data("mlp")
    torch.manual_seed(0)
    model = _SquareNet().double()
    batches = ref.make_batches(x, y, BATCH)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        HessianOperator(model, batches, block_strategy="vmap").loss_and_gradient()
    op = HessianOperator(model, batches)
    assert op.block_strategy == "traced"
    loss, gradient = op.loss_and_gradient()
    assert op.block_strategy == "reverse"
    # Tracing failed first, then torch.func untraced: both reasons are kept.
    assert op.strategy_fallback.startswith("traced: ") and "; then torch.func failed" in op.strategy_fallback
    f, theta = ref.module_loss(model, batches, "train")
    assert abs(loss - float(f(theta))) <= 1e-14 * abs(loss)
    leaf = theta.clone().requires_grad_(True)
    (gradient_ref,) = torch.autograd.grad(f(leaf), leaf)
    assert _relerr(gradient, gradient_ref) <= RTOL64
    # The Hessian itself, from a fresh operator whose first call is a product.
    op = HessianOperator(model, batches)
    H_ref = ref.dense_hessian(f, theta)
    assert _relerr(op.to_dense(), H_ref) <= RTOL64
    assert op.block_strategy == "reverse"
