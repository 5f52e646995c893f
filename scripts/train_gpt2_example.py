#!/usr/bin/env python
"""Worked example: a small GPT-2-style language model trained on the CPU, then its Hessian spectrum across training.

Everything is built here, nothing is downloaded:

1. ``OUT/corpus.txt``: an English-like text drawn from a small seeded grammar (deterministic, ~40k characters).
2. A character-level tokenizer over its characters (``tokenizers`` WordLevel, saved with every checkpoint).
3. A GPT-2 causal LM from a ``GPT2Config`` (2 layers, width 32, 4 heads, context 64: ~30k parameters; dropout 0,
   so the trained loss is the analysed one), trained with AdamW on consecutive 64-character sequences of the
   corpus (the sequences ``--data text:OUT/corpus.txt`` gives), in a seeded order.
4. Checkpoints as the Hugging Face Trainer writes them: ``OUT/checkpoint-<step>/`` with ``config.json``,
   ``model.safetensors``, the tokenizer and ``trainer_state.json`` (``global_step``), dense early in training.
5. ``hessspec analyze OUT/checkpoint-*/ --model hf:OUT/checkpoint-0 --data text:OUT/corpus.txt`` (the ``lm`` loss,
   from the model's head: next-token cross-entropy, mean over all target tokens), then ``hessspec info`` and
   ``hessspec plot evolution`` / ``plot density``.

Example::

    python scripts/train_gpt2_example.py --out runs/gpt2-example
    python scripts/train_gpt2_example.py --out runs/gpt2-example --no-analyze   # training only

Rerunning with the same ``--out`` retrains (deterministically: the same checkpoints) and resumes the analysis, which
skips the checkpoints already in ``OUT/spectrum.h5``. ``--tiny`` shrinks everything to seconds (the test suite).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

_NOUNS = "cat dog bird fox child farmer king queen river tree house garden ship road star moon".split()
_ADJECTIVES = "old young small big quiet red green dark bright happy tired clever".split()
_VERBS = "sees finds follows helps watches calls meets carries leaves loves".split()
_PLACES = "by the river,in the garden,under the tree,near the house,on the road,at night".split(",")


def write_corpus(path: Path, characters: int, seed: int) -> str:
    """A deterministic English-like text of about ``characters`` characters from a small grammar; written to
    ``path``.

    Returns:
        The text.
    """
    rng = random.Random(seed)

    def noun_phrase() -> str:
        adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.5 else ""
        return f"the {adjective}{rng.choice(_NOUNS)}"

    sentences: list[str] = []
    length = 0
    while length < characters:
        sentence = f"{noun_phrase()} {rng.choice(_VERBS)} {noun_phrase()}"
        if rng.random() < 0.4:
            sentence += f" {rng.choice(_PLACES)}"
        sentence = sentence[0].upper() + sentence[1:] + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    lines = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def char_tokenizer(text: str) -> Any:
    """A character-level fast tokenizer over the characters of ``text`` (plus ``<unk>`` and ``<pad>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a token
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def build_model(vocab_size: int, args: argparse.Namespace) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def checkpoint_steps(steps: int, first: int) -> list[int]:
    """0, F, 2F, 4F, ... below ``steps``, and ``steps``: dense early, where the spectrum changes fastest."""
    found, step = [0], first
    while step < steps:
        found.append(step)
        step *= 2
    return sorted(set(found + [steps]))


def save_checkpoint(model: Any, tokenizer: Any, directory: Path, step: int, history: list[dict[str, Any]]) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {"global_step": step, "log_history": history}
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write the corpus, train, save the checkpoints; returns the training log."""
    from transformers.utils import logging

    from hessspec.data.text import text_dataset

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    text = write_corpus(args.out / "corpus.txt", args.characters, args.seed)
    tokenizer = char_tokenizer(text)
    sequences = text_dataset(args.out / "corpus.txt", tokenizer, seq_len=args.seq_len).input_ids
    model = build_model(len(tokenizer), args)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(text):,} characters, {len(sequences)} sequences of {args.seq_len}; vocabulary "
          f"{len(tokenizer)}; GPT-2 with {parameters:,} parameters")  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    saves = checkpoint_steps(args.steps, args.first_checkpoint)
    print(f"training {args.steps} steps, batches of {args.batch_size}; checkpoints at {saves}")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(sequences), generator=generator)
    position, history, started = 0, [], time.monotonic()
    model.train()
    for step in range(args.steps + 1):
        if step in saves:
            save_checkpoint(model, tokenizer, args.out / f"checkpoint-{step}", step, list(history))
        if step == args.steps:
            break
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(sequences), generator=generator), 0
        batch = sequences[order[position : position + args.batch_size]]
        position += args.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step == 0:
            history.append({"step": step + 1, "loss": round(loss.item(), 4)})
            print(f"step {step + 1:>5}  loss {loss.item():.4f}  {time.monotonic() - started:.1f} s", flush=True)
    return history


def _hessspec(*arguments: str) -> None:
    command = [sys.executable, "-m", "hessspec", *arguments]
    print("$ hessspec " + " ".join(arguments), flush=True)
    subprocess.run(command, check=True)


def analyze(args: argparse.Namespace) -> None:
    """``hessspec analyze`` over the checkpoints, then ``info`` and the figures."""
    out = args.out
    _hessspec(
        "analyze", str(out / "checkpoint-*"), "--model", f"hf:{out / 'checkpoint-0'}",
        "--data", f"text:{out / 'corpus.txt'}", "--data-arg", f"seq_len={args.seq_len}",
        "--samples", str(args.samples), "--batch-size", str(args.batch_size),
        "--lanczos-steps", str(args.lanczos_steps), "--probes", str(args.probes), "--top-k", str(args.top_k),
        "--dtype", args.dtype, "--device", "cpu", "--label", "GPT-2 example", "--out", str(out / "spectrum.h5"),
    )  # fmt: skip
    _hessspec("info", str(out / "spectrum.h5"))
    _hessspec("plot", "evolution", str(out / "spectrum.h5"), "--out", str(out / "evolution.png"))
    _hessspec("plot", "density", str(out / "spectrum.h5"), "--out", str(out / "density.png"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the corpus, checkpoints, results")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--first-checkpoint", type=int, default=20, help="first step saved after 0 (then doubling)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (training and analysis)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens (characters) per sequence")
    parser.add_argument("--width", type=int, default=32, help="GPT-2 n_embd")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 n_layer")
    parser.add_argument("--heads", type=int, default=4, help="GPT-2 n_head")
    parser.add_argument("--characters", type=int, default=40_000, help="length of the generated corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the initialisation, the order")
    parser.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    parser.add_argument("--samples", type=int, default=16, help="sequences analysed (a seeded subset)")
    parser.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos steps per probe")
    parser.add_argument("--probes", type=int, default=2, help="probe vectors")
    parser.add_argument("--top-k", type=int, default=10, help="top eigenvalues kept")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="analysis precision")
    parser.add_argument("--no-analyze", action="store_true", help="train only")
    parser.add_argument("--tiny", action="store_true", help="seconds instead of minutes (for the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.first_checkpoint, args.width, args.layers, args.heads = 4, 2, 8, 1, 2
        args.seq_len, args.characters, args.batch_size, args.samples = 16, 2_000, 4, 8
        args.lanczos_steps, args.probes, args.top_k, args.log_every = 6, 1, 3, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    train(args)
    print(f"training done in {time.monotonic() - started:.0f} s")
    if not args.no_analyze:
        analyze(args)
        print(f"all done in {time.monotonic() - started:.0f} s; figures in {args.out}")


if __name__ == "__main__":
    main()
