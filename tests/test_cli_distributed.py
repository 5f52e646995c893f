"""``hessspec analyze`` under torchrun, without starting ranks: what each rank prints and the counts it reports.

The rank's context is faked (``init_from_env`` patched) and ``pipeline.run`` replaced, so these tests need no
process group; tests/test_scripts.py runs the command under a real ``torchrun`` with 2 CPU ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from hessspec.cli import cli
from hessspec.cli.analyze import _Reporter
from hessspec.curvature.hessian import DeterminismError
from hessspec.runner import distributed, pipeline
from hessspec.runner.distributed import DistributedContext, DistributedError

ARGS = ["analyze", "ckpt.pt", "--model", "mlp", "--data", "digits", "--device", "cpu", "--out", "o.h5"]
AGREED = "2 of 2 ranks failed while loading ckpt.pt: ranks 0, 1: CheckpointError: checkpoint 'ckpt.pt' is truncated"


@pytest.fixture
def as_rank(monkeypatch):
    """``as_rank(rank, error)``: run ``hessspec analyze`` as that rank of 2, with ``pipeline.run`` raising ``error``."""

    def invoke(rank: int, error: Exception, *extra: str):
        ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        seen = {}

        def run(job, checkpoints, out, **hooks):
            seen.update(hooks)
            raise error

        monkeypatch.setattr(distributed, "init_from_env", lambda device: ctx)
        monkeypatch.setattr(pipeline, "run", run)
        result = CliRunner().invoke(cli, [*ARGS, *extra])
        return result, seen

    return invoke


@pytest.mark.parametrize(
    "error",
    [DistributedError(AGREED), FloatingPointError("the loss is not finite"), DeterminismError("passes differ")],
)
def test_an_error_every_rank_shares_is_printed_by_rank_0_only(as_rank, error):
    main, hooks = as_rank(0, error)
    assert main.exit_code == 1
    assert [line for line in main.stderr.splitlines() if line.startswith("Error:")] == [f"Error: {error}"]
    other, _ = as_rank(1, error)
    assert other.exit_code == 1 and other.stderr == "" and other.stdout == ""
    # The hooks of pipeline.run come from the rank's context.
    assert hooks["world_size"] == 2 and hooks["is_main"] is True and callable(hooks["verify"])


def test_an_error_of_one_rank_alone_is_printed_by_that_rank(as_rank):
    result, _ = as_rank(1, RuntimeError("Connection closed by peer"))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: rank 1: RuntimeError: Connection closed by peer (unexpected; rerun with --debug for the traceback)"
    ]
    memory, _ = as_rank(1, MemoryError("the Lanczos bases need 9.00 GiB"))
    assert "Error: rank 1: the Lanczos bases need 9.00 GiB" in memory.stderr


def test_debug_shows_every_ranks_traceback(as_rank):
    result, _ = as_rank(1, DistributedError(AGREED), "--debug")
    assert isinstance(result.exception, DistributedError)


def test_planned_line_counts_the_data_of_all_ranks(capsys):
    prepared = SimpleNamespace(
        job=SimpleNamespace(model="mlp-bn", data="digits", dtype="float64"),
        num_params=1234,
        num_examples=32,  # rank 0's share: 2 of the 5 batches
        batches=[None, None],
        total_examples=80,
        total_batches=5,
        device=torch.device("cpu"),
    )
    _Reporter("o.h5", quiet=False, world_size=2).planned([1, 2], [False, True], prepared)
    line = capsys.readouterr().err.strip()
    assert line == (
        "analysing 1 of 2 checkpoint(s), 1 already in o.h5: mlp-bn (1,234 parameters) on digits (80 examples in 5 "
        "batches over 2 ranks), cpu, float64"
    )
    _Reporter("o.h5", quiet=False).planned([1], [False], prepared)
    assert "(80 examples in 5 batches), cpu" in capsys.readouterr().err


def test_help_explains_shards_and_torchrun():
    text = CliRunner().invoke(cli, ["analyze", "--help"], terminal_width=100).output
    flat = " ".join(text.split())
    assert "--shard I/N|slurm" in flat and "hessspec merge OUT.h5 OUT.shard-*-of-N.h5" in flat
    assert "torchrun --standalone --nproc-per-node G -m hessspec analyze" in flat
