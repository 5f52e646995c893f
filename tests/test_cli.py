"""The installed ``hessspec`` command, end to end: analyze real checkpoints, then info, export, plot and merge.

The main paths run the console script in a subprocess, as a user would; a second process is killed in the middle
of an analysis to check that the file keeps what was written and that a rerun resumes. Error paths are in
test_cli_errors.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hessspec.store import load_results

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HESSSPEC = str(BIN / "hessspec")
STEPS = (0, 40, 80, 120)
# A 2-layer MLP of width 8 on 200 digits with 10 Lanczos steps and 2 probes: about half a second a checkpoint.
MODEL = ["--model", "mlp", "--model-arg", "width=8", "--model-arg", "depth=2"]
SETTINGS = ["--data", "digits", "--samples", "200", "--lanczos-steps", "10", "--probes", "2", "--top-k", "3"]


def write_checkpoints(directory: Path, steps=STEPS, width: int = 8, seed: int = 0) -> list[Path]:
    """Train the zoo ``mlp`` (depth 2) on digits with SGD and save ``{"model": state_dict, "step": s}`` files."""
    from hessspec.data.datasets import digits_arrays
    from hessspec.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", width=width, depth=2)
    images, labels = (torch.from_numpy(a) for a in digits_arrays())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(max(steps) + 1):
        if step in steps:
            path = directory / f"ckpt_{step:05d}.pt"
            torch.save({"model": model.state_dict(), "step": step}, path)
            paths.append(path)
        index = torch.randint(0, len(labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return paths


def command_env() -> dict[str, str]:
    """The environment of the commands run here: unbuffered output, one thread, no matplotlib backend chosen."""
    # One thread: these models are tiny, and on a busy CI machine a second (spinning) OpenMP thread made each
    # checkpoint about five times slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MPLBACKEND", None)
    return env


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process analyses (CliRunner) on one thread too, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hessspec(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = command_env()
    result = subprocess.run(
        [HESSSPEC, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"hessspec {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    write_checkpoints(directory / "ckpts")
    return directory


@pytest.fixture(scope="module")
def analysed(workdir) -> tuple[Path, subprocess.CompletedProcess]:
    """``hessspec analyze`` of three checkpoints given as a glob, run by the console script."""
    out = workdir / "run.h5"
    result = hessspec("analyze", "ckpts/ckpt_000[048]*.pt", *MODEL, *SETTINGS, "--label", "MLP", "--out", "run.h5",
                      cwd=workdir)  # fmt: skip
    return out, result


def _summary_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step")]


def test_analyze_writes_one_result_per_checkpoint_in_step_order(analysed):
    out, result = analysed
    lines = _summary_lines(result.stdout)
    assert [int(line.split()[1]) for line in lines] == [0, 40, 80]
    for line in lines:
        for field in ("loss", "1 ", "trace", "r_3", " s"):
            assert field in line, line
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    run = load_results(out)
    assert run.label == "MLP"
    assert run.steps == (0, 40, 80)
    assert run.config["model_args"] == {"width": 8, "depth": 2, "num_classes": 10}
    assert run.config["lanczos_steps"] == 10 and run.config["probes"] == 2 and run.config["samples"] == 200
    first = run.checkpoints[0]
    assert first.nodes.shape == (2, 10) and first.top_eigenvalues.shape == (3,)
    assert first.n_params == 64 * 8 + 8 + 8 * 10 + 10 and first.n_samples == 200
    assert first.source.endswith("ckpt_00000.pt") and len(first.sha256) == 64
    assert first.lambda_max > 0


def test_rerun_skips_done_checkpoints_and_adds_new_ones(analysed, workdir, tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli

    out, _ = analysed
    copy = tmp_path / "copy.h5"
    copy.write_bytes(out.read_bytes())
    shutil.copytree(f"{out}.d", f"{copy}.d")  # a version-2 file is the root file and its checkpoints directory
    # The HVP strategy changes rounding only, so a run resumes under another one.
    result = CliRunner().invoke(
        cli, ["analyze", str(workdir / "ckpts"), *MODEL, *SETTINGS, "--hvp-strategy", "reverse", "--out", str(copy)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("skipped") == 3
    assert [int(line.split()[1]) for line in _summary_lines(result.stdout) if "skipped" not in line] == [120]
    assert "3 already in" in result.stderr
    assert load_results(copy).steps == STEPS


def test_hvp_strategies_give_the_same_spectrum(workdir, tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli

    runs = {}
    for strategy in ("vmap", "reverse"):
        out = tmp_path / f"{strategy}.h5"
        args = ["analyze", str(workdir / "ckpts" / "ckpt_00040.pt"), *MODEL, *SETTINGS, "--dtype", "float64"]
        result = CliRunner().invoke(cli, [*args, "--hvp-strategy", strategy, "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[strategy] = load_results(out).checkpoints[0]
    a, b = runs["vmap"], runs["reverse"]
    # float64 products that differ in rounding only (~1e-16); 10 Lanczos steps amplify that by at most ~1e3.
    assert abs(a.top_eigenvalues - b.top_eigenvalues).max() <= 1e-12 * abs(a.top_eigenvalues).max()
    assert abs(a.overlap_ratio - b.overlap_ratio).max() <= 1e-10
    assert abs(a.loss - b.loss) <= 1e-14 * a.loss


def test_info_prints_settings_and_a_row_per_checkpoint(analysed, workdir):
    result = hessspec("info", "run.h5", cwd=workdir)
    text = result.stdout
    assert "label:       MLP" in text
    assert "lanczos_steps" in text and "digits" in text
    header = next(line for line in text.splitlines() if line.strip().startswith("step"))
    for column in ("source", "loss", "1", "2", "3", "conv.", "trace", "r_1", "r_10", "outliers", "<-0.01", "seconds"):
        assert column in header
    below = text.split(header, 1)[1].split("\n\n", 1)
    rows = [line.split() for line in below[0].splitlines()[2:]]
    assert [int(row[0]) for row in rows] == [0, 40, 80]
    assert [row[1] for row in rows] == ["ckpt_00000.pt", "ckpt_00040.pt", "ckpt_00080.pt"]  # the source file
    assert "n.c.:" in below[1]  # the legend under the table


def test_export_csv_and_json(analysed, workdir):
    out, _ = analysed
    run = load_results(out)
    result = hessspec("export", "run.h5", "--format", "csv", cwd=workdir)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(row["step"]) for row in rows] == [0, 40, 80]
    assert float(rows[0]["lambda_1"]) == pytest.approx(run.checkpoints[0].lambda_max)

    hessspec("export", "run.h5", "--out", "run.json", cwd=workdir)  # format from the suffix
    document = json.loads((workdir / "run.json").read_text())
    assert document["label"] == "MLP"
    assert [c["step"] for c in document["checkpoints"]] == [0, 40, 80]
    assert document["checkpoints"][1]["top_eigenvalues"] == pytest.approx(run.checkpoints[1].top_eigenvalues)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_real_images(analysed, workdir):
    hessspec("plot", "density", "run.h5", "--steps", "0,80", "--layout", "grid", "--out", "density.png", cwd=workdir)
    _assert_png(workdir / "density.png")
    hessspec("plot", "evolution", "run.h5", "run.h5", "--out", "evolution.png", cwd=workdir)
    _assert_png(workdir / "evolution.png")
    result = hessspec("plot", "overlap", "run.h5", "--step", "40", "--out", "overlap.png", cwd=workdir)
    _assert_png(workdir / "overlap.png")
    assert "overlap.png" in result.stdout


def test_merge_two_shards(workdir, tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli

    runner = CliRunner()
    ckpts = workdir / "ckpts"
    for name, steps in (("a.h5", (0, 40)), ("b.h5", (40, 80))):  # step 40 in both shards
        files = [str(ckpts / f"ckpt_{s:05d}.pt") for s in steps]
        result = runner.invoke(cli, ["analyze", *files, *MODEL, *SETTINGS, "-q", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    merged = hessspec("merge", "all.h5", "a.h5", "b.h5", cwd=tmp_path)
    assert "all.h5" in merged.stdout
    run = load_results(tmp_path / "all.h5")
    assert run.steps == (0, 40, 80)
    shard = load_results(tmp_path / "b.h5")
    assert run.get(80).top_eigenvalues == pytest.approx(shard.get(80).top_eigenvalues)


def test_killed_analysis_keeps_earlier_results_and_resumes(workdir, tmp_path):
    # 40 Lanczos steps (about 0.3 s a checkpoint on one thread) leave time to kill it before the next summary line.
    slower = [*SETTINGS, "--lanczos-steps", "40"]
    command = [HESSSPEC, "analyze", str(workdir / "ckpts"), *MODEL, *slower, "--out", "killed.h5"]
    env = command_env()
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line or line.startswith("step"):
                break
        assert line.startswith("step"), "no summary line before the deadline"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    done = load_results(tmp_path / "killed.h5").steps
    assert 1 <= len(done) < len(STEPS) and done == STEPS[: len(done)]

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    lines = _summary_lines(result.stdout)
    assert sum("skipped" in line for line in lines) == len(done)
    assert len(lines) == len(STEPS)
    assert load_results(tmp_path / "killed.h5").steps == STEPS
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_python_dash_m_is_the_same_command():
    by_module = subprocess.run([sys.executable, "-m", "hessspec", "--version"], capture_output=True, text=True,
                               check=True)  # fmt: skip
    by_script = subprocess.run([HESSSPEC, "--version"], capture_output=True, text=True, check=True)
    from hessspec import __version__

    assert by_module.stdout == by_script.stdout == f"hessspec {__version__}\n"
    help_text = subprocess.run([sys.executable, "-m", "hessspec", "--help"], capture_output=True, text=True,
                               check=True)  # fmt: skip
    assert help_text.stdout.startswith("Usage: hessspec ")


def test_cli_import_is_light():
    code = "import sys, hessspec.cli; print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_docs_cli_md_is_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    assert current == module.render(), "docs/CLI.md is out of date: run python scripts/gen_cli_docs.py"


def test_analyze_curvatures_and_blocks_then_info(workdir, tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli

    out = tmp_path / "gn.h5"
    args = ["analyze", str(workdir / "ckpts" / "ckpt_00040.pt"), *MODEL, *SETTINGS, "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--curvature", "hessian", "--curvature", "ggn", "--curvature", "residual",
                                      "--blocks", "modules"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _summary_lines(result.stdout)  # one per curvature (its whole-model result)
    assert len(lines) == 3 and lines[1].endswith("[ggn]") and lines[2].endswith("[residual]")
    assert all(int(line.split()[1]) == 40 for line in lines)
    run = load_results(out)
    assert run.curvatures == ("hessian", "ggn", "residual") and run.blocks == ("all", "layers.1", "layers.3")
    assert run.config["curvatures"] == ["hessian", "ggn", "residual"] and run.config["blocks"] == ["modules"]
    h, g, r = (run.get(40, curvature=c) for c in ("hessian", "ggn", "residual"))
    # tr(H) = tr(G) + tr(R) on the same probes, to the rounding of float32 products.
    assert h.trace == pytest.approx(g.trace + r.trace, rel=1e-4, abs=1e-4 * abs(h.trace))
    assert run.get(40, curvature="ggn", block="layers.3").n_params == 8 * 10 + 10
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0 and "ggn" in info.output and "layers.3" in info.output
