"""Tests of the analysis data (hessspec.data.datasets) on tiny datasets written in the real on-disk formats."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from hessspec.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    available_datasets,
    digits_arrays,
    digits_normalization,
    load_dataset,
    materialize,
    subset_indices,
    synthetic_dataset,
)

# ------------------------------------------------------------------------------------------------ fixtures


def write_cifar(folder: Path, files: list[str], per_file: int, label_key: str, classes: int, seed: int = 0):
    """Write CIFAR pickles as the original files hold them: dicts with a uint8 [N, 3072] 'data' array."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data, labels = [], []
    for name in files:
        batch = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, classes, size=per_file).tolist()
        entry = {
            "batch_label": f"batch {name}",
            label_key: batch_labels,
            "data": batch,
            "filenames": [f"img_{i}.png" for i in range(per_file)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        data.append(batch)
        labels += batch_labels
    return np.concatenate(data).reshape(-1, 3, 32, 32), np.asarray(labels)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    data, labels = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], 4, "labels", 10)
    write_cifar(folder, ["test_batch"], 3, "labels", 10, seed=1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"num_cases_per_batch": 4, "label_names": names, "num_vis": 3072}, handle, protocol=2)
    return tmp_path / "cifar10", data, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (LeCun's MNIST format): magic 0x0000_08_<ndim> for unsigned bytes, big-endian dims, raw data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n: int = 7, with_test: bool = True):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    raw = root / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    if with_test:
        write_idx(raw / "t10k-images-idx3-ubyte", images[:2])
        write_idx(raw / "t10k-labels-idx1-ubyte", labels[:2])
    return images, labels


# -------------------------------------------------------------------------------------------------- digits


def test_digits():
    dataset = load_dataset("digits")
    assert isinstance(dataset, TensorDataset)
    inputs, labels = dataset.tensors
    assert inputs.shape == (1797, 1, 8, 8)
    assert inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))
    assert inputs.double().mean().item() == pytest.approx(0.0, abs=1e-6)
    assert inputs.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    mean, std = digits_normalization()
    assert mean == pytest.approx(0.30526, abs=1e-5)
    assert std == pytest.approx(0.37605, abs=1e-5)
    # Pixel values are k / 16 for k in 0..16, standardised.
    levels = torch.unique(inputs * std + mean) * 16
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    images, targets = digits_arrays()
    np.testing.assert_array_equal(images, inputs.numpy())
    np.testing.assert_array_equal(targets, labels.numpy())
    images[0] = 99.0  # a fresh copy each time
    assert digits_arrays()[0][0, 0, 0, 0] != 99.0


def test_digits_subset_is_deterministic_and_sorted():
    full_inputs, full_labels = load_dataset("digits").tensors
    first = load_dataset("digits", samples=100, seed=3)
    again = load_dataset("digits", samples=100, seed=3)
    other = load_dataset("digits", samples=100, seed=4)
    expected = torch.randperm(1797, generator=torch.Generator().manual_seed(3))[:100].sort().values
    torch.testing.assert_close(subset_indices(1797, 100, 3), expected)
    torch.testing.assert_close(first.tensors[0], full_inputs[expected])
    torch.testing.assert_close(first.tensors[1], full_labels[expected])
    torch.testing.assert_close(again.tensors[0], first.tensors[0])
    assert not torch.equal(other.tensors[0], first.tensors[0])
    assert len(load_dataset("digits", samples=1797)) == 1797


@pytest.mark.parametrize("samples", [0, -1, 1798, True, 2.5])
def test_bad_sample_counts(samples):
    with pytest.raises(DatasetError, match=r"samples must be an integer between 1 and the dataset size 1797"):
        load_dataset("digits", samples=samples)


def test_subset_indices_all_and_bad_seed():
    torch.testing.assert_close(subset_indices(5, None), torch.arange(5))
    with pytest.raises(DatasetError, match="seed must be an integer, got None"):
        load_dataset("digits", samples=3, seed=None)


# --------------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_matches_torchvision_reader(cifar10_root, monkeypatch):
    import torchvision.datasets.cifar
    from torchvision import transforms

    root, data, labels = cifar10_root
    dataset = load_dataset(f"cifar10:{root}")
    inputs, targets = dataset.tensors
    assert inputs.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(targets.numpy(), labels)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(inputs * std + mean, torch.from_numpy(data).float() / 255, atol=1e-6, rtol=0)

    # torchvision insists on the md5 sums of the real release even when not downloading: the fixture cannot
    # pass that, which is why hessspec reads the (identical) pickle format itself.
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    reference = torchvision.datasets.CIFAR10(str(root), train=True, download=False, transform=normalise)
    assert len(reference) == len(dataset)
    for index in (0, 7, 19):
        image, label = reference[index]
        torch.testing.assert_close(inputs[index], image, atol=1e-6, rtol=1e-6)
        assert targets[index].item() == label


def test_cifar10_root_variants_and_subset(cifar10_root):
    root, data, _ = cifar10_root
    direct = load_dataset(f"cifar10:{root / 'cifar-10-batches-py'}")
    assert len(direct) == 20
    subset = load_dataset(f"cifar10:{root}", samples=5, seed=1)
    index = subset_indices(20, 5, 1)
    torch.testing.assert_close(subset.tensors[0], direct.tensors[0][index])


def test_cifar_bytes_keys(tmp_path):
    # Files re-pickled from `pickle.load(f, encoding="bytes")` have bytes keys.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        entry = {b"data": np.full((2, 3072), i, dtype=np.uint8), b"labels": [i, 9]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=4))
    inputs, labels = load_dataset(f"cifar10:{tmp_path}").tensors
    assert labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert inputs.shape == (10, 3, 32, 32)


def test_cifar100(tmp_path):
    data, labels = write_cifar(tmp_path / "cifar-100-python", ["train"], 6, "fine_labels", 100)
    inputs, targets = load_dataset(f"cifar100:{tmp_path}").tensors
    np.testing.assert_array_equal(targets.numpy(), labels)
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(inputs * std + mean, torch.from_numpy(data).float() / 255, atol=1e-6, rtol=0)


def test_cifar_errors(tmp_path, cifar10_root):
    with pytest.raises(DatasetError, match=r"root '.*nowhere' does not exist; expected cifar-10-batches-py/"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    root, _, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"lacks data_batch_3; expected cifar-10-batches-py/data_batch_1"):
        load_dataset(f"cifar10:{root}")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DatasetError, match=r"data_batch_3' is not a readable CIFAR pickle"):
        load_dataset(f"cifar10:{root}")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    )
    with pytest.raises(DatasetError, match=r"expected 'data' uint8 of shape \[N, 3072\], got ndarray uint8 \(2, 100\)"):
        load_dataset(f"cifar10:{root}")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]})
    )
    with pytest.raises(DatasetError, match=r"expected 2 labels under 'labels', got 1"):
        load_dataset(f"cifar10:{root}")
    with pytest.raises(DatasetError, match=r"needs a root directory: expected 'cifar10:ROOT'"):
        load_dataset("cifar10:")


class _Touch:
    """Unpickling this would create a file: the CIFAR reader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_reader_refuses_code_in_pickles(cifar10_root, tmp_path):
    root, _, _ = cifar10_root
    marker = tmp_path / "pwned"
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "payload": _Touch(marker)}
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DatasetError, match=r"global .* is not allowed in a CIFAR batch file"):
        load_dataset(f"cifar10:{root}")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize(
    ("spec", "folder", "mean", "std", "torchvision_class"),
    [
        ("mnist", "MNIST", MNIST_MEAN, MNIST_STD, "MNIST"),
        ("fashion-mnist", "FashionMNIST", FASHION_MNIST_MEAN, FASHION_MNIST_STD, "FashionMNIST"),
    ],
)
def test_mnist_formats(tmp_path, spec, folder, mean, std, torchvision_class):
    import torchvision.datasets

    images, labels = write_mnist(tmp_path, folder)
    inputs, targets = load_dataset(f"{spec}:{tmp_path}").tensors
    assert inputs.shape == (7, 1, 28, 28)
    assert targets.dtype == torch.int64
    np.testing.assert_array_equal(targets.numpy(), labels)
    expected = (torch.from_numpy(images).float().unsqueeze(1) / 255 - mean[0]) / std[0]
    torch.testing.assert_close(inputs, expected, atol=1e-6, rtol=0)
    reference = getattr(torchvision.datasets, torchvision_class)(str(tmp_path), train=True, download=False)
    np.testing.assert_array_equal(reference.data.numpy(), images)


def test_mnist_only_training_files_needed_and_raw_dir_as_root(tmp_path, monkeypatch):
    write_mnist(tmp_path, "MNIST", n=3, with_test=False)
    assert len(load_dataset(f"mnist:{tmp_path}")) == 3
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_dataset("mnist:~")) == 3  # the shell does not expand ~ after "mnist:"
    assert len(load_dataset(f"mnist:{tmp_path / 'MNIST' / 'raw'}", samples=2)) == 2


def test_mnist_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"mnist root .* does not exist; expected MNIST/raw/train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path / 'none'}")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError, match=r"lacks the training files.*decompress it with gunzip"):
        load_dataset(f"mnist:{tmp_path}")
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"are not valid IDX files"):
        load_dataset(f"mnist:{tmp_path}")
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"expected images \[N, H, W\] and N labels, got \[3, 28, 28\] and \[2\]"):
        load_dataset(f"mnist:{tmp_path}")


# --------------------------------------------------------------------------------------------- imagefolder


def write_images(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> dict[str, list[tuple[int, int, int]]]:
    from PIL import Image

    colours: dict[str, list[tuple[int, int, int]]] = {}
    for class_index, (name, class_sizes) in enumerate(sorted(sizes.items())):
        (root / name).mkdir(parents=True)
        colours[name] = []
        for index, size in enumerate(class_sizes):
            colour = (10 + 40 * index, 200 - 50 * class_index, 30 + 20 * class_index)
            Image.new("RGB", size, colour).save(root / name / f"{index}.png")
            colours[name].append(colour)
    return colours


def test_imagefolder_resize_crop_and_imagenet_normalisation(tmp_path):
    colours = write_images(tmp_path / "images", {"cat": [(12, 10)] * 3, "dog": [(20, 16), (9, 9)]})
    dataset = load_dataset(f"imagefolder:{tmp_path / 'images'}", image_size=8)
    batches = materialize(dataset, batch_size=4, device="cpu")
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert inputs.shape == (5, 3, 8, 8)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    expected_colours = colours["cat"] + colours["dog"]
    mean = torch.tensor(IMAGENET_MEAN)
    std = torch.tensor(IMAGENET_STD)
    for image, colour in zip(inputs, expected_colours, strict=True):
        expected = (torch.tensor(colour, dtype=torch.float32) / 255 - mean) / std
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(image.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    subset = load_dataset(f"imagefolder:{tmp_path / 'images'}", image_size=8, samples=2, seed=5)
    assert isinstance(subset, Subset)
    assert subset.indices == subset_indices(5, 2, 5).tolist()


def test_imagefolder_without_resizing_needs_equal_sizes(tmp_path):
    write_images(tmp_path / "same", {"a": [(6, 5), (6, 5)], "b": [(6, 5)]})
    batches = materialize(load_dataset(f"imagefolder:{tmp_path / 'same'}", image_size=None), 8, "cpu")
    assert batches[0][0].shape == (3, 3, 5, 6)
    write_images(tmp_path / "mixed", {"a": [(6, 5)], "b": [(7, 5)]})
    dataset = load_dataset(f"imagefolder:{tmp_path / 'mixed'}", image_size=None)
    with pytest.raises(DatasetError, match=r"item 1 has input shape \[3, 5, 7\] but item 0 has \[3, 5, 6\]"):
        materialize(dataset, 8, "cpu")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="imagefolder root .* does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no usable images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    write_images(tmp_path / "ok", {"a": [(4, 4)]})
    with pytest.raises(DatasetError, match="image_size must be a positive integer or None, got 0"):
        load_dataset(f"imagefolder:{tmp_path / 'ok'}", image_size=0)


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic():
    dataset = load_dataset("synthetic", size=256)
    inputs, labels = dataset.tensors
    assert inputs.shape == (256, 3, 32, 32)
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= 9
    assert len(torch.unique(labels)) == 10
    again = load_dataset("synthetic", size=256)
    torch.testing.assert_close(again.tensors[0], inputs)
    torch.testing.assert_close(again.tensors[1], labels)
    small = load_dataset("synthetic", shape="2x4", num_classes=3, size=600, data_seed=1)
    x, y = small.tensors
    assert x.shape == (600, 2, 4)
    # The labels come from a linear teacher: a linear least-squares fit on one-hot targets separates them well.
    design = torch.cat([x.reshape(600, -1), torch.ones(600, 1)], dim=1).double()
    weights = torch.linalg.lstsq(design, torch.nn.functional.one_hot(y, 3).double()).solution
    assert ((design @ weights).argmax(1) == y).double().mean() > 0.8
    assert len(load_dataset("synthetic", shape=(5,), size=64, samples=10)) == 10
    assert synthetic_dataset(shape=4, size=3).tensors[0].shape == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"shape": "3,a"}, "synthetic shape must be positive integers"),
        ({"shape": (0, 2)}, "synthetic shape must be positive integers"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"size": 0}, "size must be an integer >= 1"),
        ({"colour": 1}, "synthetic takes shape, num_classes, size and data_seed"),
    ],
)
def test_synthetic_errors(kwargs, fragment):
    with pytest.raises(DatasetError, match=fragment):
        load_dataset("synthetic", **kwargs)


# ------------------------------------------------------------------------------------------------ factories


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    name = f"userdata_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch
            from torch.utils.data import Dataset, IterableDataset, TensorDataset

            def tensors(n=10, scale=1.0):
                g = torch.Generator().manual_seed(0)
                return TensorDataset(scale * torch.randn(n, 3, generator=g), torch.arange(n) % 2)

            class Pairs(Dataset):
                def __init__(self, n=5):
                    self.n = n
                def __len__(self):
                    return self.n
                def __getitem__(self, i):
                    return np.full(2, i, dtype=np.float64), np.int64(i % 3)

            class Stream(IterableDataset):
                def __iter__(self):
                    yield torch.zeros(2), 0

            def stream():
                return Stream()

            def number():
                return 3

            def words():
                return ["a text, not a tensor"]

            def empty():
                return TensorDataset(torch.zeros(0, 2), torch.zeros(0))

            def broken():
                raise OSError("disk on fire")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_factory_datasets(data_module):
    dataset = load_dataset(f"{data_module}:tensors", n=12, scale=2.0)
    assert len(dataset) == 12
    pairs = load_dataset(f"{data_module}:Pairs", samples=3, seed=0)
    assert isinstance(pairs, Subset)
    batches = materialize(pairs, batch_size=2, device="cpu")
    assert [tuple(x.shape) for x, _ in batches] == [(2, 2), (1, 2)]
    chosen = subset_indices(5, 3, 0)
    torch.testing.assert_close(torch.cat([x[:, 0] for x, _ in batches]), chosen.float())
    torch.testing.assert_close(torch.cat([y for _, y in batches]), chosen % 3)


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        ("stream", r"must return a map-style torch Dataset .* got .*Stream"),
        ("number", r"must return a map-style torch Dataset .* got builtins.int"),
        ("words", r"pairs, tuples whose first element is the input, or mappings of tensors; its item 0 is str"),
        ("empty", r"returned an empty dataset"),
        ("broken", r"raised OSError: disk on fire"),
        ("missing", r"has no attribute 'missing'"),
    ],
)
def test_factory_dataset_errors(data_module, function, fragment):
    with pytest.raises(DatasetError, match=fragment):
        load_dataset(f"{data_module}:{function}")


def test_spec_errors():
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar'; expected one of digits, cifar10:ROOT"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match=r"no module named 'no_such_data_module'"):
        load_dataset("no_such_data_module:make")
    with pytest.raises(DatasetError, match=r"dataset 'digits' takes no extra arguments, got size"):
        load_dataset("digits", size=3)
    with pytest.raises(DatasetError, match="expected a dataset spec"):
        load_dataset("  ")
    assert "module:function" in available_datasets()


# --------------------------------------------------------------------------------------------- materialize


def test_materialize_batches_and_last_batch():
    dataset = load_dataset("digits", samples=300, seed=0)
    batches = materialize(dataset, batch_size=128, device="cpu")
    assert [x.shape[0] for x, _ in batches] == [128, 128, 44]
    assert all(x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 for x, _ in batches)
    assert all(y.dtype == torch.int64 and y.shape == (x.shape[0],) for x, y in batches)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), dataset.tensors[0])
    torch.testing.assert_close(torch.cat([y for _, y in batches]), dataset.tensors[1])
    doubles = materialize(dataset, batch_size=1000, device=torch.device("cpu"), dtype=torch.float64)
    assert len(doubles) == 1
    assert doubles[0][0].dtype == torch.float64
    # One stacked tensor, split into views: a single transfer to the device.
    storages = {x.untyped_storage().data_ptr() for x, _ in materialize(dataset, 100, "cpu", torch.float64)}
    assert len(storages) == 1


def test_materialize_subset_fast_path_matches_item_by_item():
    base = TensorDataset(torch.randn(20, 3), torch.arange(20) % 4)
    nested = Subset(Subset(base, list(range(2, 18))), [0, 5, 15, 3])

    class ItemByItem:
        def __len__(self):
            return len(nested)

        def __getitem__(self, index):
            return nested[index]

    fast = materialize(nested, 3, "cpu")
    slow = materialize(ItemByItem(), 3, "cpu")
    for (x_fast, y_fast), (x_slow, y_slow) in zip(fast, slow, strict=True):
        torch.testing.assert_close(x_fast, x_slow)
        torch.testing.assert_close(y_fast, y_slow)
    torch.testing.assert_close(torch.cat([y for _, y in fast]), torch.tensor([2, 3, 1, 1]))


def test_materialize_generic_items():
    items = [(np.ones((2, 2)) * i, float(i % 2)) for i in range(5)]
    batches = materialize(items, 2, "cpu")
    assert [x.shape for x, _ in batches] == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert batches[0][1].dtype == torch.float32  # floating targets take the analysis dtype; the loss decides
    assert batches[2][1].tolist() == [0]


def test_materialize_items_of_any_structure():
    from collections import UserDict

    transformers = pytest.importorskip("transformers")
    ids = torch.arange(15).reshape(5, 3)
    for wrap in (dict, UserDict, transformers.BatchEncoding):
        items = [wrap({"input_ids": ids[i], "attention_mask": torch.ones(3, dtype=torch.int64)}) for i in range(5)]
        batches = materialize(items, 2, "cpu", torch.float64)
        assert [type(b) for b in batches] == [dict] * 3
        assert batches[0]["input_ids"].dtype == torch.int64  # token ids stay integer
        torch.testing.assert_close(torch.cat([b["input_ids"] for b in batches]), ids)
    triples = materialize([(np.ones(2) * i, i, np.float64(0.5)) for i in range(3)], 2, "cpu", torch.float64)
    assert [tuple(t.dtype for t in b) for b in triples] == [(torch.float64, torch.int64, torch.float64)] * 2
    inputs_only = materialize([torch.ones(2) * i for i in range(3)], 2, "cpu")
    assert [len(b) for b in inputs_only] == [1, 1] and inputs_only[1][0].tolist() == [[2.0, 2.0]]
    columns = materialize(TensorDataset(torch.zeros(3, 2), torch.zeros(3, 2), torch.arange(3)), 2, "cpu")
    assert [len(b) for b in columns] == [3, 3]


@pytest.mark.parametrize(
    ("dataset", "kwargs", "fragment"),
    [
        (TensorDataset(torch.zeros(3, 2), torch.zeros(3)), {"batch_size": 0}, "batch_size must be an integer >= 1"),
        (TensorDataset(torch.zeros(3, 2), torch.zeros(3)), {"dtype": torch.int32}, "floating torch dtype"),
        (TensorDataset(torch.zeros(0, 2), torch.zeros(0)), {}, "empty dataset"),
        ([], {}, "empty dataset"),
        ([(torch.zeros(2), 0), (torch.zeros(3), 1)], {}, r"item 1 has input shape \[3\] but item 0 has \[2\]"),
        ([(torch.zeros(2), torch.zeros(2)), (torch.zeros(2), torch.zeros(3))], {}, r"item 1 has element 1 shape \[3\]"),
        ([(torch.zeros(2), "cat")], {}, "item 0: expected element 1 to be a tensor, array or number, got builtins.str"),
        ([("image", 0)], {}, r"item 0: expected the input to be a tensor, array or number, got builtins.str"),
        ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], {}, r"item 1 has entries \['b'\] but item 0 has \['a'\]"),
    ],
)
def test_materialize_errors(dataset, kwargs, fragment):
    arguments = {"batch_size": 2, "device": "cpu", **kwargs}
    with pytest.raises(DatasetError, match=fragment):
        materialize(dataset, **arguments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_materialize_to_cuda():
    dataset = load_dataset("digits", samples=10)
    batches = materialize(dataset, 4, "cuda", torch.float64)
    assert all(x.is_cuda and y.is_cuda and x.dtype == torch.float64 for x, y in batches)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]).cpu(), dataset.tensors[0].double())
