"""``hessspec analyze --loss`` and ``--loss-factory`` as a user runs them (CliRunner, files on disk)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hessspec.cli import cli
from hessspec.store import load_results
from tests.test_cli_errors import assert_one_error

USER_CODE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

VOCAB = 6


def make_regressor():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # 26 parameters


def regression_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g))


def inputs_only():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(30, 3, generator=g))


def residual(output, batch):
    (x,) = batch
    return ((output[:, 0] - torch.sin(x[:, 0]) * output[:, 1]) ** 2).mean()


def per_example(output, batch):
    return output.sum(1)


def broken(output, batch):
    return batch[5]


not_callable = 3


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 3)
        self.head = nn.Linear(3, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.embed(input_ids)) * attention_mask[..., None]
        return self.head(torch.cumsum(h, dim=1))


def make_lm():
    torch.manual_seed(0)
    return TinyLM()


def token_data():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (10, 5), generator=g)
    mask = torch.ones(10, 5, dtype=torch.int64)
    mask[3, 3:] = 0
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(10)]
"""


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's file of factories and two checkpoints (step 0 of the regressor and of the LM)."""
    directory = tmp_path_factory.mktemp("user_losses")
    (directory / "mine.py").write_text(textwrap.dedent(USER_CODE))
    namespace: dict = {}
    exec(compile(USER_CODE, str(directory / "mine.py"), "exec"), namespace)  # the same code, to save its weights
    torch.save({"model": namespace["make_regressor"]().state_dict(), "step": 0}, directory / "reg_0.pt")
    torch.save({"model": namespace["make_lm"]().state_dict(), "step": 0}, directory / "lm_0.pt")
    return directory


def _analyze(runner, user, *args, checkpoint="reg_0.pt", model="make_regressor", data="regression_data"):
    mine = str(user / "mine.py")
    return runner.invoke(
        cli,
        ["analyze", str(user / checkpoint), "--model-factory", f"{mine}:{model}", "--data-factory", f"{mine}:{data}",
         "--dtype", "float64", "--batch-size", "8", "--probes", "1", "--top-k", "3", "-q", *args],
    )  # fmt: skip


def test_mse_end_to_end_matches_the_dense_hessian(user, tmp_path):
    runner = CliRunner()
    out = tmp_path / "mse.h5"
    result = _analyze(runner, user, "--loss", "mse", "--lanczos-steps", "26", "--out", str(out))
    assert result.exit_code == 0, result.output
    stored = load_results(out)
    assert stored.config["loss"] == "mse"
    (entry,) = stored.checkpoints
    assert entry.settings["loss"] == "mse"
    # Dense reference: the mean over examples of the squared error summed over the two outputs.
    namespace: dict = {}
    exec(USER_CODE, namespace)
    model = namespace["make_regressor"]().double()
    x, y = (t.double() for t in namespace["regression_data"]().tensors)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th):
        parts = th.split([s.numel() for s in shapes])
        params = {k: t.view(s) for k, t, s in zip(names, parts, shapes, strict=True)}
        return ((torch.func.functional_call(model, params, (x,)) - y) ** 2).sum(1).mean()

    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta)).flip(0)[:3]
    assert entry.top_eigenvalues == pytest.approx(top.numpy(), rel=1e-8)
    assert entry.loss == pytest.approx(float(loss(theta)), rel=1e-12)
    # Resuming with another loss is another setting.
    again = _analyze(runner, user, "--loss-factory", f"{user / 'mine.py'}:residual", "--data-factory",
                     f"{user / 'mine.py'}:inputs_only", "--lanczos-steps", "26", "--out", str(out))  # fmt: skip
    assert_one_error(again, "other settings", "loss")


def test_factory_loss_without_targets_and_lm_loss_on_dict_batches(user, tmp_path):
    runner = CliRunner()
    mine = user / "mine.py"
    result = _analyze(runner, user, "--loss-factory", f"{mine}:residual", "--lanczos-steps", "20",
                      "--out", str(tmp_path / "pinn.h5"), data="inputs_only")  # fmt: skip
    assert result.exit_code == 0, result.output
    stored = load_results(tmp_path / "pinn.h5")
    assert stored.config["loss"] == f"factory:{mine}:residual"
    result = _analyze(runner, user, "--loss", "lm", "--lanczos-steps", "20", "--out", str(tmp_path / "lm.h5"),
                      checkpoint="lm_0.pt", model="make_lm", data="token_data")  # fmt: skip
    assert result.exit_code == 0, result.output
    (entry,) = load_results(tmp_path / "lm.h5").checkpoints
    assert entry.settings["loss"] == "lm" and entry.n_samples == 10


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--loss-factory", "no_such_module_xyz:f"], ["--loss-factory", "no module named 'no_such_module_xyz'"]),
        (["--loss-factory", "{mine}:not_callable"], ["--loss-factory", "must name a callable"]),
        (["--loss-factory", "{mine}:missing"], ["has no attribute 'missing'"]),
        (["--loss-factory", "{mine}:per_example"], ["must return a floating scalar tensor", "float32 [2]"]),
        (["--loss-factory", "{mine}:broken"], ["loss", "fails on the data", "IndexError"]),
        (["--loss-factory", "nocolon"], ["expected MODULE:FUNCTION"]),
        (["--loss", "mse", "--loss-factory", "{mine}:residual"], ["not both"]),
        (["--loss", "nll"], ["needs integer class labels", "float64 [2, 2]"]),
        (["--loss", "lm"], ["'lm' needs integer token labels"]),
    ],
)
def test_bad_losses_are_one_error_line(user, tmp_path, args, fragments):
    args = [a.format(mine=user / "mine.py") for a in args]
    result = _analyze(CliRunner(), user, *args, "--lanczos-steps", "6", "--out", str(tmp_path / "o.h5"))
    assert_one_error(result, *fragments)
    assert not (tmp_path / "o.h5").exists()


def test_job_records_the_loss_and_resolves_the_default():
    from hessspec.runner.job import AnalysisJob, PipelineError

    assert "loss" not in AnalysisJob(model="mlp", data="digits").config()  # cross-entropy, as in older files
    assert "loss" not in AnalysisJob(model="mlp", data="digits", loss="CE").config()
    assert AnalysisJob(model="mlp", data="digits", loss="mse").config()["loss"] == "mse"
    assert AnalysisJob(model="m:f", data="d:f", loss_factory=" mine.py:residual ").config()["loss"] == (
        "factory:mine.py:residual"
    )
    assert AnalysisJob(model="hf:some/dir", data="text:x.txt").loss_label() is None  # the head decides, later
    with pytest.raises(PipelineError, match="not both"):
        AnalysisJob(model="mlp", data="digits", loss="mse", loss_factory="m:f").config()
    with pytest.raises(PipelineError, match="unknown loss 'hinge'"):
        AnalysisJob(model="mlp", data="digits", loss="hinge").config()
