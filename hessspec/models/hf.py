"""Hugging Face model directories (``--model hf:DIR``): a model saved with ``save_pretrained``, loaded offline.

The directory holds ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``). The class is the first entry of the config's
``architectures``, taken from the installed transformers (the config is read by ``AutoConfig`` with
``trust_remote_code=False``): code shipped with a model directory is never run, and nothing is downloaded
(``local_files_only=True``, ``HF_HUB_OFFLINE=1``).

The loaded model is adapted for the analysis, in place and in one place (:func:`adapt_for_analysis`):

- its forward returns the logits tensor (``output.logits``), so the loss is computed by hessspec from the logits in
  the analysis dtype. transformers' own ``.loss`` is never used: it casts the logits to float32 even for a float64
  model (DESIGN.md, "Pitfalls"), and a ``labels`` entry of a batch is therefore not passed to the model;
- ``use_cache=False`` (no key/value cache is built) and eval mode (dropout off);
- attention runs through an exact, twice-differentiable path: ``attn_implementation="eager"`` by default, or
  ``"sdpa"`` (``--model-arg attn_implementation=sdpa``), which hessspec evaluates under the MATH kernel. Fused
  kernels (flash, memory-efficient) have no double backward.

The task head decides the default loss (:func:`default_loss`): causal LM -> ``lm``; sequence, token or image
classification -> ``cross-entropy``; a sequence-classification head with ``num_labels=1`` or
``problem_type="regression"`` -> ``mse``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessspec.models._errors import ModelError
from hessspec.models._extras import import_extra

PREFIX = "hf:"
CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_ATTENTION = "eager"
ACCEPTED_ARGUMENTS = ("attn_implementation",)

# transformers' task mappings (transformers.models.auto.modeling_auto) -> the task names used here.
_TASK_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}
_ADAPTED = "_hessspec_adapted"


def is_model_directory(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_pretrained``: ``config.json`` and a weights file.

    Args:
        path: any path.

    Returns:
        True for such a directory.
    """
    directory = Path(path).expanduser()
    return (directory / CONFIG_FILE).is_file() and any((directory / name).is_file() for name in WEIGHT_FILES)


def _transformers(what: str = "--model hf:DIR") -> Any:
    return import_extra("transformers", what, ModelError)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning log lines and progress bars (restored on exit)."""
    transformers = _transformers()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model directory, checked for what hessspec needs.

    Args:
        directory: the ``save_pretrained`` directory.

    Returns:
        The config as a dict.

    Raises:
        ModelError: the directory or its config is missing or unreadable, it names no architecture, or it needs
            code from the directory (``auto_map``).
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        msg = f"hf:{directory} {what}; expected a directory written by save_pretrained (config.json + weights)"
        raise ModelError(msg)
    file = path / CONFIG_FILE
    if not file.is_file():
        msg = f"hf:{directory} has no {CONFIG_FILE}; expected a directory written by save_pretrained"
        raise ModelError(msg)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        msg = f"{str(file)!r} is not a readable JSON config: {error}"
        raise ModelError(msg) from error
    if not isinstance(config, dict):
        msg = f"{str(file)!r} must hold a JSON object, got {type(config).__name__}"
        raise ModelError(msg)
    if config.get("auto_map"):
        msg = (
            f"hf:{directory} needs custom code shipped with the model (auto_map in {CONFIG_FILE}); hessspec never "
            "runs code from a model directory: build the model in a --model-factory MODULE:FUNCTION instead"
        )
        raise ModelError(msg)
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        msg = (
            f"{str(file)!r} names no model class ('architectures' is {architectures!r}); save the model with "
            "model.save_pretrained(DIR), which records it"
        )
        raise ModelError(msg)
    return config


def _model_class(name: str, directory: str | Path) -> type:
    transformers = _transformers()
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        msg = (
            f"hf:{directory} is a {name!r}, which transformers {transformers.__version__} does not provide (custom "
            "code is never run; a newer transformers may have it)"
        )
        raise ModelError(msg)
    return cls


def task_of(model_or_class: nn.Module | type) -> str | None:
    """The task of a transformers model class, from transformers' auto-class mappings.

    Args:
        model_or_class: a transformers model or model class.

    Returns:
        ``"causal-lm"``, ``"sequence-classification"``, ``"token-classification"``, ``"image-classification"``,
        ``"masked-lm"``, or None (a base model or another head).
    """
    from transformers.models.auto import modeling_auto

    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for task, mapping_name in _TASK_MAPPINGS.items():
        names: set[str] = set()
        for value in getattr(modeling_auto, mapping_name, {}).values():
            names.update((value,) if isinstance(value, str) else value)
        if cls.__name__ in names:
            return task
    if cls.__name__.endswith("LMHeadModel") and "Seq2Seq" not in cls.__name__:
        return "causal-lm"
    return None


def default_loss(model: nn.Module) -> str:
    """The loss a transformers model's head is trained with, as a ``--loss`` name.

    Args:
        model: a transformers model.

    Returns:
        ``"lm"`` (causal LM), ``"mse"`` (sequence-classification head doing regression: ``problem_type`` is
        ``"regression"``, or ``num_labels`` is 1 and no ``problem_type`` is set, as transformers decides), or
        ``"cross-entropy"`` (sequence, token and image classification).

    Raises:
        ModelError: a head without a default here (multi-label classification, a base model, masked LM, ...).
    """
    task = task_of(model)
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", None)
    name = type(model).__name__
    if task == "causal-lm":
        return "lm"
    if task == "sequence-classification":
        if problem_type == "regression" or (problem_type is None and num_labels == 1):
            return "mse"
        if problem_type in (None, "single_label_classification"):
            return "cross-entropy"
        msg = f"{name} has problem_type {problem_type!r}, for which hessspec has no loss; pass --loss-factory"
        raise ModelError(msg)
    if task in ("token-classification", "image-classification"):
        return "cross-entropy"
    msg = f"{name} ({task or 'no task head'}) has no default loss here; pass --loss or --loss-factory"
    raise ModelError(msg)


def _drop_labels(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    # The loss reads the targets from the batch; given `labels`, transformers would also compute its own (float32)
    # loss on every forward pass.
    if "labels" in kwargs:
        kwargs = {key: value for key, value in kwargs.items() if key != "labels"}
    return args, kwargs


def _logits(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        msg = f"{type(_module).__name__} returned {type(output).__name__} without logits; hessspec needs a tensor"
        raise ModelError(msg)
    return logits


def adapt_for_analysis(model: nn.Module) -> nn.Module:
    """Make a transformers model return its logits, without cache, labels or dropout (in place, once).

    Forward hooks do it, so parameter names, the class and ``save_pretrained`` stay the model's own.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        The same model, in eval mode.
    """
    if not getattr(model, _ADAPTED, False):
        model.register_forward_pre_hook(_drop_labels, with_kwargs=True)
        model.register_forward_hook(_logits)
        setattr(model, _ADAPTED, True)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return model.eval()


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` was loaded by :func:`load_model` (or adapted by :func:`adapt_for_analysis`)."""
    return bool(getattr(model, _ADAPTED, False))


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a transformers model runs (``"eager"``, ``"sdpa"``), or None if unknown."""
    config = getattr(model, "config", None)
    value = getattr(config, "_attn_implementation", None)
    return value if isinstance(value, str) else None


def check_token_ids(model: nn.Module, largest_id: int, length: int) -> None:
    """Check that token ids and sequence lengths fit a transformers model's embeddings, before the first product.

    Args:
        model: a transformers model.
        largest_id: the largest token id in the data.
        length: the longest sequence in the data (tokens).

    Raises:
        ModelError: an id beyond the vocabulary (data tokenised for another model?) or sequences longer than the
            model's position embeddings (naming ``--data-arg seq_len``).
    """
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and largest_id >= vocab_size:
        msg = (
            f"the data holds token id {largest_id} but the model's vocabulary has {vocab_size} tokens (ids 0.."
            f"{vocab_size - 1}); tokenise with this model's tokenizer"
        )
        raise ModelError(msg)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        msg = (
            f"the data holds sequences of {length} tokens but {type(model).__name__} has {positions} positions; "
            f"pass --data-arg seq_len={positions} or less"
        )
        raise ModelError(msg)


def check_arguments(directory: str, kwargs: dict[str, Any]) -> str:
    """Validate the ``--model-arg`` of ``hf:DIR`` and return the attention implementation to use.

    Raises:
        ModelError: an argument other than ``attn_implementation``, or a value other than eager/sdpa.
    """
    unexpected = [key for key in kwargs if key not in ACCEPTED_ARGUMENTS]
    if unexpected:
        msg = (
            f"hf:{directory} does not accept argument(s) {', '.join(unexpected)} (the architecture comes from its "
            f"{CONFIG_FILE}); it accepts: {', '.join(ACCEPTED_ARGUMENTS)}"
        )
        raise ModelError(msg)
    attention = kwargs.get("attn_implementation", DEFAULT_ATTENTION)
    if attention not in ATTENTION_IMPLEMENTATIONS:
        msg = (
            f"attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)} (exact, twice "
            f"differentiable paths), got {attention!r}"
        )
        raise ModelError(msg)
    return attention


def load_model(directory: str, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """Load a ``save_pretrained`` directory offline and adapt it for the analysis (see the module docstring).

    Args:
        directory: the directory (``~`` expanded).
        dtype: the parameters' dtype (weights stored in another floating dtype are converted).
        **kwargs: ``attn_implementation`` (``"eager"``, default, or ``"sdpa"``).

    Returns:
        The model in eval mode, returning logits.

    Raises:
        ModelError: transformers is not installed, the directory or config is missing or invalid, the model needs
            remote code, its class is unknown, the weights are missing or do not fit the class.
    """
    attention = check_arguments(directory, kwargs)
    config_dict = read_config(directory)
    path = str(Path(directory).expanduser())
    transformers = _transformers()
    if not is_model_directory(path):
        msg = f"hf:{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)} beside {CONFIG_FILE}"
        raise ModelError(msg)
    cls = _model_class(config_dict["architectures"][0], directory)
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model, info = cls.from_pretrained(
                path,
                config=config,
                local_files_only=True,
                dtype=dtype,
                attn_implementation=attention,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below with the names, then refused
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as error:
            first = " ".join(str(error).split())[:300]
            msg = f"cannot load hf:{directory} as {cls.__name__}: {type(error).__name__}: {first}"
            raise ModelError(msg) from error
    problems = {key: list(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        shown = "; ".join(f"{key.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" for key, v in problems.items() if v)
        msg = f"the weights in hf:{directory} do not fit {cls.__name__} ({shown})"
        raise ModelError(msg)
    return adapt_for_analysis(model)
