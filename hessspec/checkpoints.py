"""Safe loading of training checkpoints: state dicts from torch, Lightning and safetensors files, and Hugging Face
``save_pretrained`` directories (``hessspec.checkpoint_dirs``).

``torch.load`` runs with ``weights_only=True`` unless the caller explicitly opts out (``--unsafe-load``): a
pickle that needs arbitrary code is refused with a message naming the offending global.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessspec.checkpoint_dirs import FORMAT as DIRECTORY_FORMAT
from hessspec.checkpoint_dirs import is_model_directory, read_directory

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
STEP_KEYS = ("step", "global_step", "epoch")
NESTED_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "net")
# Wrappers whose attribute name prefixes every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
UNSAFE_OPTION = "--unsafe-load"
_SHOWN_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, trusted or applied to the model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A state dict read from a checkpoint file.

    Attributes:
        state_dict: parameter and buffer tensors on the CPU, keys without wrapper prefixes.
        step: training step stored in the file (``step``, ``global_step`` or ``epoch``), or None.
        path: the file it came from.
        sha256: hex digest of the file's bytes.
        format: ``"torch"``, ``"torch-module"`` (a pickled ``nn.Module``, unsafe load only), ``"lightning"``,
            ``"safetensors"`` or ``"hf-directory"``.
        dropped_keys: keys of the state dict whose values were not tensors and were dropped.
    """

    state_dict: dict[str, torch.Tensor]
    step: int | None
    path: str
    sha256: str
    format: str
    dropped_keys: tuple[str, ...] = ()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks.

    Args:
        path: the file.

    Returns:
        The digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message[message.index(marker) + len(marker) :]
    text = message.strip().splitlines()
    line = text[0].strip() if text else ""
    line = line.split(". ")[0]
    if len(line) > 160:
        line = line[:157] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _forbidden_global(message: str) -> str | None:
    # torch's messages: "... WeightsUnpickler error: Unsupported global: GLOBAL __main__.Foo was not an allowed
    # global by default ...", and for blocked modules "Trying to load unsupported GLOBAL posix.system whose module
    # posix is blocked".
    match = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", message, flags=re.IGNORECASE)
    if match:
        return match.group(1)
    if "not an allowed global" in message or "unsupported global" in message.lower():
        return ""
    return None


def _safe_globals() -> list[Any]:
    """Types that training scripts put into checkpoints and that rebuild without running code.

    NumPy scalars, arrays and dtypes (``np.float64(0.1)`` learning rates, metric arrays), ``argparse.Namespace``
    (the run's arguments), ``pathlib`` paths and ``datetime`` values. Each rebuilds from plain data: a constructor or
    ``numpy``'s array reconstruction called with bytes, numbers and strings, the object's state set as a dict; the
    contents go through the same restricted unpickler. NumPy 1 wrote ``numpy.core.multiarray.*``, NumPy 2 writes
    ``numpy._core.multiarray.*``: both names are allowed. Anything else (``os.system``, ``subprocess``, classes
    with custom reductions) stays refused by ``weights_only=True``.
    """
    import argparse
    import datetime
    import pathlib

    import numpy as np

    allowed: list[Any] = [
        argparse.Namespace,
        pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath,
        datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone,
        np.ndarray, np.dtype,
    ]  # fmt: skip
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # noqa: NPY201 (numpy 1)
    for name in ("scalar", "_reconstruct"):
        function = getattr(core, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2 = b"\x80"


def _looks_like_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive; the legacy format (_use_new_zipfile_serialization=False) a pickle of
    # protocol 2 or higher, which starts with the PROTO opcode.
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(_TORCH_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_2)


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _torch_load(path: Path, unsafe: bool) -> Any:
    try:
        if unsafe:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        offending = _forbidden_global(str(error))
        if offending is not None and not unsafe:
            what = f"the global {offending!r}" if offending else "a global"
            msg = (
                f"checkpoint {str(path)!r} asks for {what}: loading it would execute code (refused; "
                f"torch.load(weights_only=True)); if you trust this file, load it with {UNSAFE_OPTION}"
            )
            raise CheckpointError(msg) from error
        if not _looks_like_torch_file(path):
            raise CheckpointError(_not_a_checkpoint(path)) from error
        msg = f"checkpoint {str(path)!r} is not a readable PyTorch file (truncated or corrupt?): {_first_line(error)}"
        raise CheckpointError(msg) from error
    except Exception as error:
        # torch raises RuntimeError, EOFError, KeyError, ... for damaged files, and anything at all when unsafe.
        if not _looks_like_torch_file(path):
            raise CheckpointError(_not_a_checkpoint(path)) from error
        kind = "could not be unpickled" if unsafe else "is not a readable PyTorch file (truncated or corrupt?)"
        msg = f"checkpoint {str(path)!r} {kind}: {_first_line(error)}"
        raise CheckpointError(msg) from error


def _not_a_checkpoint(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(24)
    shown = head.decode("utf-8", "replace").split("\n")[0] if head else ""
    return (
        f"checkpoint {str(path)!r} is not a checkpoint file of any supported format (a torch.save zip or pickle, "
        f"a Lightning .ckpt, safetensors); it starts with {shown!r}"
    )


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        msg = f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {error}"
        raise CheckpointError(msg) from error


def _as_step(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() and not float(value).is_integer():
            return None
        value = int(value.item())
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 0:
        return value
    return None


def _step_from_mapping(mapping: Mapping[Any, Any]) -> int | None:
    for key in STEP_KEYS:
        if key in mapping:
            step = _as_step(mapping[key])
            if step is not None:
                return step
    return None


def _strip_common_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items()}


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) and len(key) > len(prefix) for key in state_dict):
                state_dict = _strip_common_prefix(state_dict, prefix)
                changed = True
    return state_dict


def _strip_lightning_attribute(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A LightningModule holding the network as `self.model` (or `self.net`, ...) saves "model.<key>".
    heads = {key.split(".", 1)[0] for key in state_dict if "." in key}
    if len(heads) == 1 and all("." in key for key in state_dict):
        return _strip_common_prefix(state_dict, heads.pop() + ".")
    return state_dict


def _tensors_only(
    path: Path, candidate: Mapping[Any, Any], top_level: Mapping[Any, Any] | None
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    tensors = {str(key): value for key, value in candidate.items() if isinstance(value, torch.Tensor)}
    dropped = tuple(str(key) for key, value in candidate.items() if not isinstance(value, torch.Tensor))
    if not tensors:
        keys = list((top_level if top_level is not None else candidate).keys())
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        msg = (
            f"checkpoint {str(path)!r} holds no tensors where a state dict was expected (a mapping of names to "
            f"tensors, possibly under one of {', '.join(NESTED_STATE_DICT_KEYS)}); its top-level keys: "
            f"{shown or 'none'}"
        )
        raise CheckpointError(msg)
    return tensors, dropped


def _extract(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], tuple[str, ...], int | None, str]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), (), None, "torch-module"
    if not isinstance(obj, Mapping):
        msg = (
            f"checkpoint {str(path)!r} holds a {type(obj).__module__}.{type(obj).__qualname__}; expected a state "
            "dict (a mapping of names to tensors) or a dict containing one"
        )
        raise CheckpointError(msg)
    step = _step_from_mapping(obj)
    if "pytorch-lightning_version" in obj and isinstance(obj.get("state_dict"), Mapping):
        tensors, dropped = _tensors_only(path, obj["state_dict"], obj)
        return _strip_lightning_attribute(tensors), dropped, step, "lightning"
    for key in NESTED_STATE_DICT_KEYS:
        nested = obj.get(key)
        if isinstance(nested, nn.Module):
            return dict(nested.state_dict()), (), step, "torch-module"
        if isinstance(nested, Mapping):
            tensors, dropped = _tensors_only(path, nested, obj)
            return tensors, dropped, step, "torch"
    tensors, dropped = _tensors_only(path, obj, None)
    return tensors, dropped, step, "torch"


def load_checkpoint(path: str | Path, *, unsafe: bool = False) -> LoadedCheckpoint:
    """Read the model state dict from a checkpoint file.

    Accepted: a raw state dict; a dict holding it under ``model``, ``state_dict``, ``model_state_dict`` or
    ``net``; a PyTorch Lightning checkpoint (the LightningModule's attribute prefix, e.g. ``model.``, is
    stripped when every key has it); a ``.safetensors`` file (its metadata may carry ``step``). ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes shared by all keys are stripped. Values that
    are not tensors are dropped (listed in ``dropped_keys``).

    Args:
        path: the checkpoint file.
        unsafe: load with ``torch.load(weights_only=False)``, which can execute code from the file; only for
            trusted files (the CLI's ``--unsafe-load``).

    Returns:
        The state dict with its step, path, SHA-256 and format.

    Raises:
        CheckpointError: if the file is missing, empty, truncated or corrupt, needs code execution to load
            while ``unsafe`` is False, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        msg = f"checkpoint {str(path)!r} does not exist"
        raise CheckpointError(msg)
    if is_model_directory(path):
        return _load_model_directory(path)
    if not path.is_file():
        msg = f"checkpoint {str(path)!r} is not a file"
        raise CheckpointError(msg)
    if path.stat().st_size == 0:
        msg = f"checkpoint {str(path)!r} is empty (0 bytes)"
        raise CheckpointError(msg)
    sha256 = file_sha256(path)
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        tensors, metadata = _safetensors_load(path)
        tensors, dropped = _tensors_only(path, tensors, None)
        step = _step_from_mapping(metadata)
        fmt = "safetensors"
    else:
        tensors, dropped, step, fmt = _extract(path, _torch_load(path, unsafe))
    return LoadedCheckpoint(
        state_dict=_strip_wrappers(tensors),
        step=step,
        path=str(path),
        sha256=sha256,
        format=fmt,
        dropped_keys=dropped,
    )


def _load_model_directory(path: Path) -> LoadedCheckpoint:
    try:
        state, step, sha256 = read_directory(path)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    except Exception as error:
        # A damaged weight file raises anything from SafetensorError to UnpicklingError.
        msg = f"checkpoint {str(path)!r} cannot be read: {_first_line(error)}"
        raise CheckpointError(msg) from error
    tensors, dropped = _tensors_only(path, state, None)
    return LoadedCheckpoint(_strip_wrappers(tensors), step, str(path), sha256, DIRECTORY_FORMAT, dropped)


def _checkpoint_stem(path: str | Path) -> str:
    name = Path(path).name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in CHECKPOINT_SUFFIXES else name


def step_from_filename(path: str | Path) -> int | None:
    """The training step written in a checkpoint's file name.

    The number after ``step`` (``step=1200.ckpt``, ``epoch3-step450.pt``, ``global_step_80.pt``) if there is
    one, else the last number (``ckpt_000300.pt`` -> 300). Beware names with other numbers in them
    (``resnet32.pt`` -> 32); a step stored inside the checkpoint takes precedence (``resolve_step``).

    Args:
        path: the checkpoint path; only its name is used.

    Returns:
        The step, or None when the name has no digits.
    """
    stem = _checkpoint_stem(path)
    tagged = re.findall(r"step[s]?[_=\-]?(\d+)", stem, flags=re.IGNORECASE)
    if tagged:
        return int(tagged[-1])
    numbers = re.findall(r"\d+", stem)
    return int(numbers[-1]) if numbers else None


def resolve_step(loaded: LoadedCheckpoint, path: str | Path | None = None, explicit: int | None = None) -> int:
    """The step of a checkpoint: stored in the file, else from its name, else ``explicit`` (``--step``).

    Args:
        loaded: the loaded checkpoint.
        path: the file name to read a step from (defaults to ``loaded.path``).
        explicit: the step given by the user, used when neither the file nor its name has one.

    Returns:
        The step.

    Raises:
        CheckpointError: if no step can be found, or ``explicit`` is not a non-negative int.
    """
    if explicit is not None and (isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 0):
        msg = f"explicit step must be a non-negative integer, got {explicit!r}"
        raise CheckpointError(msg)
    if loaded.step is not None:
        return loaded.step
    from_name = step_from_filename(path if path is not None else loaded.path)
    if from_name is not None:
        return from_name
    if explicit is not None:
        return explicit
    source = str(path if path is not None else loaded.path)
    msg = (
        f"cannot tell the training step of checkpoint {source!r}: the file stores no step/global_step/epoch "
        "and its name has no number; pass --step"
    )
    raise CheckpointError(msg)


def _has_glob_magic(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def expand_checkpoint_paths(specs: Sequence[str | Path]) -> list[Path]:
    """Expand files, directories and globs into checkpoint paths, deduplicated, in the order found.

    A Hugging Face ``save_pretrained`` directory (``config.json`` and weights, e.g. the Trainer's
    ``checkpoint-500/``) is one checkpoint. Another directory contributes its files with a checkpoint suffix
    (``.pt .pth .ckpt .bin .safetensors``) and its ``save_pretrained`` sub-directories, non-recursively, sorted by
    name; a glob contributes the files and ``save_pretrained`` directories it matches, sorted by name. Sort by step
    after loading, or with ``sort_by_step``.

    Args:
        specs: file paths, directories or glob patterns (``~`` is expanded).

    Returns:
        The paths, each once (compared after resolving).

    Raises:
        CheckpointError: if ``specs`` is empty or a spec matches no checkpoint file.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if not specs:
        msg = "expected at least one checkpoint file, directory or glob, got none"
        raise CheckpointError(msg)
    found: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        text = os.path.expanduser(str(spec))
        path = Path(text)
        if path.is_file() or is_model_directory(path):
            matches = [path]
        elif path.is_dir():
            matches = sorted(
                child
                for child in path.iterdir()
                if (child.is_file() and child.suffix.lower() in CHECKPOINT_SUFFIXES) or is_model_directory(child)
            )
            if not matches:
                msg = (
                    f"directory {text!r} contains no checkpoint files (expected names ending in "
                    f"{' '.join(CHECKPOINT_SUFFIXES)}, or save_pretrained directories)"
                )
                raise CheckpointError(msg)
        elif _has_glob_magic(text):
            matches = sorted(
                Path(match) for match in glob.glob(text) if Path(match).is_file() or is_model_directory(match)
            )
            if not matches:
                msg = f"checkpoint pattern {text!r} matches no files"
                raise CheckpointError(msg)
        else:
            msg = f"checkpoint {text!r} does not exist (expected a file, a directory or a glob pattern)"
            raise CheckpointError(msg)
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                found.append(match)
    return found


def sort_by_step(paths: Iterable[str | Path]) -> list[Path]:
    """Sort checkpoint paths by the step in their file names (``step_from_filename``).

    Paths with a step come first, ascending (ties by name); paths without one follow, by name.

    Args:
        paths: checkpoint paths.

    Returns:
        The sorted paths.
    """

    def key(path: Path) -> tuple[int, int, str]:
        step = step_from_filename(path)
        return (0, step, str(path)) if step is not None else (1, 0, str(path))

    return sorted((Path(p) for p in paths), key=key)


def _shown(keys: Sequence[str]) -> str:
    text = ", ".join(repr(key) for key in keys[:_SHOWN_KEYS])
    return text + (f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _prefix_hint(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    # A checkpoint saved from a wrapper (e.g. a LightningModule with two children) keeps a prefix we do not
    # strip automatically; point at it.
    for checkpoint_key in unexpected:
        for model_key in missing:
            if checkpoint_key.endswith("." + model_key):
                prefix = checkpoint_key[: -len(model_key)]
                return f"; the checkpoint keys look prefixed with {prefix!r}"
            if model_key.endswith("." + checkpoint_key):
                prefix = model_key[: -len(checkpoint_key)]
                return f"; the model keys have a prefix {prefix!r} that the checkpoint lacks"
    return ""


def _with_tied_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    # A parameter shared under several names (a language model's output layer tied to its input embedding) is saved
    # once by save_pretrained and safetensors' save_model; the other names take the saved tensor.
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    missing = {}
    for names in aliases.values():
        present = [name for name in names if name in state_dict]
        if present:
            missing.update({name: state_dict[present[0]] for name in names if name not in state_dict})
    return {**state_dict, **missing} if missing else state_dict


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict into a model strictly, after checking keys, shapes and finiteness.

    Nothing is written to the model unless every check passes. A parameter the model shares under several names
    (tied weights) may be given under any one of them.

    Args:
        model: the model, modified in place.
        state_dict: parameter and buffer tensors by name.

    Raises:
        CheckpointError: naming the first few missing or unexpected keys, the keys whose shapes differ (with
            both shapes), or the first tensor holding NaN or Inf.
    """
    state_dict = _with_tied_weights(model, state_dict)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{_count(len(missing), 'key')} missing from the checkpoint: {_shown(missing)}")
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'key')} in the checkpoint not in the model: {_shown(unexpected)}")
        msg = (
            f"checkpoint does not match the model ({type(model).__name__}): {'; '.join(parts)}"
            f"{_prefix_hint(missing, unexpected)}"
        )
        raise CheckpointError(msg)
    mismatched = [
        f"{key!r}: checkpoint {list(state_dict[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:_SHOWN_KEYS])
        more = f" (and {len(mismatched) - _SHOWN_KEYS} more)" if len(mismatched) > _SHOWN_KEYS else ""
        msg = f"checkpoint does not match the model ({type(model).__name__}): shape mismatch for {shown}{more}"
        raise CheckpointError(msg)
    for key, tensor in state_dict.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            msg = (
                f"checkpoint tensor {key!r} has {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}; "
                "the training run probably diverged before this checkpoint"
            )
            raise CheckpointError(msg)
    model.load_state_dict(state_dict, strict=True)
