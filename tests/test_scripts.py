"""Tests of scripts/: the CIFAR trainer, the SLURM templates (their command lines run locally, without sbatch) and
the paper-reproduction driver end to end, on a tiny CIFAR-10 directory in the real on-disk format, on the CPU.

The SLURM templates are run with bash as SLURM would run them, with the SLURM_* variables an array task or a
multi-GPU job sees; ``torchrun`` starts 2 ranks on the CPU with gloo.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessspec.checkpoints import load_checkpoint
from hessspec.models import build_model
from hessspec.store import load_results
from tests.test_datasets import write_cifar

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent
HESSSPEC = f"{sys.executable} -m hessspec"


# --------------------------------------------------------------------------------------------------- helpers


def _env(**variables: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.update({k: str(v) for k, v in variables.items()})
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def _results(path: Path) -> dict:
    return {c.step: c for c in load_results(path).checkpoints}


def _assert_same_results(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for name in ("nodes", "weights", "top_eigenvalues", "overlap_ratio", "cos2"):
            np.testing.assert_allclose(
                getattr(a[step], name), getattr(b[step], name), rtol=0, atol=atol, err_msg=f"step {step} {name}"
            )


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 root in torchvision's layout: 5 pickled batches of 16 random uint8 images."""
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar(root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], 16, "labels", 10)
    return root


# ------------------------------------------------------------------------------------------- train_cifar.py


def _load_trainer():
    spec = importlib.util.spec_from_file_location("train_cifar", SCRIPTS / "train_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_schedule_and_augmentation():
    trainer = _load_trainer()
    assert trainer.checkpoint_steps(64_000, 100, []) == [
        0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 64000,
    ]  # fmt: skip
    assert trainer.checkpoint_steps(5, 1, [3, 99]) == [0, 1, 2, 3, 4, 5]
    assert trainer.checkpoint_steps(10, 0, []) == [0, 10]
    lr = [trainer.learning_rate(s, 0.1, 0, [32_000, 48_000], 0.1) for s in (0, 31_999, 32_000, 48_000)]
    np.testing.assert_allclose(lr, [0.1, 0.1, 0.01, 0.001])
    np.testing.assert_allclose(
        [trainer.learning_rate(s, 0.01, 4, [], 0.1) for s in range(5)], [0.0025, 0.005, 0.0075, 0.01, 0.01]
    )
    args = trainer.parse_args(["--data", "x", "--out", "y"])
    assert args.milestone_steps == [32_000, 48_000]
    assert trainer._settings(args, batch_norm=False)["lr"] == 0.01
    assert trainer._settings(args, batch_norm=False)["warmup"] == 1000
    assert trainer._settings(args, batch_norm=True)["lr"] == 0.1
    assert trainer._settings(args, batch_norm=True)["warmup"] == 0

    images = torch.randn(6, 3, 32, 32)
    out = trainer.augment(images, torch.Generator().manual_seed(0))
    again = trainer.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(out, again)
    # Every augmented image is a (possibly flipped) 32x32 window of the zero-padded original.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for k in range(6):
        windows = [padded[k, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out[k], w) or torch.equal(out[k], w.flip(-1)) for w in windows)


def test_train_cifar_saves_checkpoints_and_resumes_exactly(cifar_root, tmp_path):
    base = [
        sys.executable, str(SCRIPTS / "train_cifar.py"), "--data", str(cifar_root), "--model", "cifar-resnet20",
        "--steps", "4", "--batch-size", "16", "--first-checkpoint", "1", "--device", "cpu", "--log-every", "1",
    ]  # fmt: skip
    env = _env()
    done = _run([*base, "--out", str(tmp_path / "a")], env, tmp_path)
    assert "checkpoints at [0, 1, 2, 4]" in done.stdout
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "ckpt_000000.pt", "ckpt_000001.pt", "ckpt_000002.pt", "ckpt_000004.pt", "last.pt", "settings.json",
        "train_log.csv",
    ]  # fmt: skip
    keys = set(build_model("cifar-resnet20").state_dict())
    for step in (0, 1, 2, 4):
        raw = torch.load(tmp_path / "a" / f"ckpt_{step:06d}.pt", weights_only=True)
        assert set(raw) == {"model", "step"} and raw["step"] == step
        assert set(raw["model"]) == keys
        assert load_checkpoint(tmp_path / "a" / f"ckpt_{step:06d}.pt").step == step
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert last["step"] == 4 and "optimizer" in last and last["optimizer"]["state"]
    lines = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    assert lines[0] == "step,lr,loss,batch_accuracy,seconds" and len(lines) == 5
    assert not torch.equal(
        torch.load(tmp_path / "a" / "ckpt_000000.pt")["model"]["linear.weight"],
        torch.load(tmp_path / "a" / "ckpt_000004.pt")["model"]["linear.weight"],
    )

    # Interrupted after 3 steps, then resumed from last.pt: the same weights, bit for bit.
    first = _run([*base, "--out", str(tmp_path / "b"), "--stop-after", "3"], env, tmp_path)
    assert "stopping after 3 steps at step 3" in first.stdout
    assert not (tmp_path / "b" / "ckpt_000004.pt").exists()
    resumed = _run([*base, "--out", str(tmp_path / "b")], env, tmp_path)
    assert "steps 3..4" in resumed.stdout
    a = torch.load(tmp_path / "a" / "ckpt_000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt_000004.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "b" / "train_log.csv").read_text().splitlines()) == 5

    # A finished run returns at once; other settings are refused instead of mixing two runs.
    again = _run([*base, "--out", str(tmp_path / "a")], env, tmp_path)
    assert "steps 4..4" in again.stdout
    refused = subprocess.run(
        [*base, "--out", str(tmp_path / "a"), "--lr", "0.2"], env=env, capture_output=True, text=True, check=False
    )
    assert refused.returncode == 1
    assert "belongs to a run with other settings: lr (0.1 stored, 0.2 now)" in refused.stderr


# ------------------------------------------------------------------------------------------ SLURM templates


STEPS = (0, 10, 20, 30, 40)
# A tiny BN network on digits, in float64, so that results compare to rounding. With the gradient chain (3 chains):
# the third top pair is unconverged at 6 steps, and its Ritz value, which moves with the rounding of data-parallel
# sums, stays within 1e-10 of the single process's in the 18-dimensional union of Krylov spaces (it moved by 1.1e-10
# in the 12-dimensional union of the probes alone).
PROBLEM = {
    "MODEL": "mlp-bn",
    "EXTRA_ARGS": "--model-arg width=8 --model-arg depth=3 --crosscheck",
    "DATA": "digits",
    "SAMPLES": 80,
    "BATCH_SIZE": 16,  # 5 batches: the 2 ranks hold 2 and 3
    "LANCZOS_STEPS": 6,
    "PROBES": 2,
    "TOP_K": 3,
    "DTYPE": "float64",
    "DEVICE": "cpu",
    "HESSSPEC": HESSSPEC,
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Five checkpoints of a small BN network, and their single-process analysis with ``hessspec analyze``."""
    root = tmp_path_factory.mktemp("digits_run")
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        model = build_model("mlp-bn", width=8, depth=3)
        torch.save({"model": model.state_dict(), "step": step}, root / f"ckpt_{step:06d}.pt")
    reference = root / "single.h5"
    command = [
        sys.executable, "-m", "hessspec", "analyze", str(root / "ckpt_*.pt"), "--model", "mlp-bn",
        "--model-arg", "width=8", "--model-arg", "depth=3", "--data", "digits", "--samples", "80",
        "--batch-size", "16", "--lanczos-steps", "6", "--probes", "2", "--top-k", "3", "--dtype", "float64",
        "--device", "cpu", "--crosscheck", "--out", str(reference),
    ]  # fmt: skip
    _run(command, _env(), root)
    return root, _results(reference)


def test_array_template_shards_merge_and_resume(digits_run, tmp_path):
    root, reference = digits_run
    out = tmp_path / "results" / "run.h5"
    script = str(SCRIPTS / "slurm" / "analyze_array.sbatch")
    common = {**PROBLEM, "CHECKPOINTS": str(root / "ckpt_*.pt"), "OUT": out}
    # An array submitted as --array=1-2: task ids 1 and 2, shards 0 and 1 of 2.
    for task in (1, 2):
        env = _env(**common, SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT=2, SLURM_ARRAY_TASK_MIN=1,
                   SLURM_JOB_ID=100 + task)  # fmt: skip
        _run(["bash", script], env, tmp_path)
    shards = sorted((tmp_path / "results").glob("run.shard-*-of-2.h5"))
    assert [p.name for p in shards] == ["run.shard-0-of-2.h5", "run.shard-1-of-2.h5"]
    # Round-robin over the step order: every task gets early and late checkpoints.
    assert sorted(_results(shards[0])) == [0, 20, 40]
    assert sorted(_results(shards[1])) == [10, 30]
    assert not out.exists()

    done = _run(["bash", script, "merge"], _env(**common), tmp_path)
    assert "merging 2 shard files" in done.stdout
    _assert_same_results(_results(out), reference, atol=1e-12)

    # A requeued task reruns: everything it owns is already there, nothing is recomputed.
    before = shards[0].stat().st_mtime_ns
    env = _env(**common, SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=2, SLURM_ARRAY_TASK_MIN=1)
    rerun = _run(["bash", script], env, tmp_path)
    assert rerun.stdout.count("skipped") == 3
    assert shards[0].stat().st_mtime_ns == before
    # ... and a task outside an array is told how to run.
    bare = subprocess.run(["bash", script], env=_env(**common), capture_output=True, text=True, check=False)
    assert bare.returncode != 0 and "submit with sbatch --array" in bare.stderr


def test_multigpu_template_with_two_cpu_ranks_equals_one_process(digits_run, tmp_path):
    root, reference = digits_run
    out = tmp_path / "results" / "dp.h5"
    env = _env(
        **PROBLEM, CHECKPOINTS=str(root / "ckpt_*.pt"), OUT=out, NPROC_PER_NODE=2, SLURM_NNODES=1,
        SLURM_CPUS_PER_TASK=2, SLURM_JOB_ID=7, HESSSPEC_DIST_TIMEOUT_S=120,
    )  # fmt: skip
    script = str(SCRIPTS / "slurm" / "analyze_multigpu.sbatch")
    done = _run(["bash", script], env, tmp_path)
    assert "1 node(s) x 2 rank(s)" in done.stdout
    results = _results(out)
    _assert_same_results(results, reference, atol=1e-10)
    assert all(r.n_samples == 80 for r in results.values())
    assert load_results(out).config["world_size"] == 2
    # Only rank 0 reports, with the counts of the whole data: one summary line per checkpoint.
    assert sum(line.startswith("step") for line in done.stdout.splitlines()) == len(STEPS)
    assert "(80 examples in 5 batches over 2 ranks)" in done.stderr

    # A checkpoint that every rank fails to read: one Error line (rank 0's), and torchrun fails.
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (root / "ckpt_000010.pt").read_bytes()
    (broken / "ckpt_000010.pt").write_bytes(data[: len(data) // 2])
    env.update(CHECKPOINTS=str(broken / "ckpt_*.pt"), OUT=str(tmp_path / "results" / "broken.h5"))
    failed = subprocess.run(["bash", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, failed.stderr
    assert "2 of 2 ranks failed while reading the checkpoints: ranks 0, 1: CheckpointError" in errors[0]
    assert "ckpt_000010.pt" in errors[0]


# ------------------------------------------------------------------------------------------ reproduce_paper.sh


PAPER = {  # the paper's study scaled down to seconds: ResNet-20, 2 SGD steps, 16 examples, 3 Lanczos steps
    "MODEL_BN": "cifar-resnet20",
    "MODEL_NOBN": "cifar-resnet20-nobn",
    "TRAIN_STEPS": 2,
    "TRAIN_BATCH": 16,
    "FIRST_CKPT": 1,
    "SAMPLES": 16,
    "BATCH_SIZE": 16,
    "LANCZOS_STEPS": 3,
    "PROBES": 1,
    "TOP_K": 1,  # a 3-dimensional Krylov space resolves one top eigenpair
    "DEVICE": "cpu",
    "PYTHON": sys.executable,
    "HESSSPEC": HESSSPEC,
    "ANALYZE_ARGS": "--no-crosscheck",
}

# sbatch for the tests: runs the job at once, in the foreground, with the variables SLURM gives an array task.
FAKE_SBATCH = r"""#!/usr/bin/env bash
set -euo pipefail
array="" wrap="" script=""
while (( $# )); do
    case "$1" in
        --array=*) array=${1#--array=} ;;
        --wrap) wrap=$2; shift ;;
        --wrap=*) wrap=${1#--wrap=} ;;
        --wait|--parsable|--requeue) ;;
        -*) [[ "$1" == *=* ]] || { [[ "${2:-}" == -* ]] || shift; } ;;
        *) script=$1; shift; break ;;
    esac
    shift
done
echo "sbatch array=${array:-none} ${script:-wrap}" >> "$SBATCH_LOG"
if [[ -n "$wrap" ]]; then exec bash -c "$wrap"; fi
if [[ -z "$array" ]]; then exec bash "$script" "$@"; fi
first=${array%-*} last=${array#*-}
for (( id = first; id <= last; id++ )); do
    SLURM_ARRAY_TASK_ID=$id SLURM_ARRAY_TASK_MIN=$first SLURM_ARRAY_TASK_COUNT=$(( last - first + 1 )) \
        SLURM_JOB_ID=$(( 1000 + id )) bash "$script" "$@"
done
"""


@pytest.fixture(scope="module")
def paper_run(cifar_root, tmp_path_factory):
    """scripts/reproduce_paper.sh run locally on the tiny CIFAR-10 directory."""
    root = tmp_path_factory.mktemp("paper")
    env = _env(**PAPER, CIFAR10_ROOT=cifar_root, RUNS=root / "runs", RESULTS=root / "results" / "cifar10")
    done = _run(["bash", str(SCRIPTS / "reproduce_paper.sh"), "local"], env, root, timeout=600)
    return root, env, done


@pytest.mark.slow
def test_reproduce_paper_end_to_end(paper_run):
    root, env, _ = paper_run
    results = root / "results" / "cifar10"
    for run in ("bn", "nobn"):
        assert sorted(p.name for p in (root / "runs" / run).glob("ckpt_*.pt")) == [
            "ckpt_000000.pt", "ckpt_000001.pt", "ckpt_000002.pt",
        ]  # fmt: skip
        stored = _results(results / f"{run}.h5")
        assert sorted(stored) == [0, 1, 2]
        assert all(r.n_samples == 16 and r.lanczos_steps == 3 and r.probes == 1 for r in stored.values())
        assert all(np.isfinite(r.top_eigenvalues).all() for r in stored.values())
    for figure in ("density_bn.png", "density_nobn.png", "evolution.png"):
        assert (results / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (results / "summary.txt").read_text()
    assert "label:       ResNet-20, no BN" in summary and "label:       ResNet-20, BN" in summary

    # Rerun: training and analysis resume (nothing left to do), the figures are drawn again.
    again = _run(["bash", str(SCRIPTS / "reproduce_paper.sh"), "local"], env, root, timeout=600)
    assert again.stdout.count("steps 2..2") == 2
    assert (again.stdout + again.stderr).count("skipped") >= 6


@pytest.mark.slow
def test_reproduce_paper_slurm_mode_matches_local(paper_run, tmp_path):
    root, env, _ = paper_run
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(FAKE_SBATCH)
    (fake_bin / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {
        **env,
        "PATH": f"{fake_bin}{os.pathsep}{env['PATH']}",
        "RESULTS": str(tmp_path / "results"),
        "ARRAY_TASKS": "2",
        "LOGS": str(tmp_path / "logs"),
        "SBATCH_LOG": str(log),
    }
    _run(["bash", str(SCRIPTS / "reproduce_paper.sh"), "slurm"], env, tmp_path, timeout=600)
    submitted = log.read_text().splitlines()
    assert submitted.count("sbatch array=none wrap") == 2  # the two trainings (already finished: they resume)
    assert submitted.count(f"sbatch array=0-1 {SCRIPTS / 'slurm' / 'analyze_array.sbatch'}") == 2
    for run in ("bn", "nobn"):
        assert sorted(p.name for p in (tmp_path / "results").glob(f"{run}.shard-*.h5")) == [
            f"{run}.shard-0-of-2.h5", f"{run}.shard-1-of-2.h5",
        ]  # fmt: skip
        merged = _results(tmp_path / "results" / f"{run}.h5")
        local = _results(root / "results" / "cifar10" / f"{run}.h5")
        _assert_same_results(merged, local, atol=1e-9)
    assert (tmp_path / "results" / "evolution.png").exists()


# ------------------------------------------------------------------------------------------ benchmarks/vs_peers.py


@pytest.mark.slow
def test_vs_peers_benchmark_smoke_run():
    # The peers come with the 'bench' extra (make bench); without them only hessspec's part runs, and the test says
    # so in its output instead of passing silently.
    peers = [p for p in ("pyhessian", "curvlinops") if importlib.util.find_spec(p) is not None]
    tools = ",".join(["hessspec", *peers])
    if len(peers) < 2:
        print(f"vs_peers smoke run without {sorted({'pyhessian', 'curvlinops'} - set(peers))}: not importable")
    command = [sys.executable, "-W", "ignore", str(REPO / "benchmarks" / "vs_peers.py"), "--quick", "--tools", tools]
    done = _run(command, _env(), REPO, timeout=600)
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| cnn ")]
    names = {"hessspec", "hessspec (BN eval)", "hessspec (BN train)"}
    for peer, name in (("pyhessian", "PyHessian"), ("curvlinops", "curvlinops")):
        if peer in peers:
            names |= {name, f"{name} (BN eval)"}
    assert {row[2] for row in rows} == names, done.stdout
    for row in rows:
        assert row[1] == "2x2"
        assert float(row[3]) > 0 and float(row[4]) > 0 and np.isfinite(float(row[7].rstrip(" |")))
        assert row[6].endswith(("(whole SLQ)", "traced)", "vmap)", "reverse)", "loop)"))
