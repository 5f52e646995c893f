"""Losses the curvature operators differentiate: what a "unit" is, and the loss of a batch as a sum over its units.

The contract (every operator builds on it):

- ``loss(output, batch)`` is a scalar tensor: the **sum** of the batch's per-unit losses. A unit is an example, or a
  target token for the language-model loss ``lm``.
- ``loss.per_unit(output, batch)`` is the vector [units] of those per-unit losses (same order for the same batch;
  ``loss(output, batch) == loss.per_unit(output, batch).sum()`` up to rounding).
- ``loss.count(batch)`` is the number of units of a batch (an ``int``; it depends on the data alone, so operators
  compute it once per batch).
- ``loss.check(output, batch)`` raises :class:`LossError` (one line naming what arrived) when the output and the
  batch's targets cannot be used; ``loss.check_targets(batch, output)`` checks the targets of a whole batch against
  an output of any number of examples (label ranges, dtypes).
- ``loss.name`` names it in results and stored settings.

The operators differentiate the mean over all units of the analysed set, ``(1/U) sum_units loss``: each batch's
product is weighted by its share of the ``U`` units, so unequal batches (a smaller last batch, sequences with
different numbers of target tokens) are exact.

Built-in losses (:func:`get_loss`): ``cross-entropy``, ``mse``, ``nll``, ``lm``; a user function
``f(output, batch) -> scalar`` (the mean over the batch's examples) through :class:`FunctionLoss`
(``--loss-factory``); a torch functional ``f(output, target) -> batch mean`` (``F.mse_loss``, ...) through
:class:`MeanLoss`. Losses are computed from the model's output in the analysis dtype, never taken from the model
(transformers' ``model(..., labels=...).loss`` casts logits to float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hessspec.curvature.problem import batch_size, describe_batch, is_mapping

LOSSES = ("cross-entropy", "mse", "nll", "lm")
IGNORE_INDEX = -100  # label value ignored by ``lm`` (and by Hugging Face / torch's cross-entropy)


class LossError(ValueError):
    """The model's output or the batch's targets cannot be used by the loss."""


def describe(value: Any) -> str:
    """A short description of a tensor or model output for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if hasattr(value, "logits") and isinstance(value.logits, torch.Tensor):
        return f"{type(value).__name__}(logits={describe(value.logits)})"
    return describe_batch(value)


def prediction(output: Any, loss_name: str) -> torch.Tensor:
    """The tensor a built-in loss reads from the model's output: the output itself, its ``logits`` (Hugging Face
    model outputs, mappings with a ``logits`` entry), or the first element of a tuple.

    Raises:
        LossError: no tensor found.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and is_mapping(output) and "logits" in output.keys():
        logits = output["logits"]
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        msg = (
            f"loss {loss_name!r} needs the model to return a tensor (or an output with logits); got {describe(output)}"
        )
        raise LossError(msg)
    return logits


def _entry(batch: Any, keys: tuple[str, ...]) -> torch.Tensor | None:
    if is_mapping(batch):
        for key in keys:
            if key in batch.keys():
                return batch[key]
        return None
    if isinstance(batch, (tuple, list)):
        return batch[1] if len(batch) > 1 else None
    return None


class Loss:
    """Base class of the losses (see the module docstring for the contract).

    Subclasses implement :meth:`per_unit`, and :meth:`__call__`, :meth:`count` and :meth:`check_targets` where the
    defaults (a sum over :meth:`per_unit`; one unit per example; no check) do not fit.
    """

    name = "loss"

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        """The sum of the batch's per-unit losses (a scalar tensor)."""
        return self.per_unit(output, batch).sum()

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        """The per-unit losses [units] of ``batch`` (differentiable in ``output``)."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """The number of units of ``batch`` (examples by default)."""
        return batch_size(batch)

    def check_targets(self, batch: Any, output: Any) -> None:
        """Raise :class:`LossError` when ``batch``'s targets cannot be used with outputs like ``output`` (which may
        hold another number of examples). Checks the data of the whole batch (label ranges)."""

    def check(self, output: Any, batch: Any) -> None:
        """Raise :class:`LossError` (one line) when ``output`` (the model's output on ``batch``) and the batch's
        targets cannot be used, or the loss is not a finite-shaped scalar."""
        self.check_targets(batch, output)
        value = self(output, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            msg = f"loss {self.name!r} must give a floating scalar; got {describe(value)}"
            raise LossError(msg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _target(batch: Any, name: str, keys: tuple[str, ...] = ("labels", "label", "target", "targets")) -> torch.Tensor:
    target = _entry(batch, keys)
    if not isinstance(target, torch.Tensor):
        msg = (
            f"loss {name!r} needs a target (an (inputs, target) pair or a mapping with one of {', '.join(keys)}); "
            f"got a batch of {describe_batch(batch)}"
        )
        raise LossError(msg)
    return target


def _examples_agree(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.ndim == 0 or target.ndim == 0 or pred.shape[0] != target.shape[0]:
        msg = f"loss {name!r}: the model output {describe(pred)} and the target {describe(target)} differ in examples"
        raise LossError(msg)


class _OneTargetPerExample(Loss):
    # Losses whose batch holds one target per example: the model's output and the target agree in examples.
    def check(self, output: Any, batch: Any) -> None:
        _examples_agree(prediction(output, self.name), _target(batch, self.name), self.name)
        super().check(output, batch)


class _ClassLabels(_OneTargetPerExample):
    # Shared by cross-entropy and nll: logits / log-probabilities [batch, classes], integer labels [batch].
    kind = "logits"

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return self._apply(output, batch, "sum")

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        return self._apply(output, batch, "none")

    def _apply(self, output: Any, batch: Any, reduction: str) -> torch.Tensor:
        raise NotImplementedError

    def _labels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1 and target.dtype != torch.int64:
            return target.long()  # uint8/int32 labels, or integral floating ones (see check_targets): class indices
        return target

    def check_targets(self, batch: Any, output: Any) -> None:
        pred = prediction(output, self.name)
        target = _target(batch, self.name)
        if pred.ndim != 2:
            msg = f"loss {self.name!r} needs {self.kind} of shape [batch, classes]; the model returned {describe(pred)}"
            raise LossError(msg)
        if self.soft_targets_allowed and target.is_floating_point() and target.shape[1:] == pred.shape[1:]:
            return
        if target.ndim != 1 or target.dtype == torch.bool or target.is_complex():
            soft = f" (or class probabilities [batch, {pred.shape[1]}])" if self.soft_targets_allowed else ""
            msg = f"loss {self.name!r} needs integer class labels [batch]{soft}; got a target of {describe(target)}"
            raise LossError(msg)
        if target.is_floating_point() and not bool((target == target.round()).all()):
            msg = f"loss {self.name!r} needs integer class labels; got non-integral values of {describe(target)}"
            raise LossError(msg)
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= pred.shape[1]):
            msg = (
                f"the model has {pred.shape[1]} outputs but the data has labels from {int(target.min())} to "
                f"{int(target.max())}; pass --model-arg num_classes={int(target.max()) + 1}"
            )
            raise LossError(msg)

    soft_targets_allowed = False


class CrossEntropyLoss(_ClassLabels):
    """Cross-entropy of logits [batch, classes] against integer labels [batch] or class probabilities.

    Args:
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    soft_targets_allowed = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)
        self.name = "cross-entropy" if not label_smoothing else f"cross-entropy(label_smoothing={label_smoothing:g})"

    def _apply(self, output: Any, batch: Any, reduction: str) -> torch.Tensor:
        pred = prediction(output, self.name)
        target = self._labels(pred, _target(batch, self.name))
        return F.cross_entropy(pred, target, reduction=reduction, label_smoothing=self.label_smoothing)


class NLLLoss(_ClassLabels):
    """Negative log-likelihood of log-probabilities [batch, classes] (a model ending in ``log_softmax``) against
    integer labels [batch]."""

    name = "nll"
    kind = "log-probabilities"

    def _apply(self, output: Any, batch: Any, reduction: str) -> torch.Tensor:
        pred = prediction(output, self.name)
        return F.nll_loss(pred, self._labels(pred, _target(batch, self.name)), reduction=reduction)


class MSELoss(_OneTargetPerExample):
    """Squared error summed over each example's outputs, averaged over examples: ``(1/N) sum_i ||f(x_i) - y_i||^2``.

    Summed over outputs (not averaged as ``torch.nn.functional.mse_loss`` does) so that the per-example loss, and
    with it the Hessian, does not shrink as the output dimension grows: it is the negative log-likelihood of a
    unit-variance Gaussian (times 2, plus a constant), whose Gauss-Newton matrix is ``(2/N) sum_i J_i^T J_i``.
    ``F.mse_loss`` gives this Hessian divided by the number of outputs per example.
    """

    name = "mse"

    def _residual(self, output: Any, batch: Any) -> torch.Tensor:
        pred = prediction(output, self.name)
        target = _target(batch, self.name)
        return pred - target.reshape(pred.shape)

    def check_targets(self, batch: Any, output: Any) -> None:
        pred = prediction(output, self.name)
        target = _target(batch, self.name)
        if not target.is_floating_point():
            msg = f"loss 'mse' needs floating-point targets; got a target of {describe(target)}"
            raise LossError(msg)
        if pred.ndim == 0 or target.ndim == 0 or pred[0].numel() != target[0].numel():
            msg = (
                f"loss 'mse' needs one target value per model output; the model returned {describe(pred)} and the "
                f"target is {describe(target)}"
            )
            raise LossError(msg)

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return self._residual(output, batch).square().sum()

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        residual = self._residual(output, batch)
        return residual.square().reshape(residual.shape[0], -1).sum(1)


class LanguageModelLoss(Loss):
    """Next-token cross-entropy: logits [batch, T, vocab] at position t predict the label at t + 1.

    The labels are the batch's ``labels`` (a mapping entry, or the second element of a tuple), else its
    ``input_ids`` (or the input tensor). Positions whose label is -100 or whose ``attention_mask`` is 0 (padding)
    are ignored. A unit is a target token: the operators average over all target tokens of the analysed set, so
    each batch weighs by its number of target tokens.
    """

    name = "lm"

    def _labels_and_mask(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = None
        if is_mapping(batch):
            keys = batch.keys()
            labels = batch["labels"] if "labels" in keys else batch["input_ids"] if "input_ids" in keys else None
            mask = batch["attention_mask"] if "attention_mask" in keys else None
        elif isinstance(batch, (tuple, list)) and batch:
            labels = batch[1] if len(batch) > 1 else batch[0]
            if is_mapping(labels):  # ({input_ids, attention_mask}, ...) pairs
                return self._labels_and_mask(labels if len(batch) == 1 else {**labels, "labels": batch[1]})
        else:
            labels = batch
        if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.is_floating_point():
            shown = describe(labels) if labels is not None else "none"
            msg = (
                "loss 'lm' needs integer token labels [batch, sequence] (labels, or else input_ids); got "
                f"{shown} in a batch of {describe_batch(batch)}"
            )
            raise LossError(msg)
        return labels, mask

    def _shifted_targets(self, batch: Any) -> torch.Tensor:
        labels, mask = self._labels_and_mask(batch)
        targets = labels[:, 1:].long()
        ignored = targets == IGNORE_INDEX
        if mask is not None:
            ignored = ignored | (mask[:, 1:] == 0)
        return targets.masked_fill(ignored, IGNORE_INDEX)

    def count(self, batch: Any) -> int:
        return int((self._shifted_targets(batch) != IGNORE_INDEX).sum())

    def _token_losses(self, output: Any, batch: Any, reduction: str) -> torch.Tensor:
        logits = prediction(output, self.name)[:, :-1]
        targets = self._shifted_targets(batch)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
        )

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return self._token_losses(output, batch, "sum")

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        kept = (self._shifted_targets(batch) != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
        return self._token_losses(output, batch, "none").index_select(0, kept)

    def check_targets(self, batch: Any, output: Any) -> None:
        logits = prediction(output, self.name)
        labels, mask = self._labels_and_mask(batch)
        if logits.ndim != 3:
            shape = describe(logits)
            msg = f"loss 'lm' needs logits of shape [batch, sequence, vocabulary]; the model returned {shape}"
            raise LossError(msg)
        if mask is not None and mask.shape != labels.shape:
            msg = f"loss 'lm': attention_mask {describe(mask)} does not match the labels {describe(labels)}"
            raise LossError(msg)
        used = labels[labels != IGNORE_INDEX]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= logits.shape[-1]):
            msg = (
                f"loss 'lm': the model has a vocabulary of {logits.shape[-1]} but the labels range from "
                f"{int(used.min())} to {int(used.max())}"
            )
            raise LossError(msg)

    def check(self, output: Any, batch: Any) -> None:
        logits = prediction(output, self.name)
        labels, _ = self._labels_and_mask(batch)
        if logits.ndim == 3 and logits.shape[:2] != labels.shape:
            shown = f"logits {describe(logits)} do not match the labels {describe(labels)}"
            msg = f"loss 'lm': {shown} in [batch, sequence]"
            raise LossError(msg)
        super().check(output, batch)


def _one(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if is_mapping(batch):
        return {key: _one(batch[key], i) for key in batch.keys()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_one(item, i) for item in batch)
    return batch


class MeanLoss(Loss):
    """A torch functional ``loss_fn(output, target)`` returning the batch **mean** (``F.cross_entropy``,
    ``F.mse_loss``, ...), as a :class:`Loss` over examples: the sum is ``loss_fn(...) * batch size``.

    Args:
        loss_fn: the functional.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.name = getattr(loss_fn, "__name__", type(loss_fn).__name__)

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return self.loss_fn(output, _target(batch, self.name)) * batch_size(batch)

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        target = _target(batch, self.name)
        if self.loss_fn in (F.cross_entropy, F.nll_loss):
            return self.loss_fn(output, target, reduction="none")
        if self.loss_fn is F.mse_loss:
            return (output - target.reshape(output.shape)).square().reshape(output.shape[0], -1).mean(1)
        # Any other functional: evaluated on one example at a time (its batch mean is the mean of those).
        return torch.stack([self.loss_fn(output[i : i + 1], target[i : i + 1]) for i in range(len(target))])


class FunctionLoss(Loss):
    """A user's function ``f(output, batch) -> scalar``: the **mean** loss over the batch's examples (a loss
    factory: any structure of output and batch, targets or none, e.g. a PINN residual).

    ``per_unit`` evaluates ``f`` on one example at a time, which is right when the batch mean is the mean of
    ``f`` over examples.

    Args:
        function: the function.
        name: its name in results (e.g. the ``module:function`` spec).
    """

    def __init__(self, function: Callable[[Any, Any], torch.Tensor], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", type(function).__name__)

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        return self.function(output, batch) * batch_size(batch)

    def per_unit(self, output: Any, batch: Any) -> torch.Tensor:
        rows = []
        for i in range(batch_size(batch)):
            one_output = output[i : i + 1] if isinstance(output, torch.Tensor) else _one(output, i)
            rows.append(self.function(one_output, _one(batch, i)))
        return torch.stack(rows)

    def check(self, output: Any, batch: Any) -> None:
        value = self.function(output, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            msg = (
                f"loss factory {self.name!r} must return a floating scalar tensor (the batch's mean loss); got "
                f"{describe(value)} for a model output of {describe(output)}"
            )
            raise LossError(msg)


def loss_name(name: str) -> str:
    """The canonical name of a built-in loss (``"CE"`` -> ``"cross-entropy"``).

    Raises:
        LossError: an unknown name.
    """
    canonical = str(name).strip().lower().replace("_", "-")
    canonical = "cross-entropy" if canonical in ("ce", "crossentropy") else canonical
    if canonical not in LOSSES:
        msg = f"unknown loss {name!r}; expected one of {', '.join(LOSSES)} (or a loss factory)"
        raise LossError(msg)
    return canonical


def get_loss(loss: str | Loss | None = None) -> Loss:
    """A :class:`Loss` from a name (:data:`LOSSES`), or ``loss`` itself.

    Args:
        loss: "cross-entropy" (default for None), "mse", "nll", "lm", or a :class:`Loss`.

    Returns:
        The loss.

    Raises:
        LossError: an unknown name.
    """
    if loss is None:
        return CrossEntropyLoss()
    if isinstance(loss, Loss):
        return loss
    builders = {"cross-entropy": CrossEntropyLoss, "mse": MSELoss, "nll": NLLLoss, "lm": LanguageModelLoss}
    return builders[loss_name(loss)]()


def loss_from_factory(spec: str) -> FunctionLoss:
    """The loss named by ``--loss-factory MODULE:FUNCTION`` (or ``FILE.py:FUNCTION``).

    Raises:
        hessspec.models.factory.FactoryError: the spec cannot be imported or does not name a callable.
    """
    from hessspec.models.factory import load_factory

    return FunctionLoss(load_factory(spec), name=spec.strip())
