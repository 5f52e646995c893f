"""``--data text:FILE`` and ``tokens:FILE``: sequences of token ids as dicts, deterministic, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessspec.data.datasets import DatasetError, load_dataset
from hessspec.data.text import DEFAULT_SEQ_LEN, TokenSequences
from tests.tiny_hf import TEXT, char_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("text") / "corpus.txt"
    file.write_text(TEXT, encoding="utf-8")
    return file


def test_text_is_cut_into_consecutive_sequences(tokenizer_dir, text_file):
    dataset = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16)
    assert isinstance(dataset, TokenSequences)
    tokenizer = char_tokenizer(tokenizer_dir.parent / "again")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character
    assert len(dataset) == len(TEXT) // 16  # the tail after the last whole sequence is dropped
    stream = torch.cat([dataset[i]["input_ids"] for i in range(len(dataset))])
    assert stream.tolist() == ids[: len(dataset) * 16]
    item = dataset[3]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.int64 and v.shape == (16,) for v in item.values())
    assert torch.equal(item["labels"], item["input_ids"]) and bool((item["attention_mask"] == 1).all())
    assert tokenizer.decode(item["input_ids"].tolist()) == TEXT[48:64]
    again = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16)
    assert torch.equal(again.input_ids, dataset.input_ids)
    assert DEFAULT_SEQ_LEN == 128 and len(load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir))) == 4


def test_samples_counts_sequences(tokenizer_dir, text_file):
    full = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16)
    subset = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16, samples=5, seed=2)
    assert len(subset) == 5
    chosen = [full.input_ids.tolist().index(subset[i]["input_ids"].tolist()) for i in range(5)]
    assert chosen == sorted(chosen)  # a seeded subset, in the text's order
    assert set(subset[0]) == {"input_ids", "attention_mask", "labels"}


def test_text_errors_are_one_line(tokenizer_dir, text_file, tmp_path):
    def refused(spec: str, pattern: str, **kwargs) -> None:
        with pytest.raises(DatasetError, match=pattern) as caught:
            load_dataset(spec, **kwargs)
        assert "\n" not in str(caught.value)

    tok = str(tokenizer_dir)
    refused(f"text:{tmp_path / 'missing.txt'}", "text file .* does not exist", tokenizer=tok)
    (tmp_path / "empty.txt").write_text("  \n")
    refused(f"text:{tmp_path / 'empty.txt'}", "is empty", tokenizer=tok)
    (tmp_path / "short.txt").write_text("the cat")
    refused(f"text:{tmp_path / 'short.txt'}", "has 7 tokens, fewer than one sequence of seq_len=16", tokenizer=tok,
            seq_len=16)  # fmt: skip
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    refused(f"text:{tmp_path / 'latin1.txt'}", r"is not UTF-8 \(byte 3", tokenizer=tok)
    refused(f"text:{text_file}", "seq_len must be an integer >= 2", tokenizer=tok, seq_len=1)
    refused(f"text:{text_file}", "needs a tokenizer: load the model with --model hf:DIR, or pass --data-arg tokenizer")
    (tmp_path / "notok").mkdir()
    refused(f"text:{text_file}", "no usable tokenizer in .*notok.*tokenizer.save_pretrained",
            tokenizer=str(tmp_path / "notok"))  # fmt: skip
    refused(f"text:{text_file}", "tokenizer directory .* does not exist", tokenizer=str(tmp_path / "nowhere"))
    refused(f"text:{text_file}", "text:FILE takes tokenizer, seq_len; got stride", tokenizer=tok, stride=3)
    refused("text:", "needs a file: expected 'text:FILE'")


def test_tokens_from_npy_and_pt(tmp_path):
    ids = np.arange(24, dtype=np.int32).reshape(4, 6) % 7
    np.save(tmp_path / "ids.npy", ids)
    torch.save(torch.from_numpy(ids).long(), tmp_path / "ids.pt")
    for name in ("ids.npy", "ids.pt"):
        dataset = load_dataset(f"tokens:{tmp_path / name}")
        assert len(dataset) == 4
        assert dataset[2]["input_ids"].tolist() == ids[2].tolist() and dataset[2]["input_ids"].dtype == torch.int64
        assert torch.equal(dataset[2]["labels"], dataset[2]["input_ids"])
    assert len(load_dataset(f"tokens:{tmp_path / 'ids.npy'}", samples=2)) == 2

    padded = np.array([[5, 6, 3, 0, 0], [4, 4, 4, 4, 2]])
    np.save(tmp_path / "padded.npy", padded)
    item = load_dataset(f"tokens:{tmp_path / 'padded.npy'}", pad_id=0)[0]
    assert item["attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert item["labels"].tolist() == [5, 6, 3, -100, -100] and item["input_ids"].tolist() == [5, 6, 3, 0, 0]
    np.save(tmp_path / "minus.npy", np.where(padded == 0, -100, padded))
    item = load_dataset(f"tokens:{tmp_path / 'minus.npy'}", pad_id=-100)[0]
    assert item["input_ids"].tolist() == [5, 6, 3, 0, 0] and item["labels"].tolist() == [5, 6, 3, -100, -100]


def test_token_errors_are_one_line(tmp_path):
    def refused(name: str, content, pattern: str, **kwargs) -> None:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".npy"):
            np.save(path, content)
        else:
            torch.save(content, path)
        with pytest.raises(DatasetError, match=pattern) as caught:
            load_dataset(f"tokens:{path}", **kwargs)
        assert "\n" not in str(caught.value)

    refused("rank1.npy", np.arange(5), r"shape \[5\]; expected \[N, T\]")
    refused("rank3.pt", torch.zeros(2, 3, 4, dtype=torch.long), r"shape \[2, 3, 4\]; expected \[N, T\]")
    refused("float.npy", np.zeros((2, 3)), "holds torch.float64 values; expected integer token ids")
    refused("negative.npy", np.array([[1, -1, 2]]), "negative token ids .*mark padding with pad_id")
    refused("dict.pt", {"input_ids": torch.zeros(2, 3)}, "holds a dict; expected an integer array")
    refused("damaged.pt", b"not a torch file", "cannot be read")
    refused("objects.npy", np.array([[1, 2]], dtype=object), "cannot be read")  # np.load(allow_pickle=False)
    refused("ids.txt", b"1 2 3", "must end in .npy or .pt")
    refused("pad.npy", np.ones((2, 3), dtype=np.int64), "pad_id must be an integer", pad_id="x")
    with pytest.raises(DatasetError, match="token file .* does not exist"):
        load_dataset(f"tokens:{tmp_path / 'none.npy'}")


def test_a_subset_of_sequences_stays_one_tensor(tokenizer_dir, text_file):
    full = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16)
    subset = load_dataset(f"text:{text_file}", tokenizer=str(tokenizer_dir), seq_len=16, samples=4, seed=1)
    assert isinstance(subset, TokenSequences) and subset.input_ids.shape == (4, 16)
    rows = [full.input_ids.tolist().index(row) for row in subset.input_ids.tolist()]
    assert rows == sorted(rows) and len(set(rows)) == 4
