"""What to analyse, as a user names it: :class:`AnalysisJob`, and the parsing of its device, dtype and parameter
pattern (:func:`resolve_device`, :func:`parse_dtype`, :func:`parameter_filter`). :mod:`~hessspec.runner.pipeline` runs
jobs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hessspec.analysis import AnalysisSettings

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DEFAULT_BATCH_SIZE = 128  # the training batch size of the digits examples; BN train mode should use the training one
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class PipelineError(ValueError):
    """The job cannot run as specified (device, dtype, data that does not fit the model, ...)."""


@dataclass(frozen=True)
class AnalysisJob:
    """What to analyse and how: the model, the data and the settings, as a user names them.

    Attributes:
        model: a zoo name, ``tv:NAME``, ``timm:NAME``, ``hf:DIR`` or ``module:function`` (see
            :func:`hessspec.models.build_model`).
        data: a dataset spec such as ``digits`` or ``cifar10:ROOT`` (see :func:`hessspec.data.datasets.load_dataset`).
        model_args: keyword arguments of the model. For a zoo or timm model ``num_classes`` defaults to the
            dataset's; for ``hf:`` and ``timm:`` models ``attn_implementation`` defaults to ``"eager"``.
        data_args: keyword arguments of ``synthetic`` or a data factory.
        samples: analyse this many examples (a seeded subset, see ``--samples``), or None for all.
        batch_size: examples per batch (BN train mode normalises with each batch's statistics: use the training
            batch size).
        bn_mode: "train", "eval" or "population" (see :mod:`hessspec.curvature.problem`).
        dtype: "float32", "float64" or "bfloat16", the dtype the model is evaluated in (products are accumulated
            and Lanczos runs in float64 whatever it is).
        device: "auto" (CUDA if available, else the CPU), "cpu", "cuda", "cuda:I" or "mps".
        params: a regular expression; only parameters whose names it matches (``re.search``) span the Hessian.
            None for all parameters that require gradients.
        loss: "cross-entropy", "mse", "nll" or "lm" (see :mod:`hessspec.curvature.losses`), or None for the model's
            default: its head's for a Hugging Face model (resolved when the model is built), else cross-entropy.
        loss_factory: ``module:function`` or ``FILE.py:function`` of a loss ``f(output, batch) -> scalar`` (the
            batch's mean over examples), instead of ``loss``.
        block_strategy: how the operator evaluates a block of probes ("auto", "traced", "vmap", "loop" or
            "reverse"; see :class:`~hessspec.curvature.hessian.HessianOperator`). It changes rounding only, so
            resuming ignores it.
        primal_cache: under "traced", the memory kept for the primal results of every batch across passes:
            "auto", "off" or a number of bytes (see :mod:`hessspec.curvature.primal_cache`). It changes no number,
            so resuming ignores it.
        compile: evaluate the per-batch products through ``torch.compile`` (see
            :mod:`hessspec.curvature.compiled`). It changes rounding only, so resuming ignores it.
        data_placement: where the data live between passes: "auto", "device", "host" or "stream" (see
            :mod:`hessspec.data.placement`). It changes no number, so resuming ignores it.
        workers: loader worker processes of the "stream" placement.
        tf32: allow TensorFloat-32 matrix products and convolutions on CUDA (``torch.backends``; no effect on the
            CPU) when the model is evaluated in float32.
        settings: the SLQ settings (seed, Lanczos steps, probes, the curvatures and parameter blocks analysed,
            ...); ``settings.seed`` also draws the ``samples`` subset.
        label: the run's name in the result file; None keeps the file's label (a new file gets its own stem).
    """

    model: str
    data: str
    model_args: Mapping[str, Any] = field(default_factory=dict)
    data_args: Mapping[str, Any] = field(default_factory=dict)
    samples: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    bn_mode: str = "train"
    dtype: str = "float32"
    device: str = "auto"
    params: str | None = None
    block_strategy: str = "auto"
    primal_cache: int | str = "auto"
    compile: bool = False
    loss: str | None = None
    loss_factory: str | None = None
    data_placement: str = "auto"
    workers: int = 2
    tf32: bool = False
    settings: AnalysisSettings = field(default_factory=AnalysisSettings)
    label: str | None = None

    def effective_model_args(self) -> dict[str, Any]:
        """The model's keyword arguments, with the defaults that depend on the data or on the model kind.

        Returns:
            ``model_args`` plus ``num_classes`` when the model is a zoo or ``timm:`` model, the user did not give
            it, and the dataset's number of classes is known (``datasets.NUM_CLASSES``, or ``num_classes`` of
            ``synthetic``); plus ``attn_implementation="eager"`` for ``hf:`` and ``timm:`` models unless given,
            so the attention path is recorded with the results.
        """
        from hessspec.data.datasets import NUM_CLASSES
        from hessspec.models import available_models

        arguments = dict(self.model_args)
        model = self.model.strip()
        if model.startswith(("hf:", "timm:")):
            arguments.setdefault("attn_implementation", "eager")
        gets_classes = model in available_models() or model.startswith("timm:")
        if "num_classes" in arguments or not gets_classes:
            return arguments
        kind = self.data.strip().partition(":")[0].lower()
        if kind == "synthetic" and ":" not in self.data:
            classes = self.data_args.get("num_classes", 10)
        else:
            classes = NUM_CLASSES.get(kind)
        if classes is not None:
            arguments["num_classes"] = classes
        return arguments

    def effective_data_args(self) -> dict[str, Any]:
        """The dataset's keyword arguments, with the tokenizer of an ``hf:DIR`` model for ``text:FILE`` data.

        Returns:
            ``data_args`` plus ``tokenizer=DIR`` when the data is ``text:FILE``, the model is ``hf:DIR`` and the
            user gave no tokenizer. (Not part of :meth:`config`: the model's directory is recorded already.)
        """
        arguments = dict(self.data_args)
        model = self.model.strip()
        if self.data.strip().lower().startswith("text:") and model.startswith("hf:"):
            arguments.setdefault("tokenizer", model[len("hf:") :])
        return arguments

    def loss_label(self) -> str | None:
        """The loss as recorded in the config: a canonical name, ``factory:SPEC``, or None while a Hugging Face
        model's default is not yet resolved (see :func:`hessspec.runner.pipeline.prepare`).

        Raises:
            PipelineError: both ``loss`` and ``loss_factory``, or an unknown loss name.
        """
        from hessspec.curvature.losses import LossError, loss_name

        if self.loss is not None and self.loss_factory is not None:
            msg = f"give --loss or --loss-factory, not both (got {self.loss!r} and {self.loss_factory!r})"
            raise PipelineError(msg)
        if self.loss_factory is not None:
            return f"factory:{self.loss_factory.strip()}"
        if self.loss is not None:
            try:
                return loss_name(self.loss)
            except LossError as error:
                raise PipelineError(str(error)) from None
        return None if self.model.strip().startswith("hf:") else "cross-entropy"

    def config(self, device: str | None = None, world_size: int = 1) -> dict[str, Any]:
        """The run's config as stored in the result file.

        Everything that changes the numbers (compared when resuming or merging), plus ``label``, ``device``,
        ``data_root``, ``basis_device``, ``probes_per_pass`` and ``world_size``, which ``hessspec.store`` ignores in
        that comparison. ``loss`` (:meth:`loss_label`) is absent for cross-entropy, so files written before losses
        could be chosen resume as they are.

        Args:
            device: the resolved device to record (default: ``self.device`` as given).
            world_size: the number of data-parallel processes; recorded when above 1.

        Returns:
            A JSON-serialisable dict.
        """
        from hessspec.data.datasets import available_datasets

        rooted = {spec.split(":")[0] for spec in available_datasets() if spec.endswith(":ROOT")}
        name, has_colon, root = self.data.strip().partition(":")
        data, data_root = (name.lower(), root) if has_colon and name.lower() in rooted else (self.data.strip(), None)
        s = self.settings
        config: dict[str, Any] = {
            "model": self.model.strip(),
            "model_args": self.effective_model_args(),
            "data": data,
            "data_args": dict(self.data_args),
            "samples": self.samples,
            "batch_size": self.batch_size,
            "bn_mode": self.bn_mode,
            "dtype": self.dtype,
            "params": self.params,
            "seed": s.seed,
            "lanczos_steps": s.lanczos_steps,
            "probes": s.probes,
            "top_k": s.top_k,
            "basis_dtype": s.basis_dtype,
            "gradient_crosscheck": s.gradient_crosscheck,
            "device": device or self.device,
            "basis_device": s.basis_device,
            "probes_per_pass": s.probes_per_pass,
            "basis_placement": s.basis_placement,
            "block_strategy": self.block_strategy,
            "data_placement": self.data_placement,
            "workers": self.workers,
        }
        # Recorded only when other than the default (the whole-model Hessian), so files written before they
        # existed keep resuming.
        if s.curvatures != ("hessian",):
            config["curvatures"] = list(s.curvatures)
        if s.blocks:
            config["blocks"] = list(s.blocks)
        loss = self.loss_label()
        if loss != "cross-entropy":  # absent means cross-entropy, as in files written before losses were chosen
            config["loss"] = loss
        if data_root is not None:
            config["data_root"] = data_root
        if self.tf32:  # recorded only when on, so files written before the option resume
            config["tf32"] = True
        if self.compile:  # likewise
            config["compile"] = True
        if world_size > 1:
            config["world_size"] = world_size
        if self.label is not None:
            config["label"] = self.label
        return config


def resolve_device(spec: str = "auto") -> torch.device:
    """The device named by ``spec``, checked to exist.

    Args:
        spec: "auto" (CUDA if available, else the CPU), "cpu", "cuda", "cuda:I" or "mps".

    Returns:
        The device.

    Raises:
        PipelineError: a malformed name, or a CUDA/MPS device that this machine does not have.
    """
    text = str(spec).strip().lower()
    if not _DEVICE_PATTERN.match(text):
        msg = f"unknown device {spec!r}; expected auto, cpu, cuda, cuda:INDEX or mps"
        raise PipelineError(msg)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            msg = (
                f"device {spec!r} was asked for but CUDA is not available here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device cpu or auto"
            )
            raise PipelineError(msg)
        index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            msg = f"device {spec!r} does not exist: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            raise PipelineError(msg)
        return torch.device("cuda", index)
    if text == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        msg = "device 'mps' was asked for but MPS is not available here; use --device cpu or auto"
        raise PipelineError(msg)
    return torch.device(text)


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``, ``"float64"`` or ``"bfloat16"`` as a torch dtype.

    Raises:
        PipelineError: another name.
    """
    if name not in DTYPES:
        msg = f"dtype must be one of {', '.join(DTYPES)}; got {name!r}"
        raise PipelineError(msg)
    return DTYPES[name]


def parameter_filter(pattern: str | None) -> Callable[[str, nn.Parameter], bool] | None:
    """A parameter selector for :class:`HessianOperator` from a regular expression.

    Args:
        pattern: matched with ``re.search`` against parameter names (``"layers\\.4\\."``, ``"weight$"``); None
            selects every parameter that requires gradients.

    Returns:
        ``selector(name, parameter) -> bool``, or None.

    Raises:
        PipelineError: the pattern is not a valid regular expression.
    """
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        msg = f"--params {pattern!r} is not a valid regular expression: {error}"
        raise PipelineError(msg) from None

    def selector(name: str, parameter: nn.Parameter) -> bool:
        return parameter.requires_grad and compiled.search(name) is not None

    return selector
