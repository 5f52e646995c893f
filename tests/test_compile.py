"""Compiled products (``HessianOperator(..., compile=True)``, ``hessspec analyze --compile``).

Compiled per-batch products and gradients against eager ones and against the dense float64 Hessian of
``torch.autograd.functional.hessian``; the fallback to eager, with one warning, where compilation fails.

Compiling costs seconds per graph on the CPU (inductor writes and builds C++ kernels): each case compiles a product
and a gradient graph (one more of each for a smaller last batch), and the models of a case share shapes.
"""

from __future__ import annotations

import logging
import subprocess
import warnings

import pytest
import torch
from torch import nn

from hessspec.curvature import compiled as compiled_module
from hessspec.curvature.hessian import HessianOperator
from hessspec.results import HessspecWarning
from tests.reference import dense_hessian, make_batches, module_loss, tiny_cnn, tiny_mlp, warm_running_stats

# float64: compiled kernels fuse and order the same arithmetic differently, so products differ from eager ones by a
# few ulps of the largest terms (measured 3e-16 to 7e-16 relative on these models); 1e-12 leaves three orders of
# margin and still fails any wrong derivative (O(1)).
RTOL = 1e-12


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees its own compile warnings (they are shown once per process otherwise)."""
    monkeypatch.setattr(compiled_module, "_WARNED", set())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def compare(model: nn.Module, batches, bn_mode: str, strategy: str, columns: int = 3) -> HessianOperator:
    """Compiled product and gradient against eager ones and against the dense float64 Hessian and gradient."""
    eager = HessianOperator(model, batches, bn_mode=bn_mode, block_strategy=strategy)
    op = HessianOperator(model, batches, bn_mode=bn_mode, block_strategy=strategy, compile=True)
    V = torch.randn(op.n, columns, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessspecWarning)  # no fallback
        HV = op.matmat(V)
        loss, g = op.loss_and_gradient()
    HV_eager = eager.matmat(V)
    loss_eager, g_eager = eager.loss_and_gradient()
    assert relative(HV, HV_eager) <= RTOL
    assert relative(g, g_eager) <= RTOL
    assert abs(loss - loss_eager) <= RTOL * abs(loss_eager)

    f, theta = module_loss(model, batches, "train" if bn_mode == "train" else "eval")
    H = dense_hessian(f, theta)
    th = theta.clone().requires_grad_(True)
    g_ref = torch.autograd.grad(f(th), th)[0]
    # Against an independent dense reference: rounding of two different evaluations (n ~ 100-170 terms per entry).
    assert relative(HV, H @ V) <= 1e-10
    assert relative(g, g_ref) <= 1e-10
    assert op.compile_fallback is None
    recorded = op.recorded_settings()
    assert recorded["compile"] is True and "compile_fallback" not in recorded
    return op


def test_mlp_with_batchnorm_in_train_mode_and_a_smaller_last_batch():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    graphs = []
    for seed in (0, 1):  # another checkpoint's weights: the graphs are reused (weights are inputs, not constants)
        torch.manual_seed(seed)
        op = compare(tiny_mlp(bn=True), make_batches(x, y, 8), "train", "vmap")  # batches of 8, 8 and 4
        assert op.block_strategy == "vmap"
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]


@pytest.mark.parametrize("bn_mode", [pytest.param("train", marks=pytest.mark.slow), "eval"])
def test_cnn_with_batchnorm(bn_mode):
    # Train mode under "reverse" (the double backward is compiled, traced with trace_autograd_ops); eval mode under
    # "auto", which resolves to "vmap" (torch.func compiled).
    torch.manual_seed(0)
    model = tiny_cnn(bn=True)
    x, y = torch.randn(12, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    warm_running_stats(model, x)
    strategy = "reverse" if bn_mode == "train" else "auto"
    op = compare(
        model, make_batches(x, y, 6), bn_mode, strategy, columns=2
    )  # the double backward's graph grows per column
    assert op.block_strategy == ("reverse" if bn_mode == "train" else "vmap")


class GraphBreak(nn.Module):
    """Calls ``torch._dynamo.graph_break()``: Dynamo cannot split a graph inside a torch.func transform."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return x


def eager_fallback(model: nn.Module, batches) -> list[warnings.WarningMessage]:
    """The compiled operator's results equal the eager operator's bit for bit; returns the warnings raised."""
    eager = HessianOperator(model, batches, block_strategy="vmap")
    op = HessianOperator(model, batches, block_strategy="vmap", compile=True)
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HV = op.matmat(V)
        g = op.loss_and_gradient().gradient
        HV2 = op.matmat(V)
    assert torch.equal(HV, eager.matmat(V)) and torch.equal(HV2, HV)
    assert torch.equal(g, eager.loss_and_gradient().gradient)
    assert op.compile_fallback is not None
    assert op.recorded_settings()["compile_fallback"] == op.compile_fallback
    ours = [w for w in caught if issubclass(w.category, HessspecWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "\n" not in message and message.startswith("--compile: ") and "eagerly" in message
    return ours


def test_a_model_dynamo_cannot_compile_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), GraphBreak(), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    (warning,) = eager_fallback(model, make_batches(x, y, 5))
    assert "graph_break" in str(warning.message)


def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    model = tiny_mlp(bn=False)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    (warning,) = eager_fallback(model, make_batches(x, y, 5))
    assert "RuntimeError: no compiler here" in str(warning.message)


def test_gauss_newton_family_says_it_runs_eagerly(monkeypatch):
    from hessspec.curvature.gauss_newton import CurvatureOperator

    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)  # compiling is not what is tested
    torch.manual_seed(0)
    model = tiny_mlp(bn=False)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    op = CurvatureOperator(model, make_batches(x, y, 5), block_strategy="vmap", compile=True)
    V = torch.randn(op.n, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op.products({"hessian": V, "ggn": V})
        op.products({"hessian": V, "ggn": V})
    ours = [str(w.message) for w in caught if issubclass(w.category, HessspecWarning)]
    assert len(ours) == 1 and "ggn" in ours[0] and "eagerly" in ours[0]
    assert op.recorded_settings()["compile_eager"] == "ggn"


@pytest.mark.slow
def test_cli_compile_records_it_with_the_results(tmp_path):
    from hessspec.store import load_results
    from tests.test_cli import HESSSPEC, MODEL, command_env, write_checkpoints

    (checkpoint,) = write_checkpoints(tmp_path / "ckpts", steps=(40,))
    common = [str(checkpoint), *MODEL, "--data", "digits", "--samples", "64", "--batch-size", "32", "--dtype",
              "float64", "--lanczos-steps", "6", "--probes", "2", "--top-k", "2", "--hvp-strategy", "vmap"]  # fmt: skip
    runs = {}
    for name, extra in (("compiled", ["--compile"]), ("eager", [])):
        out = tmp_path / f"{name}.h5"
        result = subprocess.run(
            [HESSSPEC, "analyze", *common, *extra, "--out", str(out)],
            cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "--compile" not in result.stderr  # no fallback warning
        runs[name] = load_results(out)
    compiled = runs["compiled"].checkpoints[0]
    eager = runs["eager"].checkpoints[0]
    assert compiled.settings["compile"] is True and "compile_fallback" not in compiled.settings
    assert eager.settings["compile"] is False
    assert runs["compiled"].config["compile"] is True
    # float64 products equal to rounding; 6 Lanczos steps amplify that by far less than 1e4.
    scale = abs(eager.top_eigenvalues).max()
    assert abs(compiled.top_eigenvalues - eager.top_eigenvalues).max() <= 1e-12 * scale
    assert abs(compiled.loss - eager.loss) <= 1e-14 * eager.loss


def test_a_failure_inside_torch_falls_back_quietly(monkeypatch, capfd, caplog):
    # Why the operator compiles with static shapes (dynamic=False): with symbolic sizes, tracing the forward-mode
    # derivative of a convolution fails inside torch 2.14 (``_new_zeros_with_same_feature_meta`` cannot take
    # symbolic sizes), and torch logs that with C++ and Python tracebacks before raising. The user sees one warning.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_(function, **{**kwargs, "dynamic": True}))
    torch.manual_seed(0)
    model = tiny_cnn(bn=False)
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    (warning,) = eager_fallback(model, make_batches(x, y, 5))
    assert "product vmap" in str(warning.message)
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
