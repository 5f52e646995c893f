"""Tests of hessspec.runner.distributed: data-parallel analysis with 2 Gloo ranks on the CPU, failure propagation.

The data-parallel result must equal the single-process one to rounding (the cross-rank sum runs in another order
than the single-process loop): nodes, weights, top eigenvalues and overlap agree to 1e-10 in float64, and the
ranks agree with each other bitwise.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hessspec.analysis import AnalysisSettings, analyze
from hessspec.checkpoints import load_checkpoint
from hessspec.curvature.hessian import HessianOperator
from hessspec.data.datasets import load_dataset, materialize
from hessspec.models import build_model
from hessspec.runner import distributed, pipeline
from hessspec.runner.distributed import (
    DistributedContext,
    DistributedError,
    agree_or_raise,
    init_from_env,
    on_main,
    pipeline_hooks,
    result_fingerprint,
    shutdown,
    sync_errors,
    verify_identical,
)
from hessspec.store import load_results

WORLD = 2
BN_MODES = ("train", "population")
SETTINGS = AnalysisSettings(lanczos_steps=15, probes=2, top_k=4, seed=3, gradient_crosscheck=True)
SAMPLES, BATCH = 150, 32  # 5 batches, the last of 22: ranks hold 2 and 3 batches of unequal total size


def _problem(bn_mode: str, rank_ctx: DistributedContext | None = None):
    torch.manual_seed(0)
    model = build_model("mlp-bn", width=16, depth=3).double()
    batches = materialize(load_dataset("digits", samples=SAMPLES, seed=0), BATCH, "cpu", torch.float64)
    if rank_ctx is not None:
        batches = rank_ctx.shard_batches(batches)
    reduce = rank_ctx.all_reduce if rank_ctx is not None else None
    return HessianOperator(model, batches, bn_mode=bn_mode, all_reduce=reduce)


# --------------------------------------------------------------------------------------------- rank programs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, scenario: str, outdir: str) -> None:
    """Entry point of one spawned rank: join the group from torchrun-style variables, run a scenario, save."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    out: dict = {}
    ctx = None
    try:
        ctx = init_from_env("cpu", timeout_s=60)
        out["ctx"] = ctx
        SCENARIOS[scenario](ctx, out, Path(outdir))
    except BaseException as error:  # report, not raise: the parent checks what each rank saw
        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()
    finally:
        out["finished"] = time.time()
        with open(Path(outdir) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(out, handle)
        shutdown(ctx)


def _scenario_analyze(ctx, out, outdir):
    for bn_mode in BN_MODES:
        op = _problem(bn_mode, ctx)
        out[f"{bn_mode}_local_batches"] = len(op.batches)
        out[f"{bn_mode}_num_examples"] = op.num_examples
        result = analyze(op, SETTINGS)
        verify_identical(ctx, result_fingerprint(result), f"{bn_mode} result")
        out[bn_mode] = result


def _capture(out, name, fn):
    start = time.time()
    try:
        fn()
        out[name] = None
    except Exception as error:
        out[name] = (type(error).__name__, str(error), type(error.__cause__).__name__)
    out[name + "_s"] = time.time() - start


def _scenario_failures(ctx, out, outdir):
    good, bad = outdir / "good.pt", outdir / "bad.pt"

    def load():  # rank 1 meets a truncated checkpoint, rank 0 a good one
        with sync_errors(ctx, "loading the checkpoint"):
            load_checkpoint(bad if ctx.rank == 1 else good)

    _capture(out, "bad_checkpoint", load)

    def nan_on_rank1():  # a NaN in one rank's data is seen by all: sums are all-reduced
        torch.manual_seed(0)
        model = build_model("mlp-bn", width=16, depth=3).double()
        x = torch.randn(32, 64, dtype=torch.float64)
        if ctx.rank == 1:
            x[3, 5] = float("nan")
        op = HessianOperator(model, [(x, torch.arange(32) % 10)], all_reduce=ctx.all_reduce)
        analyze(op, AnalysisSettings(lanczos_steps=4, probes=1, top_k=2))

    _capture(out, "nan", nan_on_rank1)

    def all_fail():
        with sync_errors(ctx, "reading"):
            raise ValueError("same on every rank")

    _capture(out, "all_fail", all_fail)

    def writer_fails():
        def write():
            raise OSError("disk full")

        on_main(ctx, write, "writing results")

    _capture(out, "on_main", writer_fails)
    out["on_main_value"] = on_main(ctx, lambda: {"todo": [1, 2]} if ctx.rank == 0 else None)
    _capture(out, "diverged", lambda: verify_identical(ctx, f"print-{ctx.rank}", "the Ritz values"))
    _capture(out, "too_few_batches", lambda: ctx.shard_batches([1]))
    ctx.barrier()
    out["survived"] = True  # the group still works after the agreed failures

    # Last, as it breaks the group: a rank crashes (OOM killer, segfault) while rank 0 waits in an all-reduce.
    op = _problem("train", ctx)
    if ctx.rank == 1:
        with open(outdir / "rank1.pkl", "wb") as handle:
            pickle.dump(out, handle)
        os._exit(3)
    _capture(out, "dead_rank", lambda: analyze(op, SETTINGS))


# The pipeline under 2 ranks: a BN network in float64 on 80 digits in 5 batches of 16 (ranks hold 2 and 3).
PIPELINE_JOB = pipeline.AnalysisJob(
    model="mlp-bn",
    data="digits",
    model_args={"width": 8, "depth": 2},
    samples=80,
    batch_size=16,
    dtype="float64",
    device="cpu",
    settings=AnalysisSettings(lanczos_steps=5, probes=2, top_k=2, seed=1),
)
PIPELINE_STEPS = (0, 10)


def _scenario_pipeline(ctx, out, outdir):
    hooks = pipeline_hooks(ctx)
    checkpoints = [str(outdir / "ckpt_*.pt")]
    report = pipeline.run(PIPELINE_JOB, checkpoints, outdir / "dp.h5", **hooks)
    out["analysed"] = [(r.step, r.n_samples) for r in report.analysed]

    real_check_memory = pipeline.check_memory

    def short_on_rank1(n, settings, chains, device, **kwargs):  # rank 1 alone lacks memory for the Lanczos bases
        if ctx.rank == 1:
            raise MemoryError("the Lanczos bases need 9.00 GiB but cpu has 1.00 GiB free")
        return real_check_memory(n, settings, chains, device, **kwargs)

    pipeline.check_memory = short_on_rank1
    try:
        _capture(out, "memory", lambda: pipeline.run(PIPELINE_JOB, checkpoints, outdir / "memory.h5", **hooks))
    finally:
        pipeline.check_memory = real_check_memory

    real_fingerprint = distributed.result_fingerprint
    distributed.result_fingerprint = lambda result: "x" if ctx.rank == 1 else real_fingerprint(result)
    try:
        _capture(out, "diverged", lambda: pipeline.run(PIPELINE_JOB, checkpoints, outdir / "diverged.h5", **hooks))
    finally:
        distributed.result_fingerprint = real_fingerprint
    ctx.barrier()
    out["survived"] = True


SCENARIOS = {"analyze": _scenario_analyze, "failures": _scenario_failures, "pipeline": _scenario_pipeline}


def _launch(scenario: str, outdir: Path, timeout_s: float = 60, meanwhile=None) -> list[dict | None]:
    """Run a scenario on 2 spawned ranks; ``meanwhile()`` runs in this process while they work."""
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_rank_main, args=(r, port, scenario, str(outdir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    try:
        if meanwhile is not None:
            meanwhile()
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s (a hang)"
    results = []
    for r in range(WORLD):
        path = outdir / f"rank{r}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else None)
    return results


# ------------------------------------------------------------------------------------------- data parallel


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank results, and the single-process ones (computed while the ranks run)."""
    outdir = tmp_path_factory.mktemp("dp")
    single = {}

    def reference():
        for bn_mode in BN_MODES:
            single[bn_mode] = analyze(_problem(bn_mode), SETTINGS)

    ranks = _launch("analyze", outdir, meanwhile=reference)
    for r, out in enumerate(ranks):
        assert out is not None and "error" not in out, f"rank {r}: {out and out.get('traceback')}"
    return ranks, single


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_two_ranks_equal_single_process(runs, bn_mode):
    two_rank_results, singles = runs
    single = singles[bn_mode]
    rank0, rank1 = (out[bn_mode] for out in two_rank_results)
    assert [out[f"{bn_mode}_local_batches"] for out in two_rank_results] == [2, 3]
    assert [out[f"{bn_mode}_num_examples"] for out in two_rank_results] == [SAMPLES, SAMPLES]
    # The ranks hold the same numbers, bit for bit (identical Lanczos state).
    for name in ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2"):
        np.testing.assert_array_equal(getattr(rank0, name), getattr(rank1, name), err_msg=name)
    assert (rank0.loss, rank0.grad_norm, rank0.trace) == (rank1.loss, rank1.grad_norm, rank1.trace)
    # ... and equal the single-process analysis to rounding.
    for name in ("nodes", "weights", "top_eigenvalues", "overlap_ratio", "cos2"):
        np.testing.assert_allclose(getattr(rank0, name), getattr(single, name), rtol=0, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(rank0.gradient_nodes, single.gradient_nodes, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rank0.gradient_weights, single.gradient_weights, rtol=0, atol=1e-10)
    assert rank0.loss == pytest.approx(single.loss, rel=1e-12)
    assert rank0.grad_norm == pytest.approx(single.grad_norm, rel=1e-12)
    assert rank0.n_samples == single.n_samples == SAMPLES
    assert single.top_eigenvalues[0] > 0.1  # a real spectrum, not a degenerate one


def test_rank_contexts(runs):
    contexts = [out["ctx"] for out in runs[0]]
    assert [(c.rank, c.world_size, c.local_rank, c.backend, c.is_main) for c in contexts] == [
        (0, 2, 0, "gloo", True),
        (1, 2, 1, "gloo", False),
    ]
    assert all(c.device == torch.device("cpu") for c in contexts)


# ------------------------------------------------------------------------------------------------- failures


def test_failure_on_one_rank_ends_all_ranks_with_its_message(tmp_path):
    torch.save({"model": {"w": torch.ones(3)}, "step": 5}, tmp_path / "good.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:40])
    start = time.time()
    ranks = _launch("failures", tmp_path)
    assert time.time() - start < 45
    # A rank that dies inside a collective does not leave the others waiting: rank 0's all-reduce fails.
    assert ranks[0]["dead_rank"] is not None
    assert ranks[0]["dead_rank_s"] < 20
    for r, out in enumerate(ranks):
        assert out is not None and "error" not in out, f"rank {r}: {out and out.get('traceback')}"
        assert out["survived"]

        kind, message, cause = out["bad_checkpoint"]
        assert kind == "DistributedError"
        assert "1 of 2 ranks failed while loading the checkpoint" in message
        assert "rank 1: CheckpointError: checkpoint" in message and "bad.pt" in message
        assert "truncated or corrupt" in message and "rank 0:" not in message
        assert cause == ("CheckpointError" if r == 1 else "NoneType")
        assert out["bad_checkpoint_s"] < 5

        kind, message, _ = out["nan"]
        assert kind == "FloatingPointError" and "not finite" in message

        kind, message, _ = out["all_fail"]
        assert message == "2 of 2 ranks failed while reading: ranks 0, 1: ValueError: same on every rank"

        kind, message, _ = out["on_main"]
        assert kind == "DistributedError" and "rank 0: OSError: disk full" in message and "writing results" in message
        assert out["on_main_value"] == {"todo": [1, 2]}

        kind, message, _ = out["diverged"]
        assert kind == "DistributedError" and "different values for the Ritz values" in message

        kind, message, _ = out["too_few_batches"]
        assert kind == "DistributedError" and "1 batch(es) cannot be shared by 2 ranks" in message


def test_pipeline_on_two_ranks(tmp_path):
    """pipeline.run with pipeline_hooks: the single-process results, world_size recorded, and a rank's memory
    shortage or a diverged result stops both ranks with the message, before anything is written."""
    for i, step in enumerate(PIPELINE_STEPS):
        torch.manual_seed(i)
        model = build_model("mlp-bn", width=8, depth=2)
        torch.save({"model": model.state_dict(), "step": step}, tmp_path / f"ckpt_{step:03d}.pt")
    single = {}

    def reference():
        report = pipeline.run(PIPELINE_JOB, [str(tmp_path / "ckpt_*.pt")], tmp_path / "single" / "one.h5")
        single.update({r.step: r for r in report.analysed})

    (tmp_path / "single").mkdir()
    ranks = _launch("pipeline", tmp_path, meanwhile=reference)
    for r, out in enumerate(ranks):
        assert out is not None and "error" not in out, f"rank {r}: {out and out.get('traceback')}"
        assert out["survived"]
        assert out["analysed"] == [(0, 80), (10, 80)]  # both ranks hold the global results

        kind, message, _ = out["memory"]
        assert kind == "DistributedError"
        assert message == (
            "1 of 2 ranks failed while checking memory for step 0: rank 1: MemoryError: the Lanczos bases need "
            "9.00 GiB but cpu has 1.00 GiB free"
        )
        assert out["memory_s"] < 10

        kind, message, _ = out["diverged"]
        assert kind == "DistributedError" and "different values for step 0" in message

    stored = load_results(tmp_path / "dp.h5")
    assert stored.config["world_size"] == 2
    assert "world_size" not in load_results(tmp_path / "single" / "one.h5").config
    for result in stored.checkpoints:
        for name in ("nodes", "weights", "top_eigenvalues", "overlap_ratio"):
            np.testing.assert_allclose(
                getattr(result, name), getattr(single[result.step], name), rtol=0, atol=1e-10, err_msg=name
            )
    assert load_results(tmp_path / "memory.h5").steps == ()
    assert load_results(tmp_path / "diverged.h5").steps == ()


def test_pipeline_hooks_without_a_process_group():
    ctx = _ctx(1, 3)
    hooks = pipeline_hooks(ctx)
    assert set(hooks) == {"all_reduce", "is_main", "shard_batches", "sync", "verify", "world_size"}
    assert hooks["is_main"] is False and hooks["world_size"] == 3
    assert hooks["shard_batches"](list(range(6))) == [2, 3]


def test_agree_without_context_reraises_unchanged():
    error = KeyError("x")
    with pytest.raises(KeyError) as caught:
        agree_or_raise(None, error)
    assert caught.value is error
    agree_or_raise(None, None)
    with pytest.raises(ValueError, match="boom"), sync_errors(None):
        raise ValueError("boom")
    assert on_main(None, lambda: 7) == 7
    verify_identical(None, "anything")


class _FakeContext:
    """Stands in for a context whose ranks reported ``reports`` (agree_or_raise only gathers)."""

    def __init__(self, reports):
        self.world_size = len(reports)
        self.reports = reports

    def all_gather_object(self, _obj):
        return self.reports


def test_agreed_message_groups_ranks_with_the_same_error():
    ctx = _FakeContext(["A", None, "B", "A", "A", "A", None, "A"])
    with pytest.raises(DistributedError) as caught:
        agree_or_raise(ctx, None, "loading x")
    assert str(caught.value) == "6 of 8 ranks failed while loading x: ranks 0, 3, 4, 5, 7: A; rank 2: B"
    with pytest.raises(DistributedError, match=r"^4 of 4 ranks failed: ranks 0-3: A$"):
        agree_or_raise(_FakeContext(["A"] * 4), None)
    agree_or_raise(_FakeContext([None, None]), None)


# ------------------------------------------------------------------------------------------ init from env


def test_single_process_environments_give_no_context():
    assert init_from_env("cpu", env={}) is None
    assert init_from_env("cpu", env={"WORLD_SIZE": "1", "RANK": "0"}) is None


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set; launch the ranks with"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
            r"RANK=2 must lie in 0..WORLD_SIZE-1 \(1\)",
        ),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "x",
                "MASTER_PORT": "1",
                "HESSSPEC_DIST_TIMEOUT_S": "-3",
            },
            r"timeout must be a positive number of seconds",
        ),
    ],
)
def test_bad_torchrun_environments(env, match):
    with pytest.raises(DistributedError, match=match):
        init_from_env("cpu", env=env)


def test_unknown_device_is_refused():
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    with pytest.raises(DistributedError, match=r"unknown device 'gpu0'; expected auto, cpu, cuda or cuda:INDEX"):
        init_from_env("gpu0", env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_rank_without_gpu_is_refused():
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    with pytest.raises(DistributedError, match=r"sees no CUDA device"):
        init_from_env("cuda", env=env)


def _ctx(rank: int, world: int) -> DistributedContext:
    return DistributedContext(rank, world, rank, torch.device("cpu"), "gloo")


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_batches", [7, 8, 29])
def test_batch_blocks_are_contiguous_disjoint_and_cover(world, num_batches):
    blocks = [_ctx(r, world).shard_batches(list(range(num_batches))) for r in range(world)]
    assert [b for block in blocks for b in block] == list(range(num_batches))
    assert all(block for block in blocks)
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize(("examples", "batch", "world"), [(400, 64, 2), (400, 64, 3), (1797, 256, 4), (64, 64, 1)])
def test_example_range_matches_the_batch_blocks(examples, batch, world):
    data = torch.arange(examples)
    batches = list(data.split(batch))
    for r in range(world):
        ctx = _ctx(r, world)
        start, stop = ctx.example_range(examples, batch)
        mine = list(data[start:stop].split(batch))
        expected = ctx.shard_batches(batches)
        assert len(mine) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(mine, expected, strict=True))
