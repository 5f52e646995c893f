"""Per-block spectra: block specs, block probes, and SLQ on the diagonal blocks against dense float64 blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessspec.analysis import AnalysisSettings, analyze, analyze_many, operator_blocks, rademacher_probes
from hessspec.curvature.blocks import BlockError, block_probes, check_block_specs, resolve_blocks
from hessspec.curvature.gauss_newton import CURVATURES, CurvatureOperator
from tests import reference as ref
from tests.test_gauss_newton import _references
from tests.test_operators import BATCH, _data, _model

PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "scale"]
NUMELS = [12, 4, 4, 4, 8, 2, 1]


def test_specs_tensors_modules_and_regex():
    by_tensor = resolve_blocks(["tensors"], PARAMS, NUMELS)
    assert [b.name for b in by_tensor] == PARAMS and [b.n for b in by_tensor] == NUMELS
    assert by_tensor[2].index.tolist() == list(range(16, 20))
    by_module = resolve_blocks(["modules"], PARAMS, NUMELS)
    assert [(b.name, b.params) for b in by_module] == [
        ("0", ("0.weight", "0.bias")), ("1", ("1.weight", "1.bias")), ("3", ("3.weight", "3.bias")),
        ("(root)", ("scale",)),
    ]  # fmt: skip
    named = resolve_blocks(["weights=weight$", "last=^3\\.bias"], PARAMS, NUMELS)
    assert named[0].params == ("0.weight", "1.weight", "3.weight") and named[0].n == 24
    assert named[0].index.tolist() == list(range(12)) + list(range(16, 20)) + list(range(24, 32))
    assert named[1].index.tolist() == [32, 33]  # parameters in no block are left out


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["weights=weight", "first=^0\\."], "parameter '0.weight' is in two blocks, 'weights' and 'first'"),
        (["tensors", "w=weight"], "parameter '0.weight' is in two blocks"),
        (["none=^nothing"], "the block 'none' matches no selected parameter"),
        (["all=weight"], "reserved"),
        (["a=weight", "a=bias"], "given twice"),
        (["a=("], "not a valid regular expression"),
        (["layers"], "expected tensors, modules or NAME=REGEX"),
        (["=x"], "expected tensors, modules or NAME=REGEX"),
    ],
)
def test_bad_specs_are_one_line_errors(specs, message):
    with pytest.raises(BlockError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        resolve_blocks(specs, PARAMS, NUMELS)
    assert "\n" not in str(info.value)


def test_block_probes_depend_on_seed_name_and_index_only():
    a = block_probes(50, 4, seed=3, block="layer1")
    assert torch.equal(a[:, :2], block_probes(50, 2, seed=3, block="layer1"))
    assert not torch.equal(a, block_probes(50, 4, seed=3, block="layer2"))
    assert not torch.equal(a, block_probes(50, 4, seed=4, block="layer1"))
    np.testing.assert_allclose(torch.linalg.vector_norm(a, dim=0).numpy(), 1.0, rtol=1e-15)
    assert set(torch.unique(a * np.sqrt(50)).tolist()) == {-1.0, 1.0}
    assert check_block_specs([" tensors ", "a =x"]) == ("tensors", "a=x")


@pytest.fixture(scope="module")
def digits_blocks():
    """A 64-16-16-10 tanh MLP (1,482 parameters) after 200 SGD steps on digits; its exact Hessian, diagonalised
    block by block, and one analysis of the whole model with one block per parameter tensor."""
    model, x, y = ref.trained_digits_mlp(16)
    op = CurvatureOperator(model, ref.make_batches(x, y, 500), block_strategy="reverse")
    H = op.to_dense()
    settings = AnalysisSettings(lanczos_steps=90, probes=10, top_k=20, seed=0, blocks=("tensors",))
    results = analyze_many(op, settings)
    return model, op, H, settings, results


@pytest.mark.slow
def test_block_top_eigenvalues_trace_and_density_match_the_dense_diagonal_blocks(digits_blocks):
    _, op, H, settings, results = digits_blocks
    blocks = {b.name: b for b in operator_blocks(op, settings)}
    assert [r.block for r in results] == ["all", *blocks]
    assert all(r.curvature == "hessian" for r in results)
    for r in results:
        idx = torch.arange(op.n) if r.block == "all" else blocks[r.block].index
        evals, U = torch.linalg.eigh(H[idx][:, idx])
        exact = evals.flip(0).numpy()
        # m = 90 steps where the block has more than 90 entries (weights: 1,024, 256, 160), else m = its size
        # (the biases: 16, 16, 10), where Lanczos is exact. The top 10 Ritz values converge to rounding
        # (measured: <= 3e-15 relative); 1e-8 is the team's bound for converged outliers.
        assert r.lanczos_steps == min(90, len(idx)) and r.n_params == len(idx)
        k = min(10, len(exact))
        np.testing.assert_allclose(r.top_eigenvalues[:k], exact[:k], rtol=1e-8, atol=1e-8 * abs(exact[0]))
        # The SLQ density is at the statistical floor of its 10 probes: the distance (W1) to the exact spectrum is
        # that of the probes' exact spectral measures (measured ratio 1.0-1.22), and the Gauss quadrature adds less
        # than half of it (measured: at most 0.37 of it).
        probes = rademacher_probes(op.n, 10, 0) if r.block == "all" else block_probes(len(idx), 10, 0, r.block)
        measures = ((U.T @ probes) ** 2).T.numpy()
        tiled = np.tile(evals.numpy(), (10, 1))
        floor = ref.wasserstein1(tiled, measures, exact, np.ones(len(exact)))
        assert ref.wasserstein1(r.nodes, r.weights, tiled, measures) <= 0.5 * floor
        assert ref.wasserstein1(r.nodes, r.weights, exact, np.ones(len(exact))) <= 1.5 * floor
        assert abs(r.trace - float(evals.sum())) <= 4 * r.trace_stderr
        np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, atol=1e-13)


@pytest.mark.slow
def test_block_overlap_is_that_of_the_block_gradient(digits_blocks):
    _, op, H, settings, results = digits_blocks
    g = op.loss_and_gradient().gradient
    for block in operator_blocks(op, settings):
        r = next(r for r in results if r.block == block.name)
        gb = g[block.index]
        evals, U = torch.linalg.eigh(H[block.index][:, block.index])
        k = min(5, block.n)
        exact = ((U.flip(1)[:, :k].T @ gb) ** 2 / (gb @ gb)).numpy()
        assert r.grad_norm == pytest.approx(float(torch.linalg.vector_norm(gb)), rel=1e-14)
        # Converged Ritz vectors (residuals ~1e-15 ||H||): cos^2 to rounding, far below 1e-8.
        np.testing.assert_allclose(r.cos2[:k], exact, atol=1e-8)


@pytest.mark.slow
def test_whole_model_result_unchanged_by_blocks(digits_blocks):
    """Bitwise under "reverse" (each column's product is its own backward); see the vmap case below."""
    _, op, _, settings, results = digits_blocks
    alone = analyze(op, AnalysisSettings(lanczos_steps=90, probes=10, top_k=20, seed=0))
    whole = results[0]
    for field in ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2", "gradient_nodes"):
        assert np.array_equal(getattr(whole, field), getattr(alone, field)), field
    assert whole.trace == alone.trace


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_whole_model_result_unchanged_by_blocks_under_vmap(kind):
    x, y = _data(kind)
    model = _model(kind, True)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches, block_strategy="vmap")
    alone = analyze(op, AnalysisSettings(lanczos_steps=40, probes=3, top_k=5, seed=1))
    whole = analyze_many(op, AnalysisSettings(lanczos_steps=40, probes=3, top_k=5, seed=1, blocks=("modules",)))[0]
    # vmap evaluates all columns in batched kernels whose reductions may round differently with more columns:
    # equal to rounding (measured: bitwise for the MLP, 4e-15 apart for the CNN), far below 1e-12.
    np.testing.assert_allclose(whole.nodes, alone.nodes, rtol=1e-12, atol=1e-12 * np.abs(alone.nodes).max())
    np.testing.assert_allclose(whole.top_eigenvalues, alone.top_eigenvalues, rtol=1e-12)


@pytest.mark.parametrize("blocks", [(), ("modules",), ("tensors",)])
def test_one_data_pass_per_lanczos_step_whatever_the_number_of_blocks(blocks):
    x, y = _data("cnn")
    model = _model("cnn", True)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches, block_strategy="reverse")
    calls = []
    handle = op._model.register_forward_hook(lambda *_: calls.append(1))
    try:
        settings = AnalysisSettings(lanczos_steps=12, probes=2, top_k=3, blocks=blocks, determinism_check=False)
        results = analyze_many(op, settings)
    finally:
        handle.remove()
    assert len(results) == 1 + len(operator_blocks(op, settings))
    # One gradient pass, then one pass (a forward per batch) per Lanczos step.
    assert len(calls) == len(batches) * (1 + 12)


def test_every_curvature_on_every_block_matches_the_dense_diagonal_block():
    """All five curvatures x (whole model + one block per tensor) in one analysis of the tiny BN MLP (train mode):
    every block has at most 30 entries, so 30 Lanczos steps are exact on each block."""
    x, y = _data("mlp")
    model = _model("mlp", True)
    batches = ref.make_batches(x, y, BATCH)
    op = CurvatureOperator(model, batches, block_strategy="reverse")
    dense = _references(model, batches, op)
    settings = AnalysisSettings(lanczos_steps=30, probes=2, top_k=5, curvatures=CURVATURES, blocks=("tensors",))
    blocks = {b.name: b for b in operator_blocks(op, settings)}
    calls = []
    handle = op._model.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = analyze_many(op, settings)
    finally:
        handle.remove()
    assert [(r.curvature, r.block) for r in results] == [(c, b) for c in CURVATURES for b in ["all", *blocks]]
    # One gradient pass (the determinism check rides on the first product pass), then per step one pass: a forward
    # per batch for the Hessian's columns and one shared by G, F, C and R.
    assert len(calls) == len(batches) * (1 + 2 * 30)
    for r in results:
        if r.block == "all":
            continue
        idx = blocks[r.block].index
        exact = torch.linalg.eigvalsh(dense[r.curvature][idx][:, idx]).flip(0).numpy()
        k = min(5, len(exact))
        # Relative to the whole matrix: a block can be zero (the bias before a train-mode BN layer).
        scale = float(torch.linalg.matrix_norm(dense[r.curvature], ord=2))
        np.testing.assert_allclose(r.top_eigenvalues[:k], exact[:k], rtol=0, atol=1e-10 * scale, err_msg=r.block)
