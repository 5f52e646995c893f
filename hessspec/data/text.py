"""Token sequences for language models: ``text:FILE`` (tokenised with a model directory's tokenizer) and
``tokens:FILE`` (a pre-tokenised integer array [N, T] in ``.npy`` or ``.pt``).

Items are dicts of int64 tensors of length T, as Hugging Face models take them: ``input_ids``, ``attention_mask``
(1 on tokens, 0 on padding) and ``labels`` (the ``input_ids``, with -100 on padding, which every loss ignores). A
causal language model's ``lm`` loss shifts them itself: each sequence of T tokens has T - 1 next-token targets.
The order is the file's: nothing is shuffled, so the same file gives the same sequences every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hessspec.models._extras import import_extra

DEFAULT_SEQ_LEN = 128  # long enough for local structure, short enough for a Hessian on the CPU; GPT-2's limit is 1024
IGNORE_INDEX = -100  # the label ignored by torch's cross-entropy and by transformers' losses


class TextDataError(ValueError):
    """A text or token file cannot be turned into sequences (hessspec.data.datasets re-raises it as DatasetError)."""


class TokenSequences(Dataset):
    """Fixed-length token sequences; item i is ``{"input_ids", "attention_mask", "labels"}``, each int64 [T].

    Args:
        input_ids: int64 [N, T].
        attention_mask: int64 [N, T] of 0/1, or None for all ones; ``labels`` are -100 where it is 0.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.labels = input_ids.masked_fill(self.attention_mask == 0, IGNORE_INDEX)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices: torch.Tensor) -> TokenSequences:
        """The sequences at ``indices`` (int64 [k]), in that order."""
        return TokenSequences(self.input_ids[indices], self.attention_mask[indices])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def _sequence_length(seq_len: Any) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        msg = f"seq_len must be an integer >= 2 (a sequence of T tokens has T - 1 next-token targets), got {seq_len!r}"
        raise TextDataError(msg)
    return seq_len


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in a model directory, loaded offline (``AutoTokenizer``, no remote code).

    Args:
        directory: a directory holding ``tokenizer.json`` or the files of a slow tokenizer (``save_pretrained``).

    Returns:
        The tokenizer.

    Raises:
        TextDataError: transformers is missing, the directory does not exist or holds no tokenizer.
    """
    transformers = import_extra("transformers", "--data text:FILE", TextDataError)
    path = Path(directory).expanduser()
    if not path.is_dir():
        msg = f"tokenizer directory {str(directory)!r} does not exist"
        raise TextDataError(msg)
    from hessspec.models.hf import quiet_transformers

    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as error:  # OSError, ValueError, KeyError, TypeError: each tokenizer class fails its own way
            first = " ".join(str(error).split())[:200]
            msg = (
                f"no usable tokenizer in {str(directory)!r} ({type(error).__name__}: {first}); save one there with "
                "tokenizer.save_pretrained(DIR), or pass --data-arg tokenizer=DIR"
            )
            raise TextDataError(msg) from error


def text_dataset(file: str | Path, tokenizer: Any, seq_len: int = DEFAULT_SEQ_LEN) -> TokenSequences:
    """A UTF-8 text file, tokenised as one stream and cut into consecutive sequences of ``seq_len`` tokens.

    As Hugging Face's causal-LM examples do (``group_texts``): no special tokens are added, and the tokens after
    the last whole sequence are dropped, so there is no padding.

    Args:
        file: the text file.
        tokenizer: a transformers tokenizer, or a directory holding one (:func:`load_tokenizer`).
        seq_len: tokens per sequence (default 128).

    Returns:
        The sequences, in the order of the text.

    Raises:
        TextDataError: a missing, unreadable, non-UTF-8, empty or too short file, a bad ``seq_len``, or no
            tokenizer.
    """
    seq_len = _sequence_length(seq_len)
    path = Path(file).expanduser()
    if not path.is_file():
        msg = f"text file {str(file)!r} does not exist" if not path.exists() else f"{str(file)!r} is not a file"
        raise TextDataError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        msg = f"text file {str(file)!r} is not UTF-8 (byte {error.start}: {error.reason})"
        raise TextDataError(msg) from error
    except OSError as error:
        msg = f"cannot read text file {str(file)!r}: {error.strerror or error}"
        raise TextDataError(msg) from error
    if not text.strip():
        msg = f"text file {str(file)!r} is empty"
        raise TextDataError(msg)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    from hessspec.models.hf import quiet_transformers

    with quiet_transformers():  # "sequence longer than the model's maximum" is expected: the stream is cut below
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if count < 1:
        msg = (
            f"text file {str(file)!r} has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}; use a "
            "longer text or a smaller --data-arg seq_len"
        )
        raise TextDataError(msg)
    stream = torch.as_tensor(ids[: count * seq_len], dtype=torch.int64)
    return TokenSequences(stream.view(count, seq_len))


def _read_array(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # ValueError, UnpicklingError, RuntimeError, EOFError: a damaged or foreign file
        first = " ".join(str(error).split())[:200]
        msg = f"token file {str(path)!r} cannot be read: {type(error).__name__}: {first}"
        raise TextDataError(msg) from error
    msg = f"token file {str(path)!r} must end in .npy or .pt"
    raise TextDataError(msg)


def tokens_dataset(file: str | Path, pad_id: int | None = None) -> TokenSequences:
    """A pre-tokenised integer array [N, T] (``.npy``, or ``.pt`` read with ``weights_only=True``).

    Args:
        file: the array file.
        pad_id: a token id that marks padding (its positions get attention mask 0 and label -100; a negative
            one, e.g. -100, is replaced by 0 in ``input_ids``), or None.

    Returns:
        The N sequences of T tokens.

    Raises:
        TextDataError: a missing or unreadable file, an array that is not a non-empty integer [N, T] with T >= 2
            and ids >= 0 outside padding, or a bad ``pad_id``.
    """
    path = Path(file).expanduser()
    if not path.is_file():
        msg = f"token file {str(file)!r} does not exist" if not path.exists() else f"{str(file)!r} is not a file"
        raise TextDataError(msg)
    array = _read_array(path)
    if not isinstance(array, (np.ndarray, torch.Tensor)):
        msg = f"token file {str(file)!r} holds a {type(array).__name__}; expected an integer array [N, T]"
        raise TextDataError(msg)
    ids = torch.as_tensor(array)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        msg = f"token file {str(file)!r} holds {ids.dtype} values; expected integer token ids"
        raise TextDataError(msg)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        msg = (
            f"token file {str(file)!r} holds an array of shape {list(ids.shape)}; expected [N, T] "
            "(N >= 1 sequences of T >= 2 tokens)"
        )
        raise TextDataError(msg)
    ids = ids.to(torch.int64)
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        msg = f"pad_id must be an integer token id, got {pad_id!r}"
        raise TextDataError(msg)
    mask = None if pad_id is None else (ids != pad_id).to(torch.int64)
    real = ids if mask is None else ids[mask.bool()]
    if real.numel() and int(real.min()) < 0:
        msg = f"token file {str(file)!r} holds negative token ids (min {int(real.min())}); mark padding with pad_id"
        raise TextDataError(msg)
    if mask is not None and pad_id < 0:
        ids = ids.masked_fill(mask == 0, 0)  # the model still embeds padded positions: give them a valid id
    return TokenSequences(ids.contiguous(), mask)
