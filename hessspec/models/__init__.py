"""The model zoo: build a network by name.

Names:
    ``mlp``, ``mlp-bn``: fully connected ReLU networks for the 8x8 digits (``hessspec.models.mlp.MLP``).
    ``cnn``, ``cnn-bn``: a two-convolution CNN for the 8x8 digits (``hessspec.models.mlp.SmallCNN``).
    ``cifar-resnet{20,32,44,56,110}`` and their ``-nobn`` variants: the CIFAR ResNets of He et al. (2016),
        with and without BatchNorm as compared by Ghorbani et al. (2019).
    ``tv:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``, never downloading weights.
    ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)`` (``hessspec.models.timm_models``).
    ``hf:DIR``: a Hugging Face model saved with ``save_pretrained``, loaded offline (``hessspec.models.hf``).
    ``module:function``: a user factory called with the keyword arguments; it must return an ``nn.Module``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hessspec.models._errors import ModelError, UnknownModelError
from hessspec.models.cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet
from hessspec.models.factory import FactoryError, load_factory
from hessspec.models.mlp import MLP, SmallCNN

__all__ = [
    "FactoryError",
    "ModelError",
    "UnknownModelError",
    "available_models",
    "build_model",
    "default_loss",
    "load_factory",
    "parse_model_args",
]


@dataclass(frozen=True)
class _ZooEntry:
    """A zoo model: the constructor, the arguments its name fixes, and a one-line description."""

    constructor: Callable[..., nn.Module]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def accepted_arguments(self) -> list[str]:
        parameters = inspect.signature(self.constructor).parameters
        return [name for name in parameters if name not in self.fixed]


def _zoo() -> dict[str, _ZooEntry]:
    zoo = {
        "mlp": _ZooEntry(MLP, {}, "ReLU MLP for flattened inputs (default 64 -> 6 layers of width 64 -> 10)"),
        "mlp-bn": _ZooEntry(MLP, {"batch_norm": True}, "the MLP with BatchNorm1d after each hidden layer"),
        "cnn": _ZooEntry(SmallCNN, {}, "two 3x3 convolutions (16, 32 channels) for 8x8 images"),
        "cnn-bn": _ZooEntry(SmallCNN, {"batch_norm": True}, "the same CNN with BatchNorm2d"),
    }
    for depth, blocks in CIFAR_RESNET_DEPTHS.items():
        zoo[f"cifar-resnet{depth}"] = _ZooEntry(
            CifarResNet, {"blocks_per_stage": blocks, "batch_norm": True}, f"CIFAR ResNet-{depth} with BN"
        )
        zoo[f"cifar-resnet{depth}-nobn"] = _ZooEntry(
            CifarResNet, {"blocks_per_stage": blocks, "batch_norm": False}, f"CIFAR ResNet-{depth} without BN"
        )
    return zoo


_ZOO = _zoo()


def available_models() -> list[str]:
    """Names of the built-in models, sorted (``tv:NAME`` and ``module:function`` are accepted too).

    Returns:
        The zoo names.
    """
    return sorted(_ZOO)


def describe_models() -> dict[str, str]:
    """One-line description of each zoo model, for help texts.

    Returns:
        Mapping name -> description, sorted by name.
    """
    return {name: _ZOO[name].description for name in sorted(_ZOO)}


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(_ZOO), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown model {name!r}{hint}; expected one of {', '.join(available_models())}, "
        "or 'tv:NAME' (torchvision), 'timm:NAME' (timm), 'hf:DIR' (a Hugging Face directory), or "
        "'module:function' for your own factory"
    )


def _build_zoo(name: str, kwargs: dict[str, Any]) -> nn.Module:
    entry = _ZOO[name]
    accepted = entry.accepted_arguments()
    unexpected = [key for key in kwargs if key not in accepted]
    if unexpected:
        fixed = [key for key in unexpected if key in entry.fixed]
        reason = f" ({', '.join(fixed)} is fixed by the name)" if fixed else ""
        msg = (
            f"model {name!r} does not accept argument(s) {', '.join(unexpected)}{reason}; "
            f"it accepts: {', '.join(accepted)}"
        )
        raise ModelError(msg)
    try:
        return entry.constructor(**entry.fixed, **kwargs)
    except (TypeError, ValueError) as error:
        msg = f"cannot build model {name!r} with {kwargs}: {error}"
        raise ModelError(msg) from error


def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision.models

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join('tv:' + c for c in close)}?)" if close else ""
        msg = (
            f"unknown torchvision model 'tv:{name}'{hint}; torchvision {torchvision.__version__} has "
            f"{len(known)} models, listed by torchvision.models.list_models()"
        )
        raise UnknownModelError(msg)
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            msg = f"tv:{name} is always built without pretrained weights (no downloads); drop {key}="
            raise ModelError(msg)
    builder = torchvision.models.get_model_builder(name)
    arguments = dict(kwargs)
    arguments["weights"] = None
    # Detection and segmentation builders default to downloading an ImageNet backbone.
    if "weights_backbone" in inspect.signature(builder).parameters:
        arguments["weights_backbone"] = None
    try:
        return builder(**arguments)
    except (TypeError, ValueError) as error:
        msg = f"cannot build tv:{name} with {kwargs}: {error}"
        raise ModelError(msg) from error


def _build_from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = load_factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as error:
        msg = f"model factory {spec!r} called with {kwargs} raised {type(error).__name__}: {error}"
        raise ModelError(msg) from error
    if not isinstance(model, nn.Module):
        msg = f"model factory {spec!r} must return a torch.nn.Module, got {type(model).__module__}."
        msg += f"{type(model).__qualname__}"
        raise ModelError(msg)
    return model


def build_model(name: str, *, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model (CPU, float32, train mode), or load a Hugging Face directory.

    Args:
        name: a zoo name (see ``available_models()``), ``"tv:NAME"``, ``"timm:NAME"``, ``"hf:DIR"`` or
            ``"module:function"``.
        dtype: the parameters' floating dtype (default float32); an ``hf:DIR`` model is loaded in it directly.
        **kwargs: constructor arguments, e.g. ``num_classes=100`` or ``width=32``; for ``hf:DIR`` only
            ``attn_implementation`` (``"eager"``, default, or ``"sdpa"``).

    Returns:
        The model (an ``hf:DIR`` model in eval mode, returning logits: see :mod:`hessspec.models.hf`).

    Raises:
        UnknownModelError: if the name is not known.
        ModelError: if the arguments are not accepted or a factory does not return an ``nn.Module``.
        FactoryError: if a ``module:function`` spec cannot be imported.
    """
    if not isinstance(name, str) or not name.strip():
        msg = f"expected a model name (a non-empty string), got {name!r}"
        raise UnknownModelError(msg)
    name = name.strip()
    if name.startswith("hf:"):
        from hessspec.models import hf

        return hf.load_model(name[len(hf.PREFIX) :], dtype=dtype or torch.float32, **kwargs)
    if name.startswith("tv:"):
        model = _build_torchvision(name[3:], kwargs)
    elif name.startswith("timm:"):
        from hessspec.models import timm_models

        model = timm_models.build(name[len(timm_models.PREFIX) :], kwargs)
    elif ":" in name:
        model = _build_from_factory(name, kwargs)
    elif name not in _ZOO:
        raise UnknownModelError(_unknown_model_message(name))
    else:
        model = _build_zoo(name, kwargs)
    return model if dtype is None else model.to(dtype)


def default_loss(model: nn.Module) -> str:
    """The loss a model is analysed with when none is given: its head's for a Hugging Face model, else cross-entropy.

    Args:
        model: a built model.

    Returns:
        A ``--loss`` name: ``"lm"``, ``"mse"`` or ``"cross-entropy"`` (see :func:`hessspec.models.hf.default_loss`).

    Raises:
        ModelError: a Hugging Face head without a default (e.g. multi-label classification).
    """
    from hessspec.models import hf

    return hf.default_loss(model) if hf.is_adapted(model) else "cross-entropy"


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (as given to ``--model-arg``) into keyword arguments.

    Values become int, float, bool (``true``/``false``), None (``none``/``null``), any case, or else stay str.

    Args:
        pairs: e.g. ``["width=32", "batch_norm=true", "activation=tanh"]``.

    Returns:
        The keyword arguments, in the given order.

    Raises:
        ValueError: for a pair without ``=``, a key that is not a Python identifier, or a repeated key.
    """
    arguments: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            msg = f"expected KEY=VALUE, got {pair!r}"
            raise ValueError(msg)
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            msg = f"expected KEY=VALUE with KEY a Python identifier, got key {key!r} in {pair!r}"
            raise ValueError(msg)
        if key in arguments:
            msg = f"argument {key!r} given twice ({pair!r})"
            raise ValueError(msg)
        arguments[key] = _parse_value(value)
    return arguments
