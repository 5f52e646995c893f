"""Checkpoints that are directories: Hugging Face ``save_pretrained`` directories, one per training step.

The Hugging Face Trainer writes ``OUT/checkpoint-500/`` (``config.json``, ``model.safetensors`` or a sharded
``model.safetensors.index.json``, ``trainer_state.json``, optimizer and scheduler states); ``model.save_pretrained``
writes the same model files. Such a directory is one checkpoint: its weights are read (safetensors, or
``pytorch_model.bin`` with ``torch.load(weights_only=True)``; the optimizer state is never read), its step is
``trainer_state.json``'s ``global_step`` or else the number in the directory name, and its hash is the SHA-256 of
its weight files' bytes in name order (for a single ``model.safetensors``, that file's own SHA-256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from hessspec.models.hf import CONFIG_FILE, WEIGHT_FILES, is_model_directory

TRAINER_STATE = "trainer_state.json"
FORMAT = "hf-directory"

__all__ = ["FORMAT", "TRAINER_STATE", "is_model_directory", "read_directory", "trainer_step", "weight_files"]


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory, sorted by name.

    A single ``model.safetensors`` (preferred) or ``pytorch_model.bin``, or the shards named by an
    ``*.index.json``'s ``weight_map``.

    Raises:
        ValueError: an index that cannot be read or names a missing shard, or no weight file at all.
    """
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            index = json.loads(file.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            msg = f"checkpoint {str(directory)!r}: {name} is not a readable shard index ({type(error).__name__})"
            raise ValueError(msg) from error
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            msg = f"checkpoint {str(directory)!r}: shard(s) {', '.join(missing[:3])} named by {name} are missing"
            raise ValueError(msg)
        return [directory / shard for shard in shards]
    msg = f"checkpoint {str(directory)!r} has {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)})"
    raise ValueError(msg)


def trainer_step(directory: Path) -> int | None:
    """``global_step`` of the directory's ``trainer_state.json`` (the Hugging Face Trainer's), or None.

    Raises:
        ValueError: a ``trainer_state.json`` that is not readable JSON.
    """
    file = directory / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        msg = f"checkpoint {str(directory)!r}: {TRAINER_STATE} is not readable JSON: {error}"
        raise ValueError(msg) from error
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None
    return step


def _read_weights(file: Path) -> dict[str, Any]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    return torch.load(file, map_location="cpu", weights_only=True)


def read_directory(directory: Path) -> tuple[dict[str, Any], int | None, str]:
    """Read a ``save_pretrained`` directory's weights, step and hash.

    Args:
        directory: the directory.

    Returns:
        ``(state_dict, step, sha256)``: all shards' tensors merged (and anything else ``torch.load`` found in a
        ``.bin``, for the caller to filter), the trainer's ``global_step`` (None when there is no
        ``trainer_state.json``), and the hash of the weight files.

    Raises:
        ValueError: see :func:`weight_files` and :func:`trainer_step`; a weight file that cannot be read.
        pickle.UnpicklingError, RuntimeError, OSError: from reading a damaged ``.bin`` or ``.safetensors`` file.
    """
    files = weight_files(directory)
    digest = hashlib.sha256()
    state: dict[str, Any] = {}
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(chunk)
        part = _read_weights(file)
        if not isinstance(part, dict):
            msg = f"checkpoint {str(file)!r} holds a {type(part).__name__}, expected a mapping of names to tensors"
            raise ValueError(msg)
        state.update(part)
    return state, trainer_step(directory), digest.hexdigest()
