"""Every bad input ends as one ``Error:`` line on stderr and a non-zero exit, without a traceback (CliRunner)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hessspec.cli import cli
from hessspec.store import ResultWriter, load_results
from tests.test_cli import MODEL, SETTINGS, one_thread, write_checkpoints  # noqa: F401 (one_thread: a fixture)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli_errors")
    write_checkpoints(directory, steps=(0, 30))
    return directory


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def assert_one_error(result, *fragments: str) -> str:
    """Exit status non-zero, exactly one ``Error:`` line on stderr, no traceback; returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if "Error:" in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def analyze(runner, *args: str, settings=SETTINGS, model=MODEL):
    return runner.invoke(cli, ["analyze", *args, *model, *settings, "-q"])


# -- checkpoints -----------------------------------------------------------------------------------------------


def test_missing_checkpoint(runner, tmp_path):
    result = analyze(runner, str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "nope.pt", "does not exist")
    assert not (tmp_path / "o.h5").exists()


def test_truncated_checkpoint(runner, ckpts, tmp_path):
    data = (ckpts / "ckpt_00000.pt").read_bytes()
    (tmp_path / "ckpt_7.pt").write_bytes(data[: len(data) // 2])
    result = analyze(runner, str(tmp_path / "ckpt_7.pt"), "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "ckpt_7.pt", "truncated")


def test_nan_weights_name_the_parameter(runner, ckpts, tmp_path):
    checkpoint = torch.load(ckpts / "ckpt_00030.pt", weights_only=True)
    checkpoint["model"]["layers.3.weight"][0, 0] = math.nan
    torch.save(checkpoint, tmp_path / "ckpt_30.pt")
    result = analyze(
        runner, str(ckpts / "ckpt_00000.pt"), str(tmp_path / "ckpt_30.pt"), "--out", str(tmp_path / "o.h5")
    )
    assert_one_error(result, "layers.3.weight", "NaN")
    assert load_results(tmp_path / "o.h5").steps == (0,)  # the checkpoint before is kept


def test_architecture_mismatch(runner, tmp_path):
    write_checkpoints(tmp_path, steps=(0,), width=16)
    result = analyze(runner, str(tmp_path / "ckpt_00000.pt"), "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "does not match the model", "shape")


def test_step_for_several_stepless_files(runner, ckpts, tmp_path):
    state = torch.load(ckpts / "ckpt_00000.pt", weights_only=True)["model"]
    for name in ("first.pt", "second.pt"):
        torch.save(state, tmp_path / name)
    result = analyze(runner, str(tmp_path / "first.pt"), str(tmp_path / "second.pt"), "--step", "5",
                     "--out", str(tmp_path / "o.h5"))  # fmt: skip
    assert_one_error(result, "--step")
    result = analyze(runner, str(tmp_path / "first.pt"), "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "pass --step")


# -- model and data --------------------------------------------------------------------------------------------


def test_unknown_model(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), model=["--model", "mpl"])
    assert_one_error(result, "unknown model 'mpl'", "did you mean mlp")


def test_missing_model_factory(runner, ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = analyze(runner, str(ckpts), "--out", "o.h5", model=["--model-factory", "nosuchmodule:make"])
    assert_one_error(result, "nosuchmodule")


def test_user_factory_from_the_current_directory(runner, ckpts, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from hessspec.models import build_model\n\n"
        "def make(width=4):\n    return build_model('mlp', width=width, depth=2)\n"
    )
    monkeypatch.chdir(tmp_path)
    args = [str(ckpts / "ckpt_00000.pt"), "--out", "o.h5"]
    result = analyze(runner, *args, model=["--model-factory", "my_models:make", "--model-arg", "width=8"])
    assert result.exit_code == 0, result.output
    assert load_results(tmp_path / "o.h5").config["model"] == "my_models:make"


def test_model_and_factory_together_is_a_usage_error(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), model=[*MODEL, "--model-factory", "a:b"])
    assert_one_error(result, "not both")
    assert result.exit_code == 2


def test_bad_model_arg(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), model=["--model", "mlp", "--model-arg", "w"])
    assert_one_error(result, "KEY=VALUE")


def test_unknown_dataset(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=["--data", "digitz"])
    assert_one_error(result, "unknown dataset 'digitz'")


def test_dataset_root_missing(runner, ckpts, tmp_path):
    root = tmp_path / "no_such_dir"
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=["--data", f"cifar10:{root}"])
    assert_one_error(result, str(root))
    assert not (tmp_path / "o.h5").exists()


def test_model_that_cannot_take_the_data(runner, ckpts, tmp_path):
    settings = ["--data", "synthetic", "--data-arg", "shape=3,4,4", "--samples", "50"]
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=settings)
    assert_one_error(result, "cannot process the data", "in_features")


def test_single_example_batch_in_bn_train_mode(runner, ckpts, tmp_path):
    settings = ["--data", "digits", "--samples", "129", "--batch-size", "128"]
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=settings,
                     model=["--model", "mlp-bn", "--model-arg", "width=8", "--model-arg", "depth=2"])  # fmt: skip
    assert_one_error(result, "single example", "--batch-size")


def test_params_regex_matching_nothing(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--params", "conv", "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "--params 'conv' matches no parameter", "layers.1.weight")
    result = analyze(runner, str(ckpts), "--params", "(", "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "not a valid regular expression")


def test_cuda_asked_for_but_absent(runner, ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = analyze(runner, str(ckpts), "--device", "cuda", "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "CUDA is not available")
    result = analyze(runner, str(ckpts), "--device", "tpu", "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "unknown device 'tpu'")


def test_top_k_the_krylov_spaces_cannot_resolve(runner, ckpts, tmp_path):
    settings = ["--data", "digits", "--lanczos-steps", "5", "--top-k", "6"]
    assert_one_error(analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=settings), "--top-k")
    settings = ["--data", "digits", "--lanczos-steps", "20", "--probes", "1", "--no-crosscheck", "--top-k", "20"]
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"), settings=settings)
    assert_one_error(result, "--top-k 20 is more than 10", "1 chain(s) of 20 Lanczos steps span at most 20")
    assert not (tmp_path / "o.h5").exists()


# -- output files ----------------------------------------------------------------------------------------------


def test_missing_output_directories_are_created(runner, ckpts, tmp_path):
    out = tmp_path / "res" / "deeper" / "o.h5"
    result = analyze(runner, str(ckpts / "ckpt_00000.pt"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert load_results(out).steps == (0,)


def test_output_below_a_file_is_refused(runner, ckpts, tmp_path):
    (tmp_path / "res").write_text("a file, not a directory")
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "res" / "o.h5"))
    assert_one_error(result, "is not a directory")


def test_bad_model_leaves_no_output_directory(runner, ckpts, tmp_path):
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "res" / "o.h5"), model=["--model", "mpl"])
    assert_one_error(result, "unknown model")
    assert not (tmp_path / "res").exists()


def test_output_directory_not_writable(runner, ckpts, tmp_path, monkeypatch):
    import os

    real_access = os.access
    # Permissions cannot be taken away from root (CI runs as root), so the check itself is made to fail.
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    result = analyze(runner, str(ckpts), "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, "not writable")


def test_output_is_a_directory(runner, ckpts, tmp_path):
    assert_one_error(analyze(runner, str(ckpts), "--out", str(tmp_path)), "is a directory")


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not an HDF5 file\n" * 40)
    return path


def _foreign(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)
    return path


@pytest.mark.parametrize("make", [_garbage, _foreign], ids=["corrupt", "foreign"])
def test_corrupt_or_foreign_hdf5(runner, ckpts, tmp_path, make):
    path = make(tmp_path / "bad.h5")
    before = path.read_bytes()
    assert_one_error(runner.invoke(cli, ["info", str(path)]), "bad.h5")
    assert_one_error(runner.invoke(cli, ["export", str(path)]), "bad.h5")
    assert_one_error(runner.invoke(cli, ["plot", "density", str(path), "--out", str(tmp_path / "d.png")]), "bad.h5")
    assert_one_error(analyze(runner, str(ckpts), "--out", str(path)), "bad.h5")
    assert path.read_bytes() == before  # never overwritten


def test_missing_result_file(runner, tmp_path):
    assert_one_error(runner.invoke(cli, ["info", str(tmp_path / "none.h5")]), "none.h5")


def test_resume_with_other_settings_needs_force(runner, ckpts, tmp_path):
    out = str(tmp_path / "o.h5")
    first = str(ckpts / "ckpt_00000.pt")
    assert analyze(runner, first, "--out", out).exit_code == 0
    other = ["--data", "digits", "--samples", "200", "--lanczos-steps", "9", "--probes", "2", "--top-k", "3"]
    result = analyze(runner, first, "--out", out, settings=other)
    assert_one_error(result, "lanczos_steps (10 in the file, 9 now)", "--force")
    result = analyze(runner, first, "--out", out, "--force", settings=other)
    assert result.exit_code == 0, result.output
    assert load_results(out).checkpoints[0].lanczos_steps == 9


# -- plots, export, merge --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("empty") / "empty.h5"
    with ResultWriter(path, label="empty", config={"model": "mlp"}):
        pass
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, ckpts) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.h5"
    result = CliRunner().invoke(cli, ["analyze", str(ckpts), *MODEL, *SETTINGS, "-q", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("kind", ["density", "evolution", "overlap"])
def test_plot_of_a_file_without_checkpoints(runner, empty_file, tmp_path, kind):
    result = runner.invoke(cli, ["plot", kind, str(empty_file), "--out", str(tmp_path / "f.png")])
    assert_one_error(result, "no checkpoints")
    assert not (tmp_path / "f.png").exists()


def test_plot_of_an_unknown_step(runner, small_file, tmp_path):
    result = runner.invoke(cli, ["plot", "overlap", str(small_file), "--step", "7", "--out", str(tmp_path / "f.png")])
    assert_one_error(result, "step 7", "available steps: [0, 30]")
    result = runner.invoke(
        cli, ["plot", "density", str(small_file), "--steps", "0,7", "--out", str(tmp_path / "f.png")]
    )
    assert_one_error(result, "step 7")
    result = runner.invoke(cli, ["plot", "density", str(small_file), "--steps", "x", "--out", str(tmp_path / "f.png")])
    assert_one_error(result, "integers")


def test_plot_bad_output(runner, small_file, tmp_path):
    result = runner.invoke(cli, ["plot", "overlap", str(small_file), "--out", str(tmp_path / "f.gif")])
    assert_one_error(result, ".gif", ".png")
    (tmp_path / "file").write_text("")
    result = runner.invoke(cli, ["plot", "overlap", str(small_file), "--out", str(tmp_path / "file" / "f.png")])
    assert_one_error(result, "is not a directory")


def test_plot_and_export_create_missing_directories(runner, small_file, tmp_path):
    figure = tmp_path / "figs" / "sub" / "f.png"
    result = runner.invoke(cli, ["plot", "overlap", str(small_file), "--out", str(figure)])
    assert result.exit_code == 0, result.output
    assert figure.read_bytes().startswith(b"\x89PNG")
    table = tmp_path / "tables" / "t.csv"
    result = runner.invoke(cli, ["export", str(small_file), "--out", str(table)])
    assert result.exit_code == 0, result.output
    assert table.read_text().startswith("step,")


def test_plot_evolution_unknown_rank(runner, small_file, tmp_path):
    result = runner.invoke(
        cli, ["plot", "evolution", str(small_file), "--ranks", "10", "--out", str(tmp_path / "f.svg")]
    )
    assert_one_error(result, "k=10")
    result = runner.invoke(cli, ["plot", "evolution", str(small_file), "--out", str(tmp_path / "f.svg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.svg").read_bytes().startswith(b"<?xml")


def test_info_of_an_empty_file(runner, empty_file):
    result = runner.invoke(cli, ["info", str(empty_file)])
    assert result.exit_code == 0, result.output
    assert "checkpoints: 0" in result.stdout


def test_export_below_a_file_is_refused(runner, small_file, tmp_path):
    (tmp_path / "no").write_text("")
    result = runner.invoke(cli, ["export", str(small_file), "--out", str(tmp_path / "no" / "x.csv")])
    assert_one_error(result, "is not a directory")


def test_merge_refuses_files_with_other_settings(runner, small_file, empty_file, tmp_path):
    result = runner.invoke(cli, ["merge", str(tmp_path / "m.h5"), str(small_file), str(empty_file)])
    assert_one_error(result, "different settings")
    assert not (tmp_path / "m.h5").exists()
    result = runner.invoke(cli, ["merge", str(small_file), str(small_file)])
    assert_one_error(result, "also an input")


# -- --debug, help ---------------------------------------------------------------------------------------------


def test_debug_shows_the_exception(runner, ckpts, tmp_path):
    from hessspec.models import UnknownModelError

    args = ["analyze", str(ckpts), "--model", "mpl", *SETTINGS, "--out", str(tmp_path / "o.h5")]
    for argv in (["--debug", *args], [*args, "--debug"]):
        result = runner.invoke(cli, argv)
        assert isinstance(result.exception, UnknownModelError)


def test_unexpected_errors_are_one_line_too(runner, monkeypatch, small_file):
    def broken(*args, **kwargs):
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr("hessspec.store.summary.summary_table", broken)
    line = assert_one_error(runner.invoke(cli, ["info", str(small_file)]), "TypeError: boom second line", "--debug")
    assert line.startswith("Error:")


@pytest.mark.parametrize(
    "command",
    [[], ["analyze"], ["info"], ["export"], ["merge"], ["plot"], ["plot", "density"], ["plot", "evolution"],
     ["plot", "overlap"]],
)  # fmt: skip
def test_help(runner, command):
    result = runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def test_help_shows_defaults(runner):
    text = " ".join(runner.invoke(cli, ["analyze", "-h"]).output.split())
    for default in ("default: 90;", "default: 10;", "default: 20;", "default: train]", "default: float32]",
                    "default: auto]", "default: 128;", "default: float64]", "mlp-bn", "cifar10:ROOT"):  # fmt: skip
        assert default in text, default


def test_help_defaults_match_the_library():
    from hessspec.analysis import AnalysisSettings
    from hessspec.cli.analyze import _DEFAULTS
    from hessspec.runner.job import DEFAULT_BATCH_SIZE

    settings = AnalysisSettings()
    assert _DEFAULTS == {
        "batch_size": DEFAULT_BATCH_SIZE,
        "lanczos_steps": settings.lanczos_steps,
        "probes": settings.probes,
        "top_k": settings.top_k,
    }


def test_demo_registration_is_robust(runner, monkeypatch):
    monkeypatch.setitem(cli.lazy_subcommands, "demo", "hessspec.cli.no_such_demo:demo")
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "demo" not in result.output
    assert runner.invoke(cli, ["demo"]).exit_code == 2  # no such command
    monkeypatch.setitem(cli.lazy_subcommands, "demo", "hessspec.cli._common:no_such_command")
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    assert_one_error(runner.invoke(cli, ["demo"]), "cannot be loaded")


# -- curvatures and blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--blocks", "layers"], ["--blocks", "expected tensors, modules or NAME=REGEX"]),
        (["--blocks", "a=("], ["--blocks", "not a valid regular expression"]),
        (["--blocks", "all=weight"], ["--blocks", "reserved"]),
        (["--blocks", "a=weight", "--blocks", "a=bias"], ["--blocks", "given twice"]),
        (["--curvature", "fisher"], ["--curvature", "fisher"]),
        (["--blocks", "w=weight", "--blocks", "first=^layers\\.1\\."], ["'layers.1.weight' is in two blocks"]),
        (["--blocks", "none=^nothing"], ["'none' matches no selected parameter"]),
        (["--params", "^layers\\.3\\.", "--blocks", "first=^layers\\.1\\."], ["'first' matches no selected"]),
    ],
)
def test_bad_curvatures_and_blocks(runner, ckpts, tmp_path, args, fragments):
    result = analyze(runner, str(ckpts / "ckpt_00000.pt"), *args, "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, *fragments)
    assert not (tmp_path / "o.h5").exists()


# -- what a new user ran into ------------------------------------------------------------------------------------


def test_same_step_from_two_files_is_warned_about_and_shown_with_its_source(runner, ckpts, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(ckpts / "ckpt_00000.pt", weights_only=True)["model"]
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "ckpt_00000.pt").write_bytes((ckpts / "ckpt_00000.pt").read_bytes())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ckpts" / "step_0.safetensors")
    out = tmp_path / "o.h5"
    result = runner.invoke(cli, ["analyze", str(tmp_path / "ckpts"), "--out", str(out), *MODEL, *SETTINGS])
    assert result.exit_code == 0, result.output
    assert "Warning: 2 checkpoint files hold step 0: ckpt_00000.pt, step_0.safetensors" in result.stderr
    info = runner.invoke(cli, ["info", str(out)])
    assert "ckpt_00000.pt" in info.stdout and "step_0.safetensors" in info.stdout
    assert "several checkpoint files hold the same step: 0" in info.stdout
    figure = tmp_path / "d.png"
    plotted = runner.invoke(cli, ["plot", "density", str(out), "--steps", "0", "--out", str(figure)])
    assert plotted.exit_code == 0, plotted.output
    assert "Warning: run 'o' holds 2 checkpoints at step 0 (ckpt_00000.pt, step_0.safetensors)" in plotted.stderr


def test_advice_on_num_classes_only_for_zoo_models(runner, ckpts, tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    result = analyze(runner, str(ckpts / "ckpt_00000.pt"), "--out", "o.h5", model=["--model-factory", "mynet:make"])
    line = assert_one_error(result, "3 outputs", "must return 10 outputs")
    assert "num_classes" not in line.split("must return")[1].split(";")[0]
    assert "pass --model-arg num_classes" not in line
    zoo = ["--model", "mlp", "--model-arg", "width=8", "--model-arg", "depth=2", "--model-arg", "num_classes=3"]
    assert_one_error(analyze(runner, str(ckpts), "--out", "o.h5", model=zoo), "pass --model-arg num_classes=10")
