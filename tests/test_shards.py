"""Tests of hessspec.runner.shards: --shard I/N and SLURM array variables, stable disjoint partitions, file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hessspec.runner.shards import (
    ShardError,
    ShardSpec,
    checkpoint_sort_key,
    parse_shard,
    select_shard,
    shard_output_path,
)


def test_parse_shard():
    assert parse_shard("0/4") == ShardSpec(0, 4)
    assert parse_shard(" 3 / 4 ") == ShardSpec(3, 4)
    assert parse_shard(ShardSpec(1, 2)) == (1, 2)
    assert str(parse_shard("2/5")) == "2/5"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("4/4", r"0 <= I < N"),
        ("0/0", r"N >= 1"),
        ("1-4", r"must be I/N"),
        ("-1/4", r"must be I/N"),
        ("a/b", r"must be I/N"),
        ("", r"must be I/N"),
        (ShardSpec(5, 2), r"0 <= I < N"),
    ],
)
def test_bad_shard_specs(spec, match):
    with pytest.raises(ShardError, match=match):
        parse_shard(spec)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (2, 4),
        ),
    ],
)
def test_slurm_shards(env, expected):
    assert parse_shard("slurm", env) == expected
    assert parse_shard("SLURM", env) == expected


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({}, r"SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT not set; outside an array job give --shard I/N"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, r"SLURM_ARRAY_TASK_COUNT not set"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, r"SLURM_ARRAY_TASK_ID='x' is not an integer"),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, r"cannot map"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, r"cannot map"),
    ],
)
def test_bad_slurm_environments(env, match):
    with pytest.raises(ShardError, match=match):
        parse_shard("slurm", env)


def test_slurm_reads_os_environ(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_STEP", raising=False)
    assert select_shard(list("abcdefg"), "slurm") == ["b", "e"]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 12, 20])
def test_select_shard_partitions_stably(count):
    paths = [f"runs/ckpt_{step:06d}.pt" for step in (0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200)]
    shuffled = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    shards = [select_shard(shuffled, f"{i}/{count}", key=checkpoint_sort_key) for i in range(count)]
    assert sorted(p for shard in shards for p in shard) == sorted(paths)
    assert sum(map(len, shards)) == len(paths)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Round-robin over the step order, independent of the order given.
    assert shards[0] == paths[::count]
    assert [select_shard(paths, f"{i}/{count}", key=checkpoint_sort_key) for i in range(count)] == shards


def test_checkpoint_sort_key_orders_by_step():
    names = ["b/step=1200.ckpt", "a/ckpt_300.pt", "final.pt", "a/ckpt_2000.pt"]
    assert sorted(names, key=checkpoint_sort_key) == ["final.pt", "a/ckpt_300.pt", "b/step=1200.ckpt", "a/ckpt_2000.pt"]
    assert select_shard(names, "0/1") == names  # no key: the given order


def test_shard_output_path():
    assert shard_output_path("results/bn.h5", "3/16") == Path("results/bn.shard-03-of-16.h5")
    assert shard_output_path("bn.h5", "0/1") == Path("bn.shard-0-of-1.h5")
    assert shard_output_path("out/run", "1/3") == Path("out/run.shard-1-of-3.h5")
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "10"}
    assert shard_output_path("r.h5", "slurm", env) == Path("r.shard-5-of-10.h5")
