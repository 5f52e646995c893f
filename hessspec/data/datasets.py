"""Data for the analysis: the training split, in a fixed order, without augmentation, normalised.

Specs accepted by ``load_dataset``:
    ``digits``                 scikit-learn's 8x8 digits (1,797 images, bundled, no download).
    ``cifar10:ROOT``           ROOT/cifar-10-batches-py/data_batch_1..5 (torchvision's layout).
    ``cifar100:ROOT``          ROOT/cifar-100-python/train.
    ``mnist:ROOT``             ROOT/MNIST/raw/train-{images-idx3,labels-idx1}-ubyte (torchvision's layout).
    ``fashion-mnist:ROOT``     ROOT/FashionMNIST/raw/... likewise.
    ``imagefolder:ROOT``       ROOT/<class>/<image> (torchvision ImageFolder), resized and center-cropped.
    ``synthetic``              seeded Gaussian inputs labelled by a fixed random linear teacher.
    ``text:FILE``              a UTF-8 text tokenised into sequences of ``seq_len`` tokens (``hessspec.data.text``).
    ``tokens:FILE``            a pre-tokenised integer array [N, T], ``.npy`` or ``.pt``.
    ``module:function``        a user factory returning a map-style Dataset: items are (input, label) pairs, tuples
                               whose first element is the input, or mappings of tensors (see ``materialize``).

Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from hessspec.curvature.problem import is_mapping, move_batch
from hessspec.models.factory import FactoryError, load_factory

# Per-channel mean and std of the training images scaled to [0, 1] (the values in common use, e.g. torchvision
# references and the CIFAR ResNet re-implementations).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10}
_ROOTED = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
_CIFAR10_FILES = tuple(f"data_batch_{index}" for index in range(1, 6))


class DatasetError(ValueError):
    """A dataset spec cannot be resolved, its files are missing or malformed, or its items are unusable."""


def available_datasets() -> list[str]:
    """The dataset spec forms accepted by ``load_dataset``.

    Returns:
        E.g. ``["digits", "cifar10:ROOT", ..., "module:function"]``.
    """
    return ["digits", *(f"{name}:ROOT" for name in _ROOTED), "synthetic", "text:FILE", "tokens:FILE", "module:function"]


# ---------------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float64) / 16.0
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits_normalization() -> tuple[float, float]:
    """Global mean and standard deviation of the digits pixels after scaling to [0, 1].

    Returns:
        ``(mean, std)`` over all 1,797 x 64 pixels (about 0.3053 and 0.3760).
    """
    images, _ = _digits_raw()
    return float(images.mean()), float(images.std())


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The whole digits training set as used by the analysis (and by a trainer that must match it).

    Returns:
        ``(images, labels)``: float32 [1797, 1, 8, 8], scaled to [0, 1] then standardised with the global
        ``digits_normalization()``; int64 [1797] in 0..9. Fresh, writable arrays.
    """
    images, labels = _digits_raw()
    mean, std = digits_normalization()
    standardised = ((images - mean) / std).astype(np.float32)[:, None, :, :]
    return standardised, labels.copy()


# ------------------------------------------------------------------------------------------------- helpers


def subset_indices(size: int, samples: int | None, seed: int = 0) -> torch.Tensor:
    """The fixed subset used for ``--samples``: the first ``samples`` of a seeded permutation, sorted.

    Args:
        size: number of examples in the full dataset.
        samples: subset size, or None for all.
        seed: seed of the ``torch.Generator`` drawing the permutation.

    Returns:
        int64 [samples] ascending indices (``arange(size)`` when ``samples`` is None).

    Raises:
        DatasetError: if ``samples`` is not an int in 1..size or ``seed`` is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"seed must be an integer, got {seed!r}"
        raise DatasetError(msg)
    if samples is None:
        return torch.arange(size)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= size:
        msg = f"samples must be an integer between 1 and the dataset size {size}, got {samples!r}"
        raise DatasetError(msg)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:samples].sort().values


def _normalise_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    # images: uint8 [N, C, H, W]; same arithmetic as ToTensor() followed by Normalize(mean, std).
    channels = images.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


def _existing_root(root: str, what: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        msg = f"{what} root {root!r} does not exist; expected {expected} (hessspec never downloads data)"
        raise DatasetError(msg)
    if not path.is_dir():
        msg = f"{what} root {root!r} is not a directory; expected {expected}"
        raise DatasetError(msg)
    return path


# -------------------------------------------------------------------------------------------------- CIFAR


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists, strings and numpy arrays only: no other global can be constructed."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            msg = f"global {module}.{name} is not allowed in a CIFAR batch file"
            raise pickle.UnpicklingError(msg)
        return target


def _field(entry: dict[Any, Any], name: str) -> Any:
    for key in (name, name.encode()):
        if key in entry:
            return entry[key]
    return None


def _read_cifar_batch(file: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as handle:
            # encoding="latin1" as torchvision: the original files are Python 2 pickles.
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        msg = f"CIFAR batch file {str(file)!r} is not a readable CIFAR pickle: {type(error).__name__}: {error}"
        raise DatasetError(msg) from error
    data = _field(entry, "data") if isinstance(entry, dict) else None
    labels = _field(entry, label_key) if isinstance(entry, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        msg = f"CIFAR batch file {str(file)!r}: expected 'data' uint8 of shape [N, 3072], got {found}"
        raise DatasetError(msg)
    labels_array = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels_array.shape != (data.shape[0],):
        msg = (
            f"CIFAR batch file {str(file)!r}: expected {data.shape[0]} labels under {label_key!r}, got "
            f"{labels_array.shape[0] if labels_array.ndim == 1 else labels_array.shape}"
        )
        raise DatasetError(msg)
    return data, labels_array


def _cifar_raw(root: str, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder_name, files, label_key, classes = {
        "cifar10": ("cifar-10-batches-py", _CIFAR10_FILES, "labels", 10),
        "cifar100": ("cifar-100-python", ("train",), "fine_labels", 100),
    }[variant]
    expected = f"{folder_name}/{' '.join(files)} under it (torchvision's layout)"
    path = _existing_root(root, variant.upper().replace("CIFAR", "CIFAR-"), expected)
    candidates = [path / folder_name, path]
    folder = next((c for c in candidates if all((c / name).is_file() for name in files)), None)
    if folder is None:
        missing = [name for name in files if not (candidates[0] / name).is_file()]
        msg = f"{variant} root {root!r} lacks {', '.join(missing)}; expected {expected} (hessspec never downloads data)"
        raise DatasetError(msg)
    parts = [_read_cifar_batch(folder / name, label_key) for name in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        msg = f"{variant} labels in {str(folder)!r} must lie in 0..{classes - 1}, found {labels.min()}..{labels.max()}"
        raise DatasetError(msg)
    return torch.from_numpy(data), torch.from_numpy(labels)


# -------------------------------------------------------------------------------------------------- MNIST


def _mnist_raw(root: str, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    class_folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[variant]
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    expected = f"{class_folder}/raw/{files[0]} and {files[1]} under it (torchvision's layout, uncompressed)"
    path = _existing_root(root, variant, expected)
    candidates = [path / class_folder / "raw", path / "raw", path]
    folder = next((c for c in candidates if all((c / name).is_file() for name in files)), None)
    if folder is None:
        gzipped = [str(c / (name + ".gz")) for c in candidates for name in files if (c / (name + ".gz")).is_file()]
        hint = f"; found compressed {gzipped[0]}: decompress it with gunzip" if gzipped else ""
        msg = f"{variant} root {root!r} lacks the training files; expected {expected}{hint}"
        raise DatasetError(msg)
    try:
        images = read_image_file(str(folder / files[0]))
        labels = read_label_file(str(folder / files[1]))
    except (AssertionError, ValueError, RuntimeError, TypeError, KeyError, IndexError) as error:
        msg = f"{variant} files in {str(folder)!r} are not valid IDX files: {type(error).__name__}: {error}"
        raise DatasetError(msg) from error
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        msg = (
            f"{variant} files in {str(folder)!r}: expected images [N, H, W] and N labels, got "
            f"{list(images.shape)} and {list(labels.shape)}"
        )
        raise DatasetError(msg)
    return images.unsqueeze(1), labels.to(torch.int64)


# --------------------------------------------------------------------------------------- other dataset kinds


def _image_folder(root: str, image_size: int | None) -> Dataset:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    path = _existing_root(root, "imagefolder", "one sub-directory of images per class")
    steps: list[Callable[..., Any]] = []
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            msg = f"image_size must be a positive integer or None, got {image_size!r}"
            raise DatasetError(msg)
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    try:
        return ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as error:
        msg = f"imagefolder root {root!r} holds no usable images: {error}"
        raise DatasetError(msg) from error


def _parse_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        parts: list[Any] = [shape]
    elif isinstance(shape, str):
        parts = [p for p in shape.replace("x", ",").strip("()[] ").split(",") if p.strip()]
    elif isinstance(shape, (tuple, list)):
        parts = list(shape)
    else:
        parts = []
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        msg = f"synthetic shape must be positive integers such as (3, 32, 32) or '3,32,32', got {shape!r}"
        raise DatasetError(msg)
    return dims


def synthetic_dataset(
    shape: Any = (3, 32, 32), num_classes: int = 10, size: int = 2048, data_seed: int = 0
) -> TensorDataset:
    """Gaussian inputs labelled by a random linear teacher, so the problem is learnable.

    Args:
        shape: shape of one input, a tuple or a string such as ``"3,32,32"``.
        num_classes: number of classes (>= 2).
        size: number of examples.
        data_seed: seed of the generator drawing the inputs and the teacher (independent of ``--samples``'s
            seed, so subsets of one synthetic dataset can be compared).

    Returns:
        ``TensorDataset`` of float32 [size, *shape] standard normal inputs and int64 [size] labels
        ``argmax(x W)`` with ``W`` a standard normal [prod(shape), num_classes] matrix.

    Raises:
        DatasetError: for a malformed shape or non-positive sizes.
    """
    dims = _parse_shape(shape)
    for name, value, minimum in (("num_classes", num_classes, 2), ("size", size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            msg = f"synthetic {name} must be an integer >= {minimum}, got {value!r}"
            raise DatasetError(msg)
    generator = torch.Generator().manual_seed(int(data_seed))
    inputs = torch.randn(size, *dims, generator=generator)
    teacher = torch.randn(math.prod(dims), num_classes, generator=generator)
    labels = (inputs.reshape(size, -1) @ teacher).argmax(dim=1)
    return TensorDataset(inputs, labels)


def _check_map_style(dataset: Any, spec: str) -> None:
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        msg = f"data factory {spec!r} must return a map-style torch Dataset (with __getitem__ and __len__), got {kind}"
        raise DatasetError(msg)
    if len(dataset) < 1:
        msg = f"data factory {spec!r} returned an empty dataset ({kind})"
        raise DatasetError(msg)
    first = dataset[0]
    if not (isinstance(first, (tuple, list, torch.Tensor, np.ndarray)) or is_mapping(first)) or (
        isinstance(first, (tuple, list)) and not first
    ):
        got = "an empty sequence" if isinstance(first, (tuple, list)) else type(first).__name__
        msg = (
            f"data factory {spec!r} must return a dataset of (input, label) pairs, tuples whose first element is "
            f"the input, or mappings of tensors; its item 0 is {got}"
        )
        raise DatasetError(msg)


def _from_factory(spec: str, kwargs: dict[str, Any]) -> Dataset:
    try:
        factory = load_factory(spec)
    except FactoryError as error:
        raise DatasetError(str(error)) from error
    try:
        dataset = factory(**kwargs)
    except Exception as error:
        msg = f"data factory {spec!r} called with {kwargs} raised {type(error).__name__}: {error}"
        raise DatasetError(msg) from error
    _check_map_style(dataset, spec)
    return dataset


# ------------------------------------------------------------------------------------------------ public API


def load_dataset(
    spec: str, *, samples: int | None = None, seed: int = 0, image_size: int | None = 224, **kwargs: Any
) -> Dataset:
    """Load the training split named by ``spec``, in a fixed order, without augmentation, normalised.

    Built-in image data are normalised per channel with the standard constants of each dataset (``digits``:
    the global mean/std of its pixels, ``imagefolder``: ImageNet's) and returned as a ``TensorDataset`` of
    float32 inputs [N, C, H, W] and int64 labels [N]; ``imagefolder`` and factories are returned lazily (a
    ``Subset`` when ``samples`` is given) and stacked by ``materialize``.

    Args:
        spec: see the module docstring (``digits``, ``cifar10:ROOT``, ``mnist:ROOT``, ``synthetic``,
            ``module:function``, ...). ``~`` in ROOT is expanded.
        samples: analyse only this many examples: the first ``samples`` of a permutation drawn from a
            ``torch.Generator`` seeded with ``seed``, sorted (``subset_indices``).
        seed: seed of that permutation.
        image_size: ``imagefolder`` only: resize the shorter side to this and center-crop a square; None keeps
            the images as they are (they must then all have the same size).
        **kwargs: arguments of ``synthetic`` (``shape``, ``num_classes``, ``size``, ``data_seed``), of ``text``
            (``tokenizer``: a directory, ``seq_len``: tokens per sequence, default 128), of ``tokens``
            (``pad_id``) or of a ``module:function`` factory; other specs take none. With ``text`` and ``tokens``,
            ``samples`` counts sequences.

    Returns:
        A map-style dataset of (input, label) pairs.

    Raises:
        DatasetError: for an unknown spec, missing or malformed files, arguments a spec does not take, an
            invalid ``samples``, or a factory that fails or returns something other than a map-style dataset.
    """
    if not isinstance(spec, str) or not spec.strip():
        msg = f"expected a dataset spec such as {', '.join(available_datasets())}; got {spec!r}"
        raise DatasetError(msg)
    spec = spec.strip()
    name, has_colon, root = spec.partition(":")
    kind = name.lower()
    takes_kwargs = kind == "synthetic" or (has_colon and kind not in _ROOTED)
    if kwargs and not takes_kwargs:
        msg = f"dataset {spec!r} takes no extra arguments, got {', '.join(sorted(kwargs))}"
        raise DatasetError(msg)

    if kind == "digits" and not has_colon:
        images, labels = _digits_raw()
        indices = subset_indices(len(labels), samples, seed).numpy()
        mean, std = digits_normalization()
        inputs = torch.from_numpy(((images[indices] - mean) / std).astype(np.float32)).unsqueeze(1)
        return TensorDataset(inputs, torch.from_numpy(labels[indices]))
    if kind == "synthetic" and not has_colon:
        try:
            dataset: Dataset = synthetic_dataset(**kwargs)
        except TypeError as error:
            msg = f"synthetic takes shape, num_classes, size and data_seed; got {', '.join(sorted(kwargs))}"
            raise DatasetError(msg) from error
        return _subset(dataset, samples, seed)
    if kind in _ROOTED:
        if not root.strip():
            msg = f"dataset {kind!r} needs a root directory: expected '{kind}:ROOT', got {spec!r}"
            raise DatasetError(msg)
        if kind in ("cifar10", "cifar100", "mnist", "fashion-mnist"):
            if kind.startswith("cifar"):
                images_u8, labels_t = _cifar_raw(root, kind)
                mean, std = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
            else:
                images_u8, labels_t = _mnist_raw(root, kind)
                mean, std = (MNIST_MEAN, MNIST_STD) if kind == "mnist" else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
            index = subset_indices(len(labels_t), samples, seed)
            return TensorDataset(_normalise_uint8(images_u8[index], mean, std), labels_t[index])
        return _subset(_image_folder(root, image_size), samples, seed)
    if kind in ("text", "tokens") and has_colon:
        return _subset(_token_sequences(kind, root, kwargs), samples, seed)
    if has_colon:
        return _subset(_from_factory(spec, kwargs), samples, seed)
    msg = f"unknown dataset {spec!r}; expected one of {', '.join(available_datasets())}"
    raise DatasetError(msg)


_TEXT_ARGUMENTS = {"text": ("tokenizer", "seq_len"), "tokens": ("pad_id",)}


def _token_sequences(kind: str, file: str, kwargs: dict[str, Any]) -> Dataset:
    from hessspec.data import text

    if not file.strip():
        msg = f"dataset {kind!r} needs a file: expected '{kind}:FILE'"
        raise DatasetError(msg)
    unexpected = sorted(set(kwargs) - set(_TEXT_ARGUMENTS[kind]))
    if unexpected:
        msg = f"{kind}:FILE takes {', '.join(_TEXT_ARGUMENTS[kind])}; got {', '.join(unexpected)}"
        raise DatasetError(msg)
    try:
        if kind == "tokens":
            return text.tokens_dataset(file, **kwargs)
        if "tokenizer" not in kwargs:
            msg = "text:FILE needs a tokenizer: load the model with --model hf:DIR, or pass --data-arg tokenizer=DIR"
            raise DatasetError(msg)
        return text.text_dataset(file, **kwargs)
    except text.TextDataError as error:
        raise DatasetError(str(error)) from error


def _subset(dataset: Dataset, samples: int | None, seed: int) -> Dataset:
    if samples is None:
        return dataset
    indices = subset_indices(len(dataset), samples, seed)  # type: ignore[arg-type]
    if hasattr(dataset, "select"):  # text.TokenSequences: stays one pair of tensors
        return dataset.select(indices)
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _tensor_columns(dataset: Any) -> tuple[torch.Tensor, ...] | None:
    # Fast path: TensorDataset (possibly inside Subsets) is indexed as a whole instead of item by item.
    index: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        step = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        index = step if index is None else step[index]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and dataset.tensors:
        return tuple(t if index is None else t[index] for t in dataset.tensors)
    return None


def _as_tensor(value: Any, position: int, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
        return torch.as_tensor(value)
    msg = (
        f"dataset item {position}: expected {where} to be a tensor, array or number, got "
        f"{type(value).__module__}.{type(value).__qualname__} (add a ToTensor transform?)"
    )
    raise DatasetError(msg)


def _entries(item: Any, position: int) -> tuple[list[Any], list[Any]]:
    # (names, values) of an item: a mapping's keys, a tuple's positions, or a bare input as a 1-tuple.
    if is_mapping(item):
        keys = list(item.keys())
        return keys, [item[key] for key in keys]
    if isinstance(item, (tuple, list)):
        if not item:
            msg = f"dataset item {position}: expected (input, ...) or a mapping of tensors, got an empty sequence"
            raise DatasetError(msg)
        return list(range(len(item))), list(item)
    return [0], [item]


def _describe_entry(name: Any) -> str:
    return f"entry {name!r}" if isinstance(name, str) else ("the input" if name == 0 else f"element {name}")


def _stack_items(dataset: Any) -> tuple[Any, list[torch.Tensor]]:
    """Stack every item's entries: (the first item, as the structure to rebuild, and the stacked entries)."""
    size = len(dataset)
    if size < 1:
        msg = "cannot materialize an empty dataset"
        raise DatasetError(msg)
    first = dataset[0]
    names, _ = _entries(first, 0)
    columns: list[list[torch.Tensor]] = [[] for _ in names]
    for position in range(size):
        item = first if position == 0 else dataset[position]
        item_names, values = _entries(item, position)
        if item_names != names:
            msg = f"dataset item {position} has entries {item_names} but item 0 has {names}; all items must agree"
            raise DatasetError(msg)
        for name, value, column in zip(names, values, columns, strict=True):
            tensor = _as_tensor(value, position, _describe_entry(name))
            if column and tensor.shape != column[0].shape:
                what = "input" if name == 0 else _describe_entry(name)
                msg = (
                    f"dataset item {position} has {what} shape {list(tensor.shape)} but item 0 has "
                    f"{list(column[0].shape)}; all items must have the same shape"
                )
                raise DatasetError(msg)
            column.append(tensor)
    return first, [torch.stack(column) for column in columns]


def _rebuild_item(first: Any, values: Sequence[Any]) -> Any:
    if is_mapping(first):
        return dict(zip(first.keys(), values, strict=True))
    return tuple(values)


def materialize(
    dataset: Dataset, batch_size: int, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> list:
    """Stack a dataset into device-resident batches, once: what the Hessian operator iterates over.

    Items of any structure are stacked entry by entry: ``(input, target)`` pairs, tuples whose first element is
    the input (a bare input becomes a 1-tuple), or mappings of tensors (``dict``, ``BatchEncoding``, ...; batches are
    dicts). Which entry is a target, and whether it fits, is decided by the loss
    (:mod:`hessspec.curvature.losses`).

    Args:
        dataset: map-style dataset, in the order to keep.
        batch_size: examples per batch; the last batch holds the remainder and may be smaller.
        device: where the batches live (one transfer for the whole set).
        dtype: floating dtype of the floating entries (inputs, regression targets); integer entries (class labels,
            token ids, attention masks) stay integer.

    Returns:
        A list of batches with the items' structure, e.g. ``[(inputs [b, ...] dtype, labels [b] int64), ...]``, each
        entry a consecutive slice of one stacked tensor (views; they may share memory with a ``TensorDataset``
        already on ``device`` with ``dtype``).

    Raises:
        DatasetError: for a non-positive batch size, a non-floating dtype, an empty dataset, entries that are not
            tensors, arrays or numbers, items whose structure or entry shapes differ.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be an integer >= 1, got {batch_size!r}"
        raise DatasetError(msg)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        msg = f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}"
        raise DatasetError(msg)
    columns = _tensor_columns(dataset)
    if columns is not None:
        first: Any = columns
        stacked = list(columns)
    else:
        first, stacked = _stack_items(dataset)
    if len(stacked[0]) < 1:
        msg = "cannot materialize an empty dataset"
        raise DatasetError(msg)
    stacked = [move_batch(t, device, dtype) for t in stacked]
    pieces = [t.split(batch_size) for t in stacked]
    return [_rebuild_item(first, values) for values in zip(*pieces, strict=True)]
