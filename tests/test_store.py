"""The HDF5 result format: round trips, the version-1 and -2 contracts, resume, crash safety, locking, merge, export.

Per-(curvature, block) results, reading and upgrading version-1 files: tests/test_store_v2.py.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest

import hessspec
from hessspec import store
from hessspec.linalg import spectrum
from hessspec.results import CheckpointResult
from hessspec.store import ResultWriter, StoreError, _h5files, load_results, summary

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": "mlp-6x64",
    "data": "digits",
    "batch_size": 128,
    "bn_mode": "train",
    "dtype": "float32",
    "seed": 0,
    "lanczos_steps": 12,
    "probes": 3,
    "overlap_k": [1, 2, 5],
    "device": "cpu",
    "label": "demo",
}

CONTRACT_GROUP_ATTRS = {
    "step", "source", "sha256", "model", "n_params", "n_samples", "bn_mode", "dtype", "device", "seed",
    "lanczos_steps", "probes", "loss", "grad_norm", "trace", "trace_stderr", "elapsed_s", "complete",
}  # fmt: skip
CONTRACT_DATASETS = {
    "slq/nodes": np.float64,
    "slq/weights": np.float64,
    "top/eigenvalues": np.float64,
    "top/residuals": np.float64,
    "overlap/k": np.int64,
    "overlap/ratio": np.float64,
    "overlap/cos2": np.float64,
}


def make_result(
    step: int,
    *,
    seed: int | None = None,
    sha256: str | None = None,
    probes: int = 3,
    m: int = 12,
    k: int = 6,
    gradient: bool = True,
    **changes,
) -> CheckpointResult:
    """A realistic result: quadrature from random tridiagonals (rows of weights sum to 1), deterministic in seed."""
    rng = np.random.default_rng(step if seed is None else seed)
    n = 500
    alpha = rng.normal(0.0, 1.0, size=(probes, m))
    alpha[:, 0] += 20.0  # an outlier
    beta = rng.uniform(0.1, 1.0, size=(probes, m - 1))
    quad = spectrum.quadrature(alpha, beta)
    top = np.sort(quad.nodes[0])[::-1][:k]
    overlap_k = np.array([r for r in (1, 2, 5) if r <= k], dtype=np.int64)
    cos2 = rng.dirichlet(np.ones(k + 1))[:k]
    grad = spectrum.quadrature(rng.normal(size=(1, m)), rng.uniform(0.1, 1.0, size=(1, m - 1)))
    trace, trace_stderr = spectrum.trace_estimate(quad.nodes, quad.weights, n)
    values = dict(
        step=step,
        loss=float(rng.uniform(0.1, 2.0)),
        grad_norm=float(rng.uniform(0.1, 5.0)),
        trace=trace,
        trace_stderr=trace_stderr,
        nodes=quad.nodes,
        weights=quad.weights,
        top_eigenvalues=top,
        top_residuals=rng.uniform(1e-8, 1e-2, size=len(top)),
        overlap_k=overlap_k,
        overlap_ratio=np.cumsum(cos2)[overlap_k - 1],
        cos2=cos2,
        n_params=n,
        n_samples=1797,
        bn_mode="train",
        dtype="float32",
        device="cpu",
        seed=0,
        lanczos_steps=m,
        probes=probes,
        elapsed_s=float(rng.uniform(1, 100)),
        source=f"runs/nobn/ckpt_{step:05d}.pt",
        sha256=f"{step:08x}" + "ab" * 28 if sha256 is None else sha256,
        model="mlp-6x64 (ReLU, no BN) — ünïcode",
        gradient_nodes=grad.nodes[0] if gradient else None,
        gradient_weights=grad.weights[0] if gradient else None,
        timings={"hvp": 1.5, "lanczos": 0.25, "gradient": 0.125},
        settings={"bn_mode": "train", "probes": probes, "overlap_k": [1, 2, 5]},
    )
    values.update(changes)
    return CheckpointResult(**values)


def assert_same_result(a: CheckpointResult, b: CheckpointResult) -> None:
    for field in dataclasses.fields(CheckpointResult):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, field.name
            assert np.asarray(x).dtype == np.asarray(y).dtype, field.name
            np.testing.assert_array_equal(x, y, err_msg=field.name)
        else:
            assert x == y, field.name
            assert type(x) is type(y), field.name


def write_run(path: Path, steps, config=CONFIG, label="demo", format_version=None, **kwargs) -> list[CheckpointResult]:
    results = [make_result(step, **kwargs) for step in steps]
    with ResultWriter(path, label=label, config=config, format_version=format_version) as writer:
        for result in results:
            writer.write(result)
    return results


# --------------------------------------------------------------------------------------------------------------
# Round trip and the contract


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("gradient", [True, False])
def test_round_trip_every_field(tmp_path, gradient, version):
    path = tmp_path / "run.h5"
    written = write_run(path, [300, 0, 1200], gradient=gradient, format_version=version)
    run = load_results(path)
    assert run.steps == (0, 300, 1200)
    for a, b in zip(sorted(written, key=lambda r: r.step), run.checkpoints, strict=True):
        assert_same_result(a, b)
    assert run.label == "demo"
    assert run.config == CONFIG
    assert run.format_version == version
    assert run.results == run.checkpoints
    assert run.curvatures == ("hessian",) and run.blocks == ("all",)
    assert run.generated_by == f"hessspec {hessspec.__version__}"
    assert run.path == str(path)
    assert run.stale_steps == ()
    np.testing.assert_allclose(run.get(300).weights.sum(axis=1), 1.0, rtol=1e-12)


def test_files_follow_the_version_1_contract(tmp_path):
    path = tmp_path / "run.h5"
    (result,) = write_run(path, [300], format_version=1)
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == {"format", "format_version", "generated_by", "created", "label", "config"}
        assert f.attrs["format"] == "hessspec"
        assert f.attrs["format_version"] == 1 and f.attrs["format_version"].dtype == np.int64
        assert f.attrs["generated_by"] == f"hessspec {hessspec.__version__}"
        created = datetime.fromisoformat(f.attrs["created"])
        assert created.utcoffset() == timezone.utc.utcoffset(None)
        assert json.loads(f.attrs["config"]) == CONFIG
        assert list(f) == ["checkpoints"]
        assert list(f["checkpoints"]) == ["step_00000300"]
        g = f["checkpoints/step_00000300"]
        assert set(g.attrs) == CONTRACT_GROUP_ATTRS | {"timings", "settings", "config"}
        assert g.attrs["complete"] is np.True_
        for name in ("step", "n_params", "n_samples", "seed", "lanczos_steps", "probes"):
            assert g.attrs[name].dtype == np.int64, name
        for name in ("loss", "grad_norm", "trace", "trace_stderr", "elapsed_s"):
            assert g.attrs[name].dtype == np.float64, name
        for name in ("source", "sha256", "model", "bn_mode", "dtype", "device"):
            assert isinstance(g.attrs[name], str), name
        assert json.loads(g.attrs["timings"]) == result.timings
        members = []
        g.visit(lambda name: members.append(name) if isinstance(g[name], h5py.Dataset) else None)
        assert set(members) == set(CONTRACT_DATASETS) | {"gradient/nodes", "gradient/weights"}
        for name, dtype in CONTRACT_DATASETS.items():
            assert g[name].dtype == dtype, name
        p, m, k, K = result.probes, result.lanczos_steps, len(result.top_eigenvalues), len(result.overlap_k)
        shapes = {"slq/nodes": (p, m), "slq/weights": (p, m), "top/eigenvalues": (k,), "top/residuals": (k,),
                  "overlap/k": (K,), "overlap/ratio": (K,), "overlap/cos2": (k,), "gradient/nodes": (m,),
                  "gradient/weights": (m,)}  # fmt: skip
        for name, shape in shapes.items():
            assert g[name].shape == shape, name
        assert np.all(np.diff(g["top/eigenvalues"][()]) <= 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_files_follow_the_version_2_contract(tmp_path):
    path = tmp_path / "run.h5"
    (result,) = write_run(path, [300])
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == {"format", "format_version", "generated_by", "created", "label", "config"}
        assert f.attrs["format"] == "hessspec"
        assert f.attrs["format_version"] == 2 and f.attrs["format_version"].dtype == np.int64
        assert json.loads(f.attrs["config"]) == CONFIG
        assert list(f) == []  # the checkpoints live beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "run.h5.d"]
    assert sorted(p.name for p in (tmp_path / "run.h5.d").iterdir()) == ["step_00000300.h5"]
    with h5py.File(tmp_path / "run.h5.d" / "step_00000300.h5", "r") as part:
        assert set(part.attrs) == {"format", "format_version", "step", "sha256", "complete"}
        assert part.attrs["format"] == "hessspec-checkpoint" and part.attrs["format_version"] == 2
        assert part.attrs["step"] == 300 and part.attrs["step"].dtype == np.int64
        assert part.attrs["sha256"] == result.sha256 and part.attrs["complete"] is np.True_
        assert list(part) == ["results"] and list(part["results"]) == ["0"]
        g = part["results/0"]
        # A version-1 checkpoint group, less its "complete" marker (the file's rename commits it), plus the kind.
        assert set(g.attrs) == CONTRACT_GROUP_ATTRS - {"complete"} | {"timings", "settings", "config", "curvature",
                                                                     "block"}  # fmt: skip
        assert g.attrs["curvature"] == "hessian" and g.attrs["block"] == "all"
        for name, dtype in CONTRACT_DATASETS.items():
            assert g[name].dtype == dtype, name
        np.testing.assert_array_equal(g["slq/nodes"][()], result.nodes)


def test_the_plain_h5py_reader_in_the_docs_runs(tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    section = text.split("## Reading it without hessspec", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    results = write_run(tmp_path / "results.h5", [0, 100])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "FORMAT.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 100]
    for line, result in zip(lines, results, strict=True):
        assert float(line.split()[-1]) == pytest.approx(result.trace, rel=1e-9)


def test_load_results_accepts_an_open_file_and_leaves_it_open(tmp_path):
    path = tmp_path / "run.h5"
    write_run(path, [5])
    with h5py.File(path, "r") as f:
        run = load_results(f)
        assert f.id.valid
    assert run.steps == (5,)
    assert run.path == str(path)


def test_results_analysed_from_memory_have_no_source_or_hash(tmp_path):
    path = tmp_path / "run.h5"
    result = make_result(7, sha256="", source="", timings={}, settings={})
    with ResultWriter(path, label="", config={}) as writer:
        assert writer.write(result) == "step_00000007"
        assert writer.has(7, "")
    (stored,) = load_results(path).checkpoints
    assert_same_result(stored, result)


def test_get_lists_available_steps(tmp_path):
    path = tmp_path / "run.h5"
    write_run(path, [0, 10])
    run = load_results(path)
    assert run.get(10).step == 10
    with pytest.raises(KeyError, match=r"step 7 is not in .*available steps: \[0, 10\]"):
        run.get(7)


def test_same_step_from_two_files_gets_unique_keys(tmp_path):
    path = tmp_path / "run.h5"
    a = make_result(300, seed=1, sha256="aa" * 32)
    b = make_result(300, seed=2, sha256="b1c2d3e4" + "0" * 56)
    with ResultWriter(path, label="x", config=CONFIG) as writer:
        assert writer.write(a) == "step_00000300"
        assert writer.write(b) == "step_00000300_b1c2d3e4"
        assert writer.has(300, a.sha256) and writer.has(300, b.sha256)
    run = load_results(path)
    assert run.steps == (300, 300)
    assert_same_result(run.get(300, sha256=b.sha256), b)
    with pytest.raises(KeyError, match="pass sha256="):
        run.get(300)


def test_write_rejects_results_that_do_not_fit_the_format(tmp_path):
    good = make_result(0)
    bad = [
        (dataclasses.replace(good, weights=good.weights[:, :-1]), "weights must have the shape of nodes"),
        (dataclasses.replace(good, probes=5), "one row per probe"),
        (dataclasses.replace(good, cos2=good.cos2[:-1]), "cos2 must have the shape of top_eigenvalues"),
        (dataclasses.replace(good, gradient_weights=None), "both be given or both be None"),
        (dataclasses.replace(good, step=-1), "step must be >= 0"),
        (dataclasses.replace(good, nodes=good.nodes[0], weights=good.weights[0]), "nodes must have 2 dimension"),
    ]
    with ResultWriter(tmp_path / "run.h5", label="x", config=CONFIG) as writer:
        for result, message in bad:
            with pytest.raises(ValueError, match=message):
                writer.write(result)
    assert load_results(tmp_path / "run.h5").checkpoints == ()


# --------------------------------------------------------------------------------------------------------------
# Resume, config, force


def test_resume_has_and_duplicate_writes(tmp_path):
    path = tmp_path / "run.h5"
    first = make_result(0)
    with ResultWriter(path, label="x", config=CONFIG) as writer:
        assert not writer.has(0, first.sha256)
        writer.write(first)
        assert writer.has(0, first.sha256)
        assert not writer.has(0, "ff" * 32) and not writer.has(1, first.sha256)
    # A later process resumes: what is stored counts as done, a second copy is refused.
    with ResultWriter(path, label=None, config=CONFIG) as writer:
        assert writer.has(0, first.sha256)
        with pytest.raises(StoreError, match=r"step 0 .* already stored .* as step_00000000"):
            writer.write(first)
    replacement = make_result(0, seed=99, sha256=first.sha256)
    with ResultWriter(path, label=None, config=CONFIG, force=True) as writer:
        assert writer.has(0, first.sha256)  # force does not undo resuming when the config matches
        assert writer.write(replacement) == "step_00000000"
    run = load_results(path)
    assert run.label == "x"
    (stored,) = run.checkpoints
    assert_same_result(stored, replacement)


def test_config_mismatch_is_refused_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "run.h5"
    write_run(path, [0])
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"probes \(3 vs 8\)") as info:
        ResultWriter(path, label="x", config={**CONFIG, "probes": 8})
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreError, match=r"sigma2 \('<absent>' vs 0\.001\)"):
        ResultWriter(path, label="x", config={**CONFIG, "sigma2": 1e-3})
    assert path.read_bytes() == before
    # Keys that do not change the numbers may differ; tuples and lists are the same JSON.
    relaxed = {**CONFIG, "device": "cuda:0", "label": "other", "num_workers": 8, "overlap_k": (1, 2, 5)}
    with ResultWriter(path, label="renamed", config=relaxed) as writer:
        assert writer.has(0, make_result(0).sha256)
    run = load_results(path)
    assert run.label == "renamed"
    assert run.config == CONFIG  # the stored config is kept


def test_force_replaces_the_config_and_marks_old_entries_stale(tmp_path):
    path = tmp_path / "run.h5"
    old = write_run(path, [0, 1])
    new_config = {**CONFIG, "probes": 4}
    with ResultWriter(path, label=None, config=new_config, force=True) as writer:
        assert not writer.has(0, old[0].sha256) and not writer.has(1, old[1].sha256)
        run = load_results(path)
        assert run.config == new_config
        assert run.stale_steps == (0, 1)
        assert run.steps == (0, 1)  # kept until recomputed
        writer.write(make_result(0, probes=4))
        assert writer.has(0, old[0].sha256)
    run = load_results(path)
    assert run.stale_steps == (1,)
    assert run.get(0).probes == 4
    # A normal writer with the new config recomputes the stale entry.
    with ResultWriter(path, label=None, config=new_config) as writer:
        assert not writer.has(1, old[1].sha256)
        writer.write(make_result(1, probes=4))
    assert load_results(path).stale_steps == ()


# --------------------------------------------------------------------------------------------------------------
# Bad files and paths


def _foreign_file(path: Path, kind: str) -> None:
    if kind == "text":
        path.write_text("step,loss\n0,1.0\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_run(path, [0, 1, 2], format_version=1)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("pixels", data=np.arange(3))
            if kind == "other_format":
                f.attrs["format"] = "HDF5::Cooler"
            elif kind == "newer_version":
                f.attrs["format"] = "hessspec"
                f.attrs["format_version"] = 3
            elif kind == "no_directory":
                f.attrs["format"] = "hessspec"
                f.attrs["format_version"] = 2
            elif kind == "bad_version":
                f.attrs["format"] = "hessspec"
                f.attrs["format_version"] = "one"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "is not an HDF5 file"),
        ("empty", "is not an HDF5 file"),
        ("truncated", "is a truncated HDF5 file"),
        ("no_format", "is not a hessspec result file \\(no 'format' attribute"),
        ("other_format", "is a 'HDF5::Cooler' file, not a hessspec result file"),
        ("newer_version", "format version 3, newer than this hessspec reads \\(versions 1 to 2\\); upgrade"),
        ("no_directory", "version-2 result file whose checkpoints directory .*file.h5.d is missing"),
        ("bad_version", "invalid format_version 'one'"),
    ],
)
def test_foreign_and_damaged_files_are_refused(tmp_path, kind, message):
    path = tmp_path / "file.h5"
    _foreign_file(path, kind)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=message) as info:
        load_results(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreError, match=message):
        ResultWriter(path, label="x", config=CONFIG)
    assert path.read_bytes() == before  # never truncated or repaired
    assert not (tmp_path / "file.h5.lock").exists()


def test_bad_output_paths(tmp_path):
    with pytest.raises(StoreError, match=r"directory .*missing does not exist"):
        ResultWriter(tmp_path / "missing" / "run.h5", label="x", config=CONFIG)
    with pytest.raises(StoreError, match="it is a directory"):
        ResultWriter(tmp_path, label="x", config=CONFIG)
    with pytest.raises(StoreError, match="no such file"):
        load_results(tmp_path / "absent.h5")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="is not writable"):
            ResultWriter(locked / "run.h5", label="x", config=CONFIG)
    finally:
        locked.chmod(0o755)


def test_unfinished_groups_are_ignored_and_cleaned_up(tmp_path):
    path = tmp_path / "run.h5"
    write_run(path, [0], format_version=1)
    # What an interrupted in-place writer (another program, an older version) could leave.
    with h5py.File(path, "r+") as f:
        f["checkpoints"].create_group(".tmp_step_00000009").attrs["complete"] = True
        half = f["checkpoints"].create_group("step_00000010")
        half.attrs["step"] = 10
    assert load_results(path).steps == (0,)
    with ResultWriter(path, label=None, config=CONFIG) as writer:
        assert not writer.has(10, "")
        with h5py.File(path, "r") as f:
            assert list(f["checkpoints"]) == ["step_00000000"]
        assert writer.write(make_result(10)) == "step_00000010"
    assert load_results(path).steps == (0, 10)


# --------------------------------------------------------------------------------------------------------------
# Crash safety and locking, with real processes


def _start(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


CHILD_DEADLINE_S = 300  # a child that never reaches its marker is killed, so a broken test fails instead of hanging


def _read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    timer = threading.Timer(CHILD_DEADLINE_S, proc.kill)
    timer.start()
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                error = proc.stderr.read()
                proc.stdout.close()
                proc.stderr.close()
                pytest.fail(f"child exited ({proc.returncode}) before {marker!r}: {error[-2000:]}")
            lines.append(line.strip())
            if line.startswith(marker):
                return lines
    finally:
        timer.cancel()


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


CRASH_SCRIPT = """
    import dataclasses, sys, time
    from hessspec import store
    from hessspec.store import _v1, _v2
    from tests.test_store import CONFIG, make_result

    path, n, hang, version = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hang", int(sys.argv[4])

    def results(step):
        whole = make_result(step)
        if version == 1:
            return whole
        # Several (curvature, block) per checkpoint: a killed write must not leave some of them.
        return [whole, dataclasses.replace(whole, curvature="ggn"), dataclasses.replace(whole, block="layer1")]

    with store.ResultWriter(path, label="crash", config=CONFIG, format_version=version) as writer:
        for step in range(n):
            writer.write(results(step))
            print("stored", step, flush=True)
        if hang:
            def publish_slowly(*args):
                print("publishing", flush=True)
                time.sleep(60)
            if version == 1:
                _v1.publish = publish_slowly  # after the temporary group was written and flushed
            else:
                _v2.commit_part = publish_slowly  # after the checkpoint's temporary file was written and closed
        for step in range(n, 100_000):
            if not writer.has(step, make_result(step).sha256):  # resume
                writer.write(results(step))
                print("stored", step, flush=True)
"""

KINDS_V2 = (("hessian", "all"), ("hessian", "layer1"), ("ggn", "all"))


def _check_crashed_run(path: Path, version: int, steps: tuple[int, ...]) -> None:
    run = load_results(path)
    assert run.steps == steps
    for result in run.checkpoints:
        assert_same_result(result, make_result(result.step))
    if version == 2:
        assert len(run.results) == 3 * len(steps)
        for step in steps:
            assert {r.kind for r in run.results if r.step == step} == set(KINDS_V2)


@pytest.mark.parametrize("version", [1, 2])
def test_sigkill_inside_a_checkpoint_write_keeps_earlier_checkpoints(tmp_path, version):
    path = tmp_path / "run.h5"
    proc = _start(CRASH_SCRIPT, path, 3, "hang", version)
    _read_until(proc, "publishing")
    _kill(proc)
    _check_crashed_run(path, version, (0, 1, 2))
    if version == 1:
        # The interrupted write lives in a copy that never replaced the file; it holds the temporary group.
        (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        with h5py.File(partial, "r") as f:
            assert ".tmp_step_00000003" in f["checkpoints"]
        assert load_results(partial).steps == (0, 1, 2)  # readers skip temporary groups
    else:
        # The interrupted checkpoint is a complete file under a temporary name, which readers do not see.
        (partial,) = [p for p in (tmp_path / "run.h5.d").iterdir() if p.name.endswith(".partial")]
        assert partial.name.startswith(".step_00000003.")
        with h5py.File(partial, "r") as f:
            assert len(f["results"]) == 3
    assert (tmp_path / "run.h5.lock").exists()  # left by the killed process; harmless
    with ResultWriter(path, label=None, config=CONFIG) as writer:
        assert not partial.exists()
        assert writer.has(2, make_result(2).sha256) and not writer.has(3, make_result(3).sha256)
        writer.write(make_result(3))
    assert load_results(path).steps == (0, 1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"] + (["run.h5.d"] if version == 2 else [])


@pytest.mark.parametrize("version", [1, 2])
def test_sigkill_at_an_arbitrary_moment_keeps_the_file_readable(tmp_path, version):
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(version)
    done = 0
    for _ in range(2):
        proc = _start(CRASH_SCRIPT, path, 0, "loop", version)
        # The child writes back to back, so the kill lands inside a write most of the time.
        for _ in range(int(rng.integers(3, 8))):
            _read_until(proc, "stored")
        _kill(proc)
        run = load_results(path)
        assert len(run.steps) > done
        done = len(run.steps)
        _check_crashed_run(path, version, tuple(range(done)))


LOCK_SCRIPT = """
    import sys, time
    from hessspec.store import ResultWriter
    from tests.test_store import CONFIG, make_result

    with ResultWriter(sys.argv[1], label="holder", config=CONFIG) as writer:
        writer.write(make_result(0))
        print("locked", flush=True)
        time.sleep(60)
"""


def test_a_second_process_cannot_write_the_same_file(tmp_path):
    path = tmp_path / "run.h5"
    proc = _start(LOCK_SCRIPT, path)
    try:
        _read_until(proc, "locked")
        with pytest.raises(StoreError, match=rf"another process \(pid {proc.pid} on .*\) is writing {path}"):
            ResultWriter(path, label="x", config=CONFIG)
        assert load_results(path).steps == (0,)  # reading while it runs is fine
        with pytest.raises(StoreError, match="is still being written by another process"):
            store.merge(tmp_path / "merged.h5", [path])
    finally:
        _kill(proc)
    with ResultWriter(path, label="x", config=CONFIG) as writer:  # the lock died with the process
        assert writer.has(0, make_result(0).sha256)


def test_one_writer_per_file_within_a_process(tmp_path):
    path = tmp_path / "run.h5"
    with ResultWriter(path, label="x", config=CONFIG):
        assert (tmp_path / "run.h5.lock").exists()
        with pytest.raises(StoreError, match="another process .* is writing"):
            ResultWriter(path, label="x", config=CONFIG)
    assert not (tmp_path / "run.h5.lock").exists()
    writer = ResultWriter(path, label="x", config=CONFIG)
    writer.close()
    writer.close()
    with pytest.raises(StoreError, match="is closed"):
        writer.write(make_result(0))


def test_filesystems_without_flock_warn_and_go_on(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_h5files.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="does not support flock"):
        writer = ResultWriter(tmp_path / "run.h5", label="x", config=CONFIG)
    with writer:
        writer.write(make_result(0))
    assert load_results(tmp_path / "run.h5").steps == (0,)


# --------------------------------------------------------------------------------------------------------------
# Merge


def test_merge_disjoint_shards(tmp_path):
    a = write_run(tmp_path / "a.h5", [0, 200], label="shard")
    b = write_run(tmp_path / "b.h5", [100, 300], config={**CONFIG, "device": "cuda:1", "shard_index": 1})
    out = tmp_path / "merged.h5"
    keys = store.merge(out, [tmp_path / "a.h5", tmp_path / "b.h5"])
    assert len(keys) == 4
    run = load_results(out)
    assert run.steps == (0, 100, 200, 300)
    assert run.label == "shard" and run.config == CONFIG
    for result in a + b:
        assert_same_result(run.get(result.step), result)
    assert store.merge(out, [tmp_path / "a.h5", tmp_path / "b.h5"]) == ()  # merging again adds nothing


def test_merge_identical_duplicates_once(tmp_path):
    write_run(tmp_path / "a.h5", [0, 1])
    twin = dataclasses.replace(make_result(1), source="/scratch/copy.pt", device="cuda:0", elapsed_s=1.0)
    with ResultWriter(tmp_path / "b.h5", label="demo", config=CONFIG) as writer:
        writer.write(twin)
        writer.write(make_result(2))
    store.merge(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    run = load_results(tmp_path / "m.h5")
    assert run.steps == (0, 1, 2)
    assert run.get(1).source == make_result(1).source  # the first copy is kept


def test_merge_refuses_conflicting_duplicates_unless_forced(tmp_path):
    write_run(tmp_path / "a.h5", [0, 1])
    other = dataclasses.replace(make_result(1), loss=123.0)
    with ResultWriter(tmp_path / "b.h5", label="demo", config=CONFIG) as writer:
        writer.write(other)
    inputs = [tmp_path / "a.h5", tmp_path / "b.h5"]
    pattern = rf"step 1 \(00000001\) differs between {tmp_path / 'a.h5'} and {tmp_path / 'b.h5'} in loss"
    with pytest.raises(StoreError, match=pattern):
        store.merge(tmp_path / "m.h5", inputs)
    assert not (tmp_path / "m.h5").exists()
    store.merge(tmp_path / "m.h5", inputs, force=True)
    assert load_results(tmp_path / "m.h5").get(1).loss == 123.0  # the later input wins
    # The output is checked like an input: a conflicting entry already there is refused too.
    with pytest.raises(StoreError, match=rf"in {tmp_path / 'a.h5'} differs from {tmp_path / 'm.h5'} in loss"):
        store.merge(tmp_path / "m.h5", [tmp_path / "a.h5"])


def test_merge_refuses_differing_configs_and_itself(tmp_path):
    write_run(tmp_path / "a.h5", [0])
    write_run(tmp_path / "b.h5", [1], config={**CONFIG, "probes": 10, "bn_mode": "eval"})
    with pytest.raises(StoreError, match=r"b\.h5: bn_mode \('train' vs 'eval'\), probes \(3 vs 10\)"):
        store.merge(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"], force=True)
    # Shards with stale entries (left by a forced config change) must be recomputed first.
    with ResultWriter(tmp_path / "a.h5", label=None, config={**CONFIG, "probes": 10, "bn_mode": "eval"}, force=True):
        pass
    with pytest.raises(StoreError, match=r"a\.h5 holds entries computed under an older config \(steps \[0\]\)"):
        store.merge(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    with pytest.raises(StoreError, match="is also an input"):
        store.merge(tmp_path / "a.h5", [tmp_path / "b.h5", tmp_path / "a.h5"])
    with pytest.raises(StoreError, match="at least one input"):
        store.merge(tmp_path / "m.h5", [])
    assert not (tmp_path / "m.h5").exists()


# --------------------------------------------------------------------------------------------------------------
# Summary and export


def _summary_run(tmp_path) -> store.RunResults:
    path = tmp_path / "run.h5"
    with ResultWriter(path, label="demo", config=CONFIG) as writer:
        writer.write(make_result(0))
        writer.write(make_result(10, k=3, loss=float("nan")))
    return load_results(path)


def test_summary_table(tmp_path):
    run = _summary_run(tmp_path)
    full, short = summary.summary_table(run)
    assert list(full) == [
        "step", "source", "curvature", "block", "loss", "grad_norm", "lambda_1", "lambda_2", "lambda_3", "lambda_4",
        "lambda_5", "converged", "trace", "trace_stderr", "r_1", "r_5", "neg_mass_below_1pct_norm",
        "neg_mass_0_lower", "neg_mass_0_upper", "num_outliers", "elapsed_s",
    ]  # fmt: skip
    assert "lambda_4" not in short and "lambda_3" in short and "r_1" in short and "r_5" not in short
    c = run.get(0)
    assert full["lambda_1"] == c.top_eigenvalues[0] == c.lambda_max
    assert full["r_5"] == c.overlap_at(5)
    assert full["trace"] == c.trace
    assert full["neg_mass_below_1pct_norm"] == c.negative_mass(0.01 * np.abs(c.nodes).max())
    assert full["neg_mass_0_lower"] <= c.negative_mass() <= full["neg_mass_0_upper"]
    assert full["num_outliers"] == c.num_outliers()
    assert (full["curvature"], full["block"]) == ("hessian", "all")
    assert full["converged"] is None  # written without the flags: unknown
    assert full["source"] == c.source
    assert all(type(v) in (int, float, str, type(None)) for v in full.values())


def test_export_csv_and_json(tmp_path):
    run = _summary_run(tmp_path)
    rows = summary.summary_table(run)
    summary.export_csv(run, tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in read] == [0, 10]
    assert read[1]["lambda_4"] == ""
    assert float(read[0]["lambda_2"]) == rows[0]["lambda_2"]  # full precision

    summary.export_json(run, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    document = json.loads(text, parse_constant=refuse)
    assert document["label"] == "demo" and document["config"] == CONFIG
    first, second = document["checkpoints"]
    assert second["loss"] is None  # NaN
    np.testing.assert_array_equal(first["top_eigenvalues"], run.get(0).top_eigenvalues)
    assert first["overlap_k"] == [1, 2, 5]
    np.testing.assert_array_equal(first["overlap_ratio"], run.get(0).overlap_ratio)
    assert first["sha256"] == run.get(0).sha256


def test_converged_flags_round_trip_and_old_files_read_as_unknown(tmp_path):
    path = tmp_path / "run.h5"
    flags = np.array([True, True, False, True, False, False])
    with ResultWriter(path, label="x", config=CONFIG) as writer:
        writer.write(make_result(0, top_converged=flags))
        writer.write(make_result(10))  # as written before the flag existed
    with h5py.File(tmp_path / "run.h5.d" / "step_00000000.h5", "r") as f:
        stored = f["results/0/top/converged"]
        assert stored.dtype == np.uint8 and stored[()].tolist() == [1, 1, 0, 1, 0, 0]
    with h5py.File(tmp_path / "run.h5.d" / "step_00000010.h5", "r") as f:
        assert "top/converged" not in f["results/0"]
    run = load_results(path)
    assert run.get(0).top_converged.dtype == bool
    np.testing.assert_array_equal(run.get(0).top_converged, flags)
    assert run.get(10).top_converged is None
    with pytest.raises(ValueError, match="top_converged"):
        ResultWriter(tmp_path / "bad.h5", label="x", config=CONFIG).write(make_result(0, top_converged=flags[:3]))


def test_summary_excludes_unconverged_pairs_and_says_n_a_for_one_probe(tmp_path):
    path = tmp_path / "run.h5"
    flags = np.array([True, True, False, True, True, True])
    with ResultWriter(path, label="x", config=CONFIG) as writer:
        writer.write(make_result(0, top_converged=flags, source="runs/ckpt_0.pt"))
        one = make_result(10, probes=1)
        writer.write(dataclasses.replace(one, trace_stderr=float("nan"), source="runs/ckpt_10.safetensors"))
    run = load_results(path)
    first, second = summary.summary_table(run)
    assert first["lambda_1"] == run.get(0).top_eigenvalues[0] and first["lambda_3"] is None
    assert first["converged"] == 5
    assert first["r_1"] == run.get(0).overlap_at(1) and first["r_5"] is None  # pair 3 of the top 5 unconverged
    assert first["source"] == "runs/ckpt_0.pt" and second["source"] == "runs/ckpt_10.safetensors"
    assert second["trace_stderr"] == "n/a" and first["trace_stderr"] == run.get(0).trace_stderr
    summary.export_csv(run, tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert read[1]["trace_stderr"] == "n/a" and read[0]["lambda_3"] == "" and read[0]["source"] == "runs/ckpt_0.pt"
    summary.export_json(run, tmp_path / "s.json")
    document = json.loads((tmp_path / "s.json").read_text())
    assert document["checkpoints"][1]["trace_stderr"] is None
    assert document["checkpoints"][0]["top_converged"] == flags.tolist()
    assert document["checkpoints"][1]["top_converged"] is None
