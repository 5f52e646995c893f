"""User code next to a factory file: sibling imports, pickled whole models of user classes, and hessspec.run's inputs.

Run through the installed console script (``hessspec``), which, unlike ``python -m``, puts neither the current
directory nor the factory file's directory on the import path by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hessspec.runner.pipeline import AnalysisJob, run
from hessspec.store import load_results

ROOT = Path(__file__).resolve().parent.parent
HESSSPEC = str(Path(sys.executable).parent / "hessspec")
SETTINGS = ["--data", "digits", "--samples", "100", "--lanczos-steps", "6", "--probes", "2", "--top-k", "2"]

MYNETS = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))

        def forward(self, x):
            return self.body(x)

    def make_model():
        torch.manual_seed(0)
        return Net()
"""

FACTORY = """
    import mynets  # a sibling module, found as `python factory.py` would find it

    def make():
        import mylayers  # imported only when the factory is called
        return mylayers.wrap(mynets.make_model())
"""

MYLAYERS = """
    def wrap(model):
        return model
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name, text in (("mynets.py", MYNETS), ("factory.py", FACTORY), ("mylayers.py", MYLAYERS)):
        (project / name).write_text(textwrap.dedent(text))
    return project


def _hessspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the package under test, and nothing of the user's project
    return subprocess.run([HESSSPEC, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_factory_file_imports_its_sibling_modules_from_another_directory(tmp_path):
    project = _project(tmp_path)
    sys.path.insert(0, str(project))
    try:
        import mynets

        torch.save({"model": mynets.make_model().state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("mynets", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _hessspec(
        "analyze", str(tmp_path / "ckpt.pt"), "--model-factory", f"{project / 'factory.py'}:make", *SETTINGS,
        "--device", "cpu", "--out", str(tmp_path / "r.h5"), cwd=elsewhere,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert load_results(tmp_path / "r.h5").steps == (3,)


def test_unsafe_load_of_a_pickled_model_whose_class_lives_beside_the_factory(tmp_path):
    project = _project(tmp_path)
    code = (
        f"import sys, torch; sys.path.insert(0, {str(project)!r}); import mynets; "
        "torch.save(mynets.make_model(), 'm_7.pt')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    common = [*SETTINGS, "--device", "cpu", "--unsafe-load"]
    # From another directory, with the factory given as a file: its directory is on the import path.
    by_file = _hessspec(
        "analyze", str(tmp_path / "m_7.pt"), "--model-factory", f"{project / 'factory.py'}:make", *common,
        "--out", str(tmp_path / "a.h5"), cwd=elsewhere,
    )  # fmt: skip
    assert by_file.returncode == 0, by_file.stderr
    # From the project directory, with the factory given as a module: the current directory is.
    by_module = _hessspec(
        "analyze", str(tmp_path / "m_7.pt"), "--model-factory", "mynets:make_model", *common,
        "--out", str(tmp_path / "b.h5"), cwd=project,
    )  # fmt: skip
    assert by_module.returncode == 0, by_module.stderr
    assert load_results(tmp_path / "a.h5").steps == load_results(tmp_path / "b.h5").steps == (7,)


def test_run_says_what_it_takes(tmp_path):
    from hessspec import build_model

    job = AnalysisJob(model="mlp", data="digits")
    model = build_model("mlp", num_classes=10)
    with pytest.raises(TypeError, match="takes checkpoint files.*hessspec.analyze.*state_dict"):
        run(job, model, tmp_path / "r.h5")
    with pytest.raises(TypeError, match="takes checkpoint files"):
        run(job, [model], tmp_path / "r.h5")
    with pytest.raises(TypeError, match="takes an AnalysisJob first, got .*MLP"):
        run(model, ["ckpt.pt"], tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()
