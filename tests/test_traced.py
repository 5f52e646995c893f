"""The "traced" strategy: split primal and tangent graphs, and the primal cache, against eager products and dense
float64 Hessians (tests/test_operators.py runs it through the dense comparisons of every strategy too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessspec.curvature.batch_products as batch_products
import hessspec.curvature.hessian as hessian_module
from hessspec.curvature.hessian import DeterminismError, HessianOperator
from hessspec.curvature.primal_cache import cache_budget
from hessspec.curvature.traced import TraceError
from tests import reference as ref

RTOL64 = 1e-12  # as in test_operators: float64 on both sides, three orders of magnitude above rounding
N_EXAMPLES, BATCH = 37, 16  # batches of 16, 16 and 5: two batch shapes, so two traces


def _data(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, 1, 6, 6, dtype=dtype, generator=g)
    y = torch.randint(0, 3, (N_EXAMPLES,), generator=g)
    return ref.make_batches(x, y, BATCH)


def _cnn(bn: bool, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return ref.tiny_cnn(bn).to(dtype)


def _block(n: int, p: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bn_mode", ["train", "eval", None])
def test_traced_columns_are_the_eager_jvp_bit_for_bit(bn_mode):
    """float32 CNN: each traced column is the eager forward-over-reverse column ("loop") to the last bit, whether
    its primal was computed in the pass or kept from an earlier one, and whatever columns are beside it."""
    model = _cnn(bn_mode is not None, torch.float32)
    if bn_mode == "eval":
        ref.warm_running_stats(model, torch.cat([x for x, _ in _data(dtype=torch.float32)]))
    batches = _data(dtype=torch.float32)
    mode = bn_mode or "train"
    traced = HessianOperator(model, batches, bn_mode=mode, block_strategy="traced")
    loop = HessianOperator(model, batches, bn_mode=mode, block_strategy="loop")
    V = _block(traced.n, 3)
    first = traced.matmat(V)  # primal computed and kept
    assert traced._primal_cache.holds_all(3)
    assert torch.equal(first, loop.matmat(V))
    assert torch.equal(traced.matmat(V), first)  # primal from the cache
    assert torch.equal(traced.matmat(V[:, 1:2]), first[:, 1:2])  # a column alone
    assert len(traced._traced) == 2  # batches of 16 and the last of 5


def test_cache_budget_changes_no_number_and_a_kept_pass_reads_no_data(monkeypatch):
    batches = _data()
    model = _cnn(True)
    V = _block(sum(p.numel() for p in model.parameters()), 4)
    uncached = HessianOperator(model, batches, block_strategy="traced", primal_cache="off")
    reference = uncached.matmat(V)
    assert uncached._primal_cache.bytes == 0 and not uncached._primal_cache.holds_all(3)
    assert torch.equal(uncached.matmat(V), reference)

    full = HessianOperator(model, batches, block_strategy="traced")
    assert torch.equal(full.matmat(V), reference)
    one_batch = int(0.6 * full._primal_cache.bytes)  # room for the first batch (16 of 37 examples), not for two
    partial = HessianOperator(model, batches, block_strategy="traced", primal_cache=one_batch)
    assert torch.equal(partial.matmat(V), reference)
    assert len(partial._primal_cache._entries) == 1 and partial._primal_cache.full
    assert torch.equal(partial.matmat(V), reference)

    # With every batch kept, a pass evaluates tangents only: the data are not touched.
    reads = []
    original = hessian_module.batch_to
    monkeypatch.setattr(hessian_module, "batch_to", lambda *a, **k: reads.append(1) or original(*a, **k))
    assert torch.equal(full.matmat(V), reference)
    assert reads == []
    partial.matmat(V)
    assert len(reads) == 3  # not all kept: the data are read


def test_traced_matches_the_dense_hessian_through_population_statistics():
    batches = _data()
    model = _cnn(True)
    op = HessianOperator(model, batches, bn_mode="population")
    assert op.block_strategy == "traced"
    H, H_ref = op.to_dense(), HessianOperator(model, batches, bn_mode="population", block_strategy="reverse").to_dense()
    assert float(torch.linalg.norm(H - H_ref) / torch.linalg.norm(H_ref)) <= RTOL64
    # A parameter subset is not traced (torch 2.14 cannot: see HessianOperator's "auto"): vmap.
    names = [k for k, _ in model.named_parameters()][:2]
    assert HessianOperator(model, batches, params=names).block_strategy == "vmap"
    with pytest.raises(ValueError, match="every parameter"):
        HessianOperator(model, batches, params=names, block_strategy="traced")


@pytest.mark.parametrize("chunk", [None, 2])
def test_vectorised_tangents_as_on_a_gpu(chunk):
    """The tangents vectorised over the block's columns with vmap (a GPU's path), on the CPU: dense float64 Hessian,
    with BN in train mode, in chunks of columns too."""
    batches = _data()
    model = _cnn(True)
    op = HessianOperator(model, batches, block_strategy="traced", vmap_chunk_size=chunk)
    op._vectorised_tangents = True
    f, theta = ref.module_loss(model, batches, "train")
    H_ref = ref.dense_hessian(f, theta)
    V = _block(op.n, 5)
    assert float(torch.linalg.norm(op.matmat(V) - H_ref @ V) / torch.linalg.norm(H_ref @ V)) <= RTOL64
    assert float(torch.linalg.norm(op.to_dense() - H_ref) / torch.linalg.norm(H_ref)) <= RTOL64


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: a trace would be specialised to the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) if float(x.sum()) > 0 else torch.tanh(self.b(x))


def test_data_dependent_control_flow_is_not_traced(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    x[4:] -= 5.0  # the second batch takes the other branch
    y = torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    model = _Branchy().double()
    batches = ref.make_batches(x, y, 4)
    with pytest.raises(TraceError, match="could not be traced"):
        HessianOperator(model, batches, block_strategy="traced").matmat(_block(42, 1))
    monkeypatch.setattr(batch_products, "TRACE_FAILED", False)  # a failed trace makes "auto" avoid tracing
    op = HessianOperator(model, batches)  # auto: untraceable, so torch.func's vmap, checked against autograd
    H = op.to_dense()
    assert batch_products.TRACE_FAILED
    assert op.block_strategy == "vmap" and op.strategy_fallback.startswith("traced: the product could not be")
    f, theta = ref.module_loss(model, batches, "train")
    H_ref = ref.dense_hessian(f, theta)
    assert float(torch.linalg.norm(H - H_ref) / torch.linalg.norm(H_ref)) <= RTOL64


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x + 1e-3 * torch.randn_like(x))


def test_determinism_check_sees_the_pass_that_fills_the_cache():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
    op = HessianOperator(_Noisy().double(), [(x, y)], block_strategy="traced")
    gradient = op.loss_and_gradient().gradient
    op.expect_gradient(gradient)
    with pytest.raises(DeterminismError):
        op.matmat(_block(op.n, 2))


def test_primal_cache_budget_is_checked():
    assert cache_budget("auto") == "auto" and cache_budget("off") == 0 and cache_budget(None) == 0
    assert cache_budget(2**20) == 2**20
    for bad in (-1, "lots", 1.5, True):
        with pytest.raises(ValueError, match="primal_cache"):
            cache_budget(bad)
