"""The demo end to end at a tiny size, and the trainer that writes its checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessspec.checkpoints import load_checkpoint
from hessspec.demo import DemoConfig, run_demo
from hessspec.store import load_results
from hessspec.training import train_sgd


def test_train_sgd_writes_real_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    paths = train_sgd(model, x, y, [0, 3, 7], tmp_path, lr=0.1, batch_size=16)
    assert [p.name for p in paths] == ["ckpt_000000.pt", "ckpt_000003.pt", "ckpt_000007.pt"]
    first, last = load_checkpoint(paths[0]), load_checkpoint(paths[-1])
    assert (first.step, last.step) == (0, 7)
    assert torch.equal(last.state_dict["1.weight"], model[1].weight.detach())
    assert not torch.equal(first.state_dict["1.weight"], last.state_dict["1.weight"])
    # Same seed, same trajectory.
    torch.manual_seed(0)
    again = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    train_sgd(again, x, y, [7], tmp_path / "again", lr=0.1, batch_size=16)
    assert torch.equal(again[1].weight, model[1].weight)
    with pytest.raises(ValueError, match="non-negative"):
        train_sgd(model, x, y, [], tmp_path)


def test_tiny_demo_writes_results_figures_and_table(tmp_path):
    config = DemoConfig(save_steps=(0, 5, 30), lanczos_steps=8, probes=2, top_k=4)
    lines: list[str] = []
    table = run_demo(tmp_path, config, echo=lines.append)
    for name in ("nobn", "bn"):
        run = load_results(tmp_path / f"{name}.h5")
        assert run.steps == (0, 5, 30) or list(run.steps) == [0, 5, 30]
        assert all(c.n_samples == 1797 and c.lanczos_steps == 8 for c in run.checkpoints)
        assert (tmp_path / f"density_{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"overlap_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "evolution.png").exists()
    assert (tmp_path / "density.png").stat().st_size > 10_000
    assert [row["run"] for row in table] == ["MLP, no BN", "MLP, BN"]
    assert all(np.isfinite(row["lambda1_peak"]) for row in table)
    assert "| run |" in (tmp_path / "summary.md").read_text()
    # A second run trains nothing and analyses nothing: checkpoints and results are reused.
    lines.clear()
    mtime = (tmp_path / "nobn.h5").stat().st_mtime_ns
    run_demo(tmp_path, config, echo=lines.append)
    assert any("already trained" in line for line in lines)
    assert (tmp_path / "nobn.h5").stat().st_mtime_ns == mtime
