"""Losses and batch structures: HessianOperator against dense float64 Hessians of the mean loss over the whole set.

Each reference is written out independently of hessspec's loss and batch code (explicit sums over examples or
tokens, the model called by hand) and differentiated with ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import copy
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessspec.curvature.hessian import HessianOperator
from hessspec.curvature.losses import FunctionLoss, LanguageModelLoss, LossError, get_loss
from tests import reference as ref

RTOL64 = 1e-12  # as in test_operators: float64 on both sides, three orders of magnitude above rounding
STRATEGIES = ["traced", "vmap", "loop", "reverse"]
LOSS_NAMES = ["mse", "nll", "cross-entropy"]
N, SIZES = 23, (10, 9, 4)  # unequal batches


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _splits(*tensors):
    bounds = [0]
    for size in SIZES:
        bounds.append(bounds[-1] + size)
    return [tuple(t[a:b] for t in tensors) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _reference(model: nn.Module, train: bool, batch_losses):
    """``f(theta) = sum over batches of batch_losses(call, b)`` with ``call(*args, **kwargs)`` the module with
    parameters theta (a copy in train or eval mode)."""
    m = copy.deepcopy(model)
    m.train(train)
    names, theta = ref.flat_params(m)
    buffers = dict(m.named_buffers())
    shapes = [p.shape for p in m.parameters()]

    def f(th: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            n = s.numel()
            params[k] = th[i : i + n].view(s)
            i += n

        def call(*args, **kwargs):
            return functional_call(m, {**params, **buffers}, args, kwargs)

        return batch_losses(call)

    return ref.dense_hessian(f, theta)


def _check(op: HessianOperator, H_ref: torch.Tensor, dense: bool = False) -> None:
    """Products with a random block (and a vector) equal the reference's; with ``dense``, all n columns too.

    A block of random columns suffices: an error matrix E with E V = 0 for Gaussian V of full column rank has
    probability zero, unless E = 0."""
    if dense:
        assert _relerr(op.to_dense(), H_ref) <= RTOL64
    V = torch.randn(op.n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert _relerr(op @ V, H_ref @ V) <= RTOL64
    assert _relerr(op.matvec(V[:, 0]), H_ref @ V[:, 0]) <= RTOL64


# -- regression and classification losses, pair / tuple / mapping batches ---------------------------------------


class _KeywordNet(nn.Module):
    """The tiny MLP called with a keyword argument ``features`` (and an optional ``scale``)."""

    def __init__(self, bn: bool, outputs: int = 3, log_softmax: bool = False) -> None:
        super().__init__()
        layers = list(ref.tiny_mlp(bn).children())
        layers[-1] = nn.Linear(5, outputs).double()
        self.net = nn.Sequential(*layers)
        self.log_softmax = log_softmax

    def forward(self, features, scale=None):
        out = self.net(features if scale is None else features * scale)
        return F.log_softmax(out, dim=1) if self.log_softmax else out


def _data(targets: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N,), generator=g) if targets == "classes" else torch.randn(N, 2, generator=g).double()
    return x, y


def _structure(structure: str, x: torch.Tensor, y: torch.Tensor):
    scale = torch.full((len(x), 1), 1.5, dtype=torch.float64)
    out = []
    for xb, yb, sb in _splits(x, y, scale):
        if structure == "pair":
            out.append((xb, yb))
        elif structure == "tuple":
            out.append((xb, yb, torch.arange(len(xb))))  # a third element the built-in losses ignore
        elif structure == "dict":
            out.append({"features": xb, "scale": sb, "labels": yb})
        elif structure == "userdict":
            out.append(UserDict({"features": xb, "scale": sb, "labels": yb}))
        else:
            transformers = pytest.importorskip("transformers")
            out.append(transformers.BatchEncoding({"features": xb, "scale": sb, "labels": yb}))
    return out


def _per_example(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "mse":
        return ((out - y) ** 2).sum(1)
    log_p = out if loss == "nll" else torch.log_softmax(out, 1)
    return -log_p.gather(1, y[:, None]).squeeze(1)


_CASES = [
    *[(s, loss, True, "train") for s in ("pair", "tuple", "dict", "userdict", "batchencoding") for loss in LOSS_NAMES],
    *[(s, loss, bn, mode) for s in ("pair", "dict") for loss in LOSS_NAMES for bn, mode in ((0, "train"), (1, "eval"))],
]


@pytest.mark.parametrize(("structure", "loss", "bn", "bn_mode"), _CASES)
def test_losses_and_structures_match_dense_hessian(structure, loss, bn, bn_mode):
    x, y = _data("values" if loss == "mse" else "classes")
    torch.manual_seed(0)
    model = _KeywordNet(bn, outputs=2 if loss == "mse" else 3, log_softmax=loss == "nll")
    if bn:
        ref.warm_running_stats(model, x)
    batches = _structure(structure, x, y)
    keyword = structure not in ("pair", "tuple")

    def total(call):
        parts = []
        for xb, yb in _splits(x, y):
            out = call(features=xb, scale=torch.full((len(xb), 1), 1.5, dtype=torch.float64)) if keyword else call(xb)
            parts.append(_per_example(loss, out, yb).sum())
        return sum(parts) / N

    H_ref = _reference(model, bn_mode == "train", total)
    # Every strategy on the BN network in train mode (the hardest case); "auto" elsewhere.
    for strategy in STRATEGIES if structure in ("pair", "dict") and bn_mode == "train" and bn else ["auto"]:
        op = HessianOperator(model, batches, loss=loss, bn_mode=bn_mode, block_strategy=strategy)
        assert op.num_units == op.num_examples == N
        _check(op, H_ref)
    loss_value, _ = op.loss_and_gradient()
    with torch.no_grad():
        assert loss_value == pytest.approx(float(total(copy.deepcopy(model).train(bn_mode == "train"))), rel=1e-13)


# -- language-model loss: padding, -100 labels, unequal numbers of target tokens ---------------------------------

VOCAB, T = 7, 6


class _TinyCausalLM(nn.Module):
    """Embedding, a causal mixing of each position with its predecessor, tanh, and a vocabulary head (~80
    parameters). Takes ``input_ids`` and ``attention_mask`` as keyword arguments, like a Hugging Face model, and
    returns an object with ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        h = torch.tanh(self.mix(h) + 0.5 * previous)

        class Output:
            pass

        out = Output()
        out.logits = self.head(h)
        return out


def _lm_batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (9, T), generator=g)
    mask = torch.ones(9, T, dtype=torch.int64)
    mask[1, 4:] = 0  # right padding
    mask[5, 2:] = 0
    mask[7, 1:] = 0  # one token: no target at all
    labels = ids.clone()
    labels[2, 3] = -100
    labels[6, :4] = -100  # e.g. a prompt excluded from the loss
    labels[mask == 0] = -100
    cuts = [(0, 4), (4, 8), (8, 9)]  # batches of 4, 4 and 1 sequences, with 16, 14 and 5 target tokens
    return ids, mask, labels, cuts


def _lm_reference_total(call, ids, mask, labels, cuts, use_labels: bool):
    # Explicit loop over every (sequence, position): the token at t + 1 is predicted at t unless ignored.
    total, count = 0.0, 0
    for a, b in cuts:
        logits = call(input_ids=ids[a:b], attention_mask=mask[a:b]).logits
        log_p = torch.log_softmax(logits, dim=-1)
        target = labels if use_labels else ids
        for i in range(b - a):
            for t in range(T - 1):
                token = int(target[a + i, t + 1])
                if token == -100 or int(mask[a + i, t + 1]) == 0:
                    continue
                total = total - log_p[i, t, token]
                count += 1
    return total / count, count


@pytest.mark.parametrize("container", ["dict", "batchencoding"])
@pytest.mark.parametrize("use_labels", [True, False])
def test_lm_loss_matches_dense_hessian_over_all_target_tokens(container, use_labels):
    ids, mask, labels, cuts = _lm_batches()
    torch.manual_seed(0)
    model = _TinyCausalLM().double()
    batches = []
    for a, b in cuts:
        entry = {"input_ids": ids[a:b], "attention_mask": mask[a:b]}
        if use_labels:
            entry["labels"] = labels[a:b]
        if container == "batchencoding":
            entry = pytest.importorskip("transformers").BatchEncoding(entry)
        batches.append(entry)

    def total(call):
        return _lm_reference_total(call, ids, mask, labels, cuts, use_labels)[0]

    H_ref = _reference(model, False, total)
    _, count = _lm_reference_total(model, ids, mask, labels, cuts, use_labels)
    counts = [LanguageModelLoss().count(batch) for batch in batches]
    assert len(set(counts)) == len(counts)  # unequal numbers of target tokens per batch
    for strategy in STRATEGIES:
        op = HessianOperator(model, batches, loss="lm", block_strategy=strategy)
        assert op.num_units == count and op.num_examples == 9
        _check(op, H_ref, dense=True)
    loss_value, _ = op.loss_and_gradient()
    with torch.no_grad():
        assert loss_value == pytest.approx(float(total(model)), rel=1e-13)
    # The integer ids stay integer on their way to the device; per-unit losses are one per target token.
    assert op.batches[0]["input_ids"].dtype == torch.int64
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    per_token = LanguageModelLoss().per_unit(model(**inputs), batches[0])
    assert per_token.shape == (counts[0],)


def test_lm_loss_from_tuples_of_token_ids():
    ids, _, _, _ = _lm_batches()
    torch.manual_seed(0)
    model = _TinyCausalLM().double()
    op = HessianOperator(model, [(ids[:5],), (ids[5:],)], loss="lm")
    as_dicts = HessianOperator(model, [{"input_ids": ids[:5]}, {"input_ids": ids[5:]}], loss="lm")
    assert op.num_units == 9 * (T - 1)
    assert _relerr(op.to_dense(), as_dicts.to_dense()) <= RTOL64


# -- a loss factory without targets -------------------------------------------------------------------------------


def _residual(output, batch):
    """A PINN-style residual: no target, the batch is ``(x,)``; the mean over examples."""
    (x,) = batch
    return ((output[:, 0] - torch.sin(x[:, 0]) * output[:, 1]) ** 2).mean()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_factory_loss_without_targets(strategy):
    x, _ = _data("values")
    torch.manual_seed(0)
    model = _KeywordNet(False, outputs=2)
    batches = [(xb,) for (xb,) in _splits(x)]

    def total(call):
        return sum(_residual(call(xb), (xb,)) * len(xb) for (xb,) in _splits(x)) / N

    op = HessianOperator(model, batches, loss=FunctionLoss(_residual), block_strategy=strategy)
    _check(op, _reference(model, False, total))
    with torch.no_grad():
        per_unit = op.loss.per_unit(model(x), (x,))
        assert per_unit.shape == (N,)
        assert float(per_unit.mean()) == pytest.approx(float(_residual(model(x), (x,))), rel=1e-13)


# -- torch's built-in losses given as loss_fn, under the default strategy ------------------------------------------


def _bce_targets(y):
    return (y > 0).double()


BUILTIN = {
    "mse_loss": (F.mse_loss, "values"),
    "huber_loss": (F.huber_loss, "values"),
    "smooth_l1_loss": (F.smooth_l1_loss, "values"),
    "nll_loss": (lambda out, y: F.nll_loss(F.log_softmax(out, 1), y), "classes"),
    "binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits, "binary"),
    "cross_entropy": (F.cross_entropy, "classes"),
    "cross_entropy(label_smoothing=0.1)": (lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), "classes"),
}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_torch_builtin_losses_under_the_default_strategy(name):
    loss_fn, kind = BUILTIN[name]
    x, y = _data("classes" if kind == "classes" else "values")
    if kind == "binary":
        y = _bce_targets(y)
    torch.manual_seed(0)
    model = _KeywordNet(True, outputs=3 if kind == "classes" else 2)
    batches = _splits(x, y)

    def total(call):
        return sum(loss_fn(call(xb), yb) * len(xb) for xb, yb in batches) / N

    op = HessianOperator(model, batches, loss_fn)
    _check(op, _reference(model, True, total))
    if name == "huber_loss":  # no forward-mode derivative: "auto" fell back from traced, then from torch.func
        assert op.block_strategy == "reverse"
        assert op.strategy_fallback.startswith("traced: ") and "torch.func failed" in op.strategy_fallback
        assert op.recorded_settings()["block_strategy_fallback"] == op.strategy_fallback
    else:
        # F.mse_loss too: the traced graph is functionalised, so its forward-mode rule's in-place division of an
        # immutable zero tangent (which defeats vmap, see below) becomes an out-of-place one.
        assert op.block_strategy == "traced" and op.strategy_fallback is None


def test_mse_loss_zero_tensor_root_cause():
    """With reduction "mean", F.mse_loss's forward-mode rule (torch's mse_loss_double_backward) computes
    ``2 * tangent`` and divides it in place by the number of elements; for the target, which has no tangent, that is
    an immutable efficient zero. With reduction "sum" there is no division and torch.func works; the built-in "mse"
    loss does not use the functional."""
    x, y = _data("values")
    model = _KeywordNet(False, outputs=2)
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        HessianOperator(model, [(x, y)], F.mse_loss, block_strategy="vmap").to_dense()

    def summed_mse(o, t):
        return F.mse_loss(o, t, reduction="sum") / len(o)

    summed = HessianOperator(model, [(x, y)], summed_mse, block_strategy="vmap")
    builtin = HessianOperator(model, [(x, y)], loss="mse", block_strategy="vmap")
    assert _relerr(summed.to_dense(), builtin.to_dense()) <= RTOL64


# -- attention ------------------------------------------------------------------------------------------------------


class _TinyTransformer(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 4, 2 heads) and a linear head on the mean over positions."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("strategy", ["auto", "traced", "vmap", "reverse"])  # "loop" is "vmap" one column at a time
def test_transformer_encoder_layer_matches_dense_hessian(batch_first, strategy):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (11,), generator=g)
    torch.manual_seed(0)
    model = _TinyTransformer(batch_first).double().eval()  # eval mode: the fused fast path would be taken
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def total(call):
        return sum(F.cross_entropy(call(xb), yb, reduction="sum") for xb, yb in batches) / 11

    with sdpa_kernel(SDPBackend.MATH):  # the reference needs a twice-differentiable attention kernel too
        H_ref = _reference(model, False, total)
    op = HessianOperator(model, batches, block_strategy=strategy)
    _check(op, H_ref)
    assert op.recorded_settings()["attention_kernel"] == "math"
    assert torch.backends.mha.get_fastpath_enabled()  # the global setting is restored


# -- errors -------------------------------------------------------------------------------------------------------


def test_loss_errors_are_one_line_and_name_what_arrived():
    x, y = _data("classes")
    model = _KeywordNet(False)
    with pytest.raises(LossError, match=r"unknown loss 'hinge'"):
        get_loss("hinge")
    with pytest.raises(LossError, match=r"'mse' needs floating-point targets; got a target of int64 \[23\]"):
        HessianOperator(model, [(x, y)], loss="mse").loss_and_gradient()
    with pytest.raises(LossError, match=r"3 outputs .* labels from 1 to 7; pass --model-arg num_classes=8$"):
        HessianOperator(model, [(x, y * 3 + 1)]).loss_and_gradient()
    with pytest.raises(LossError, match=r"needs a target .* got a batch of \(float64 \[23, 6\]\)"):
        HessianOperator(model, [(x,)]).loss_and_gradient()
    with pytest.raises(LossError, match=r"must return a floating scalar tensor .* got float64 \[23\]"):
        HessianOperator(model, [(x,)], loss=FunctionLoss(lambda out, b: out.sum(1), "m:f")).to_dense()
    with pytest.raises(LossError, match=r"'lm' needs logits of shape \[batch, sequence, vocabulary\]"):
        HessianOperator(model, [(x, torch.zeros(23, 4, dtype=torch.int64))], loss="lm").loss_and_gradient()
    with pytest.raises(LossError, match=r"'lm' needs integer token labels"):
        HessianOperator(model, [(x, y)], loss="lm")
    with pytest.raises(ValueError, match="not both"):
        HessianOperator(model, [(x, y)], F.cross_entropy, loss="cross-entropy")
