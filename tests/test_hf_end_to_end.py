"""Transformers analysed through the command line, as a user runs it, against dense float64 Hessians.

A tiny GPT-2 (tied embeddings) on ``text:FILE`` and on padded ``tokens:FILE``, a tiny BERT-style classifier (and a
regression head) on a ``--data-factory`` of dicts with padding, and a tiny timm ViT: ``hessspec analyze`` in a
subprocess, Lanczos run to the full dimension of a ``--params`` subset, so its top Ritz values are the subset
Hessian's eigenvalues; the reference is ``torch.autograd.functional.hessian`` of the mean loss over the whole set,
computed from the logits in float64 by a model loaded with transformers directly (never the model's own ``.loss``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hessspec.store import load_results
from tests.tiny_hf import TEXT, char_tokenizer, save, tiny_bert, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
# |λ_i(SLQ) - λ_i(dense)| <= RTOL |λ_1|: Lanczos with full reorthogonalisation over the whole subspace is exact up to
# rounding (~1e-13 here); 1e-8 is the bound the analysis promises in float64.
RTOL = 1e-8


def _analyze(tmp_path: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, object]:
    out = tmp_path / "out.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "hessspec", "analyze", *arguments, "--dtype", "float64", "--device", "cpu",
        "--probes", "1", "--no-crosscheck", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"hessspec analyze exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done, load_results(out)


def _dense(model, batches, names, loss_sum) -> tuple[torch.Tensor, float]:
    """Hessian and value of (sum over batches of loss_sum) / (units), in the flat parameters ``names``."""
    params = dict(model.named_parameters())
    shapes = [params[name].shape for name in names]
    theta = torch.cat([params[name].detach().reshape(-1) for name in names])
    units = sum(count for _, count in (loss_sum(None, batch) for batch in batches))

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([int(np.prod(s)) for s in shapes])
        substituted = {name: chunk.view(shape) for name, chunk, shape in zip(names, chunks, shapes, strict=True)}
        total = flat.new_zeros(())
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = functional_call(model, substituted, (), inputs).logits
            total = total + loss_sum(logits, batch)[0]
        return total / units

    return torch.autograd.functional.hessian(mean_loss, theta), float(mean_loss(theta).detach())


def _lm_sum(logits, batch):
    # Next-token cross-entropy summed over the target tokens (label -100 ignored), and their number.
    targets = batch["labels"][:, 1:]
    count = int((targets != -100).sum())
    if logits is None:
        return None, count
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum"), count


def _selected(model, pattern: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if re.search(pattern, name)]


def _check_top(result, hessian: torch.Tensor, k: int) -> None:
    dense = torch.linalg.eigvalsh(hessian).flip(0)[:k].numpy()
    top = np.asarray(result.top_eigenvalues[:k])
    np.testing.assert_allclose(top, dense, rtol=0, atol=RTOL * abs(dense[0]))


def _hf(directory: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if "gpt2" in directory.name else AutoModelForSequenceClassification
    return cls.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager").eval()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["text", "tokens"])
def test_gpt2_top_eigenvalues_match_the_dense_hessian(tmp_path, source):
    directory = save(tiny_gpt2(vocab_size=27, seed=5, n_embd=4), tmp_path / "gpt2", tokenizer_text=TEXT)
    tokenizer = char_tokenizer(tmp_path / "tok")
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    if source == "text":  # 200 characters: 12 sequences of 16 tokens and a dropped tail of 8
        (tmp_path / "corpus.txt").write_text(TEXT[:200], encoding="utf-8")
        sequences = ids[:192].view(12, 16)
        mask = torch.ones_like(sequences)
        data = ["--data", f"text:{tmp_path / 'corpus.txt'}", "--data-arg", "seq_len=16"]
    else:  # 12 sequences of different lengths, right-padded with the pad id 1
        lengths = [16, 9, 16, 5, 12, 16, 3, 16, 14, 8, 16, 11]
        sequences = torch.ones(len(lengths), 16, dtype=torch.int64)
        for row, length in enumerate(lengths):
            sequences[row, :length] = ids[row * 16 : row * 16 + length]
        mask = (sequences != 1).to(torch.int64)
        np.save(tmp_path / "ids.npy", sequences.numpy())
        data = ["--data", f"tokens:{tmp_path / 'ids.npy'}", "--data-arg", "pad_id=1"]
    labels = sequences.masked_fill(mask == 0, -100)
    # Batches of 7 sequences: the last one smaller, and each with its own number of target tokens.
    batches = [
        {"input_ids": sequences[i : i + 7], "attention_mask": mask[i : i + 7], "labels": labels[i : i + 7]}
        for i in range(0, len(sequences), 7)
    ]
    reference = _hf(directory)
    pattern = r"wte"  # the input embedding, tied to the output layer: both uses are differentiated
    names = _selected(reference, pattern)
    hessian, loss = _dense(reference, batches, names, _lm_sum)
    n = hessian.shape[0]
    assert n == 27 * 4
    done, results = _analyze(
        tmp_path, str(directory), "--step", "0", "--model", f"hf:{directory}", *data, "--batch-size", "7",
        "--params", pattern,
        "--lanczos-steps", str(n), "--top-k", "6",
    )  # fmt: skip
    (result,) = results.checkpoints
    assert result.n_params == n and result.n_samples == len(sequences)
    assert result.loss == pytest.approx(loss, rel=1e-12)
    _check_top(result, hessian, 6)
    assert results.config["model_args"] == {"attn_implementation": "eager"}
    assert results.config.get("loss", "lm") == "lm"


def _mse_sum(logits, batch):
    count = len(batch["labels"])
    if logits is None:
        return None, count
    return ((logits.reshape(count, -1) - batch["labels"].reshape(count, -1)) ** 2).sum(), count


def _ce_sum(logits, batch):
    count = len(batch["labels"])
    return (None if logits is None else F.cross_entropy(logits, batch["labels"], reduction="sum")), count


FACTORY = '''
import torch
from torch.utils.data import Dataset


class Pieces(Dataset):
    """Sequences of 3..10 token ids right-padded to 10, with a class label or a real-valued target."""

    def __init__(self, size, regression):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(2, 27, (size, 10), generator=g)
        lengths = torch.randint(3, 11, (size,), generator=g)
        self.mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
        self.ids = self.ids.masked_fill(self.mask == 0, 1)
        self.labels = torch.randn(size, generator=g) if regression else torch.randint(0, 3, (size,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def make(size=10, regression=False):
    return Pieces(size, regression)
'''


@pytest.mark.slow
@pytest.mark.parametrize("num_labels", [3, 1])
def test_bert_classifier_top_eigenvalues_match_the_dense_hessian(tmp_path, num_labels):
    directory = save(tiny_bert(num_labels, seed=2, vocab_size=27), tmp_path / "bert")
    (tmp_path / "pieces.py").write_text(FACTORY)
    regression = num_labels == 1
    sys.path.insert(0, str(tmp_path))
    try:
        import pieces  # the factory, imported here to build the reference batches
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pieces", None)
    dataset = pieces.make(size=10, regression=regression)
    batches = [
        {"input_ids": dataset.ids[i : i + 4], "attention_mask": dataset.mask[i : i + 4],
         "labels": dataset.labels[i : i + 4].double() if regression else dataset.labels[i : i + 4]}
        for i in range(0, 10, 4)
    ]  # fmt: skip
    reference = _hf(directory)
    pattern = r"classifier|attention\.self\.query"  # the query acts through the softmax of the attention
    names = _selected(reference, pattern)
    hessian, loss = _dense(reference, batches, names, _mse_sum if regression else _ce_sum)
    n = hessian.shape[0]
    done, results = _analyze(
        tmp_path, str(directory), "--step", "0", "--model", f"hf:{directory}", "--data-factory", "pieces.py:make",
        "--data-arg", f"regression={regression}", "--batch-size", "4", "--params", pattern,
        "--lanczos-steps", str(n), "--top-k", "5",
    )  # fmt: skip
    (result,) = results.checkpoints
    assert result.n_params == n and result.n_samples == 10
    assert result.loss == pytest.approx(loss, rel=1e-12)
    _check_top(result, hessian, 5)
    assert results.config.get("loss", "mse" if regression else "cross-entropy") == (
        "mse" if regression else "cross-entropy"
    )


@pytest.mark.slow
def test_trainer_checkpoint_directories_across_training(tmp_path):
    """runs/checkpoint-N/ analysed with --model hf:runs/checkpoint-0, in step order, resumable; --samples counts
    sequences."""
    runs = tmp_path / "runs"
    for seed, step in enumerate((0, 20, 100)):
        save(tiny_gpt2(vocab_size=27, seed=seed), runs / f"checkpoint-{step}", step=step, tokenizer_text=TEXT)
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    arguments = [
        str(runs / "checkpoint-*/"), "--model", f"hf:{runs / 'checkpoint-0'}", "--data",
        f"text:{tmp_path / 'corpus.txt'}", "--data-arg", "seq_len=16", "--samples", "6", "--batch-size", "4",
        "--lanczos-steps", "8", "--top-k", "3",
    ]  # fmt: skip
    done, results = _analyze(tmp_path, *arguments)
    stored = results.checkpoints
    assert [r.step for r in stored] == [0, 20, 100]
    assert all(r.n_samples == 6 for r in stored)
    assert [r.source for r in stored] == [str(runs / f"checkpoint-{s}") for s in (0, 20, 100)]
    assert len({r.sha256 for r in stored}) == 3
    assert len({round(r.loss, 10) for r in stored}) == 3  # each checkpoint's own weights were analysed
    again, _ = _analyze(tmp_path, *arguments)
    assert again.stdout.count("skipped") == 3


@pytest.mark.slow
def test_timm_vit_top_eigenvalues_match_the_dense_hessian(tmp_path):
    from hessspec.data.datasets import synthetic_dataset
    from hessspec.models import build_model

    vit = {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2}
    arguments = [f"{key}={value}" for key, value in vit.items()]
    torch.manual_seed(0)
    model = build_model("timm:vit_tiny_patch16_224", num_classes=3, **vit)
    torch.save(model.state_dict(), tmp_path / "vit_step_5.pt")
    pattern = r"attn\.qkv"
    done, results = _analyze(
        tmp_path, str(tmp_path / "vit_step_5.pt"), "--model", "timm:vit_tiny_patch16_224",
        *[item for argument in arguments for item in ("--model-arg", argument)],
        "--data", "synthetic", "--data-arg", "shape=3,8,8", "--data-arg", "num_classes=3", "--data-arg", "size=12",
        "--batch-size", "5", "--params", pattern, "--lanczos-steps", "216", "--top-k", "4",
    )  # fmt: skip
    (result,) = results.checkpoints
    assert results.config["model_args"]["num_classes"] == 3
    assert results.config["model_args"]["attn_implementation"] == "eager"
    data = synthetic_dataset(shape=(3, 8, 8), num_classes=3, size=12)
    x, y = (t.double() if t.is_floating_point() else t for t in data.tensors)
    model = model.double().eval()
    names = _selected(model, pattern)
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])

    def mean_loss(flat):
        chunks = flat.split([int(np.prod(s)) for s in shapes])
        substituted = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, substituted, (x,)), y)

    hessian = torch.autograd.functional.hessian(mean_loss, theta)
    assert hessian.shape[0] == result.n_params == 216
    assert result.loss == pytest.approx(float(mean_loss(theta).detach()), rel=1e-12)
    _check_top(result, hessian, 4)
