"""Tiny Hugging Face models and tokenizers built from configs (random init, no download), saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = (
    "the cat sat on the mat. the dog ran to the cat. a bird sang in the tree, and the dog sat down.\n"
    "the mat was red; the tree was tall. the cat ran up the tree and the bird flew away.\n"
) * 3


def char_tokenizer(directory: Path, text: str = TEXT):
    """A character-level fast tokenizer over ``text``'s characters (plus <unk>, <pad>), saved in ``directory``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_gpt2(vocab_size: int = 32, seed: int = 0, n_positions: int = 16, n_embd: int = 8, n_layer: int = 1):
    """A GPT-2 causal LM with tied embeddings: 2 heads, ~1.4k parameters at the defaults."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_bert(num_labels: int = 3, seed: int = 0, problem_type: str | None = None, vocab_size: int = 32):
    """A BERT-style sequence classifier: hidden 8, one layer, 2 heads, ~1.1k parameters."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=num_labels, problem_type=problem_type, pad_token_id=1,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def save(model, directory: Path, step: int | None = None, tokenizer_text: str | None = None) -> Path:
    """``save_pretrained`` into ``directory``, with a Trainer-style ``trainer_state.json`` when ``step`` is given."""
    model.save_pretrained(directory)
    if step is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if tokenizer_text is not None:
        char_tokenizer(directory, tokenizer_text)
    return directory
