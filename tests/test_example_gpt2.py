"""scripts/train_gpt2_example.py in its tiny mode: corpus, tokenizer, training, Hugging Face checkpoint directories,
then ``hessspec analyze`` across them and the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hessspec.checkpoints import load_checkpoint
from hessspec.data.datasets import load_dataset
from hessspec.models import build_model, default_loss
from hessspec.store import load_results

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_gpt2_example.py"


@pytest.mark.slow
def test_gpt2_example_trains_analyses_and_plots(tmp_path):
    out = tmp_path / "example"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--tiny"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "checkpoints at [0, 2, 4]" in done.stdout
    for step in (0, 2, 4):
        directory = out / f"checkpoint-{step}"
        assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"} <= {
            p.name for p in directory.iterdir()
        }
        assert json.loads((directory / "trainer_state.json").read_text())["global_step"] == step
        assert load_checkpoint(directory).step == step
    model = build_model(f"hf:{out / 'checkpoint-4'}")
    assert type(model).__name__ == "GPT2LMHeadModel" and default_loss(model) == "lm"
    data = load_dataset(f"text:{out / 'corpus.txt'}", tokenizer=str(out / "checkpoint-0"), seq_len=16)
    assert int(data.input_ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert model(data[0]["input_ids"][None]).shape == (1, 16, model.config.vocab_size)

    results = load_results(out / "spectrum.h5")
    assert [r.step for r in results.checkpoints] == [0, 2, 4]
    assert all(r.n_samples == 8 for r in results.checkpoints)
    losses = [r.loss for r in results.checkpoints]
    assert losses[-1] < losses[0]  # it learned something in 4 steps
    for figure in ("evolution.png", "density.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GPT-2 example" in done.stdout  # hessspec info's table
