"""From specs to stored results: build the model once, load the data once, analyse checkpoints into a result file.

This is the reusable middle layer between the command line (``hessspec analyze``), the Python API and the distributed
runner: it turns an :class:`~hessspec.runner.job.AnalysisJob` (names and settings, as a user types them) into a model on
a device and device-resident batches (:func:`prepare`), orders checkpoint files by training step
(:func:`plan_checkpoints`), and analyses them one after another into a :class:`~hessspec.store.ResultWriter`, skipping
those already stored (:func:`run`). Progress is reported through an :class:`Observer`.

Data-parallel analysis plugs in with hooks, all optional, which ``hessspec.runner.distributed.pipeline_hooks(ctx)``
builds from a ``DistributedContext``: ``shard_batches`` (keep this process's share of the batches), ``all_reduce`` (sum
a tensor across processes; given to :class:`~hessspec.curvature.hessian.HessianOperator`), ``is_main`` (only the main
process writes the file and reports), ``sync`` (``functools.partial(hessspec.runner.distributed.sync_errors, ctx)``: a
failure on one rank is raised on all of them), ``verify`` (every rank holds the same result) and ``world_size``
(recorded in the file's config).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessspec._paths import make_parent, output_problem
from hessspec.analysis import analyze_many, check_memory
from hessspec.checkpoints import (
    apply_state_dict,
    expand_checkpoint_paths,
    load_checkpoint,
    resolve_step,
    step_from_filename,
)
from hessspec.curvature.blocks import BlockError, resolve_blocks
from hessspec.curvature.gauss_newton import CurvatureOperator
from hessspec.curvature.hessian import check_block_strategy
from hessspec.curvature.losses import Loss, LossError, get_loss, loss_from_factory
from hessspec.curvature.problem import (
    Batch,
    batch_norm_layers,
    call_model,
    check_bn_mode,
    describe_batch,
    exact_attention,
    is_mapping,
    move_batch,
    slice_batch,
)
from hessspec.data.placement import BatchSource, PlacementChoice
from hessspec.linalg.basis import remove_stale_scratch
from hessspec.results import CheckpointResult, HessspecWarning
from hessspec.runner.job import (
    AnalysisJob,
    PipelineError,
    parameter_filter,
    parse_dtype,
    resolve_device,
)
from hessspec.runner.memory_plan import MemoryPlan, make_plan

AllReduce = Callable[[torch.Tensor], torch.Tensor]
ShardBatches = Callable[[BatchSource], BatchSource]
Sync = Callable[[str], AbstractContextManager[None]]
Verify = Callable[[CheckpointResult, str], None]


@dataclass
class Prepared:
    """A model on its device and the data it is analysed on, built once per run.

    Attributes:
        job: the job this was prepared from.
        model: the network (float32, on ``device``); each checkpoint's state dict is loaded into it.
        batches: this process's batches (inputs in ``dtype``), delivered to the device on every pass
            (:class:`~hessspec.data.placement.BatchSource`).
        device: where the Hessian products run.
        dtype: the dtype the model is evaluated in.
        num_examples: examples in ``batches`` (this process's share under data parallelism).
        num_params: parameters spanned by the Hessian.
        selector: the parameter selector given to :class:`HessianOperator` (None for all).
        total_examples: examples analysed by all processes together (``num_examples`` in one process).
        total_batches: batches of all processes together (``len(batches)`` in one process).
        blocks: the names and sizes of the parameter blocks of ``job.settings.blocks`` (empty for none).
        loss: the loss the operators differentiate (the job's, or the model's default).
        placement: where the data live between passes, and why (see :mod:`hessspec.data.placement`).
        plan: the memory plan (:mod:`hessspec.runner.memory_plan`), made by :func:`run` before the first product.
    """

    job: AnalysisJob
    model: nn.Module
    batches: BatchSource
    device: torch.device
    dtype: torch.dtype
    num_examples: int
    num_params: int
    selector: Callable[[str, nn.Parameter], bool] | None
    total_examples: int
    total_batches: int
    blocks: tuple[tuple[str, int], ...] = ()
    loss: Loss | None = None
    placement: PlacementChoice | None = None
    plan: MemoryPlan | None = None

    @property
    def kinds(self) -> tuple[tuple[str, str], ...]:
        """The ``(curvature, block)`` pairs each checkpoint's analysis yields, in the order it yields them."""
        names = ["all", *(name for name, _ in self.blocks)]
        return tuple((curvature, name) for curvature in self.job.settings.curvatures for name in names)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def resolve_loss(job: AnalysisJob, model: nn.Module) -> Loss:
    """The loss of a job: ``loss_factory``, else ``loss``, else the model's default (its head's for a Hugging Face
    model, see :func:`hessspec.models.default_loss`; cross-entropy otherwise).

    Raises:
        PipelineError: both or an unknown loss name, a loss factory that cannot be imported.
        hessspec.models.ModelError: a Hugging Face head without a default loss.
    """
    from hessspec.models import default_loss
    from hessspec.models.factory import FactoryError

    label = job.loss_label()
    if job.loss_factory is not None:
        try:
            return loss_from_factory(job.loss_factory)
        except FactoryError as error:
            msg = f"--loss-factory: {error}"
            raise PipelineError(msg) from error
    return get_loss(label if label is not None else default_loss(model))


def _checked_batches(batches: BatchSource) -> Sequence[Batch]:
    # Stacked data are checked whole; streamed data on their first batch only (a later target the loss cannot use
    # fails in the first pass, with the loss's message), since reading them all here would be one more pass.
    held = getattr(batches, "batches", None)
    return held if held is not None else [batches.first()]


def _advice_for(message: str, job: AnalysisJob) -> str:
    # "--model-arg num_classes=N" is advice for zoo models, which take num_classes; a user's factory may not.
    from hessspec.models import available_models

    if job.model.strip() in available_models():
        return message
    return re.sub(
        r"pass --model-arg num_classes=(\d+)",
        r"the model must return \1 outputs (one per class; --model-arg passes arguments to your factory)",
        message,
    )


def _check_model_fits_data(model: nn.Module, batches: BatchSource, job: AnalysisJob, loss: Loss) -> None:
    # One forward pass on two examples, so that a model that cannot take the data, or an output and targets that do
    # not fit the loss, fail here with a hint, not in the middle of the first checkpoint's Hessian products.
    first = next(iter(model.parameters()))
    original = slice_batch(batches.first(), 2)
    sample = move_batch(original, first.device, first.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), exact_attention():
            out = call_model(model, sample)
    except Exception as error:
        msg = (
            f"model {job.model!r} cannot process the data {job.data!r} (a batch of {describe_batch(sample)}): "
            f"{_first_line(error)}; check --model-arg (e.g. in_features, in_channels) against the data"
        )
        raise PipelineError(msg) from error
    finally:
        model.train(was_training)
    try:
        loss.check(out, original)
        for batch in _checked_batches(batches):
            loss.check_targets(batch, out)
    except LossError as error:
        raise PipelineError(_advice_for(str(error), job)) from error
    except Exception as error:  # a loss factory failing on the data
        msg = f"the loss {loss.name!r} fails on the data {job.data!r}: {_first_line(error)}"
        raise PipelineError(msg) from error


def _check_token_ids(model: nn.Module, batches: Sequence[Batch]) -> None:
    # An id beyond the vocabulary or a sequence beyond the position embeddings fails deep inside the model with an
    # index error (or a device-side assert on a GPU); say which, and what to change.
    from hessspec.models import hf

    ids = [batch["input_ids"] for batch in batches if is_mapping(batch) and "input_ids" in batch.keys()]
    if ids:
        hf.check_token_ids(model, max(int(t.max()) for t in ids), max(int(t.shape[-1]) for t in ids))


def _check_batch_sizes(model: nn.Module, batches: BatchSource, job: AnalysisJob) -> None:
    if job.bn_mode != "train" or not batch_norm_layers(model):
        return
    sizes = batches.sizes()
    if 1 in sizes:
        total = sum(sizes)
        msg = (
            f"a batch holds a single example ({total} examples in batches of {job.batch_size}) and BatchNorm in "
            "train mode cannot normalise one example; choose a --batch-size or --samples that leaves no "
            "remainder of 1, or --bn-mode eval/population"
        )
        raise PipelineError(msg)


def prepare(job: AnalysisJob, *, shard_batches: ShardBatches | None = None) -> Prepared:
    """Build the model and load the data of a job, once for all its checkpoints.

    Args:
        job: the job.
        shard_batches: keeps this process's share of the batches (data-parallel analysis), or None.

    Returns:
        The model (freshly initialised; a checkpoint's weights are applied by :func:`analyze_checkpoint`) on the
        job's device and the device-resident batches.

    Raises:
        ValueError: unknown ``bn_mode`` or ``block_strategy``.
        PipelineError: unknown device or dtype, data the model cannot process, an output or targets that do not
            fit the loss, a loss factory that cannot be imported, a batch of one example in BN train mode, a
            ``params`` pattern that selects nothing.
        hessspec.models.ModelError, hessspec.models.FactoryError: the model cannot be built.
        hessspec.data.datasets.DatasetError: the data cannot be loaded.
    """
    from hessspec.data.datasets import load_dataset
    from hessspec.data.placement import check_placement, place
    from hessspec.models import build_model

    check_bn_mode(job.bn_mode)
    check_block_strategy(job.block_strategy)
    check_placement(job.data_placement, job.workers)
    try:
        job.settings.check()
    except ValueError as error:
        raise PipelineError(str(error)) from None
    dtype = parse_dtype(job.dtype)
    device = resolve_device(job.device)
    if job.tf32:
        from hessspec.runtime import set_tf32

        set_tf32(True)
    selector = parameter_filter(job.params)
    # A Hugging Face directory is loaded in the analysis dtype directly, so float64 weights keep every digit.
    model_dtype = dtype if job.model.strip().startswith("hf:") else None
    model = build_model(job.model, dtype=model_dtype, **job.effective_model_args())
    if next(iter(model.parameters()), None) is None:
        msg = f"model {job.model!r} has no parameters"
        raise PipelineError(msg)
    model = model.to(device)
    dataset = load_dataset(job.data, samples=job.samples, seed=job.settings.seed, **job.effective_data_args())
    batches, placement = place(
        dataset, job.batch_size, device, dtype, placement=job.data_placement, workers=job.workers
    )
    if job.model.strip().startswith("hf:"):
        _check_token_ids(model, _checked_batches(batches))
    loss = resolve_loss(job, model)
    _check_model_fits_data(model, batches, job, loss)
    total_examples, total_batches = sum(batches.sizes()), len(batches)
    if shard_batches is not None:
        batches = shard_batches(batches)
    _check_batch_sizes(model, batches, job)
    names = [
        name for name, p in model.named_parameters() if (p.requires_grad if selector is None else selector(name, p))
    ]
    if not names:
        shown = ", ".join(name for name, _ in list(model.named_parameters())[:6])
        msg = f"--params {job.params!r} matches no parameter of {job.model!r}; its parameters are e.g. {shown}"
        raise PipelineError(msg)
    params = dict(model.named_parameters())
    try:
        blocks = resolve_blocks(job.settings.blocks, names, [params[name].numel() for name in names])
    except BlockError as error:
        raise PipelineError(str(error)) from None
    return Prepared(
        job=job,
        model=model,
        batches=batches,
        device=device,
        dtype=dtype,
        num_examples=sum(batches.sizes()),
        num_params=sum(params[name].numel() for name in names),
        selector=selector,
        total_examples=total_examples,
        total_batches=total_batches,
        blocks=tuple((block.name, block.n) for block in blocks),
        loss=loss,
        placement=placement,
    )


@dataclass(frozen=True)
class PlannedCheckpoint:
    """A checkpoint file to analyse, with its training step and content hash.

    Attributes:
        path: the file.
        step: its training step (stored in the file, else from its name, else ``--step``).
        sha256: hex digest of its bytes (with the step, identifies it in the result file).
    """

    path: Path
    step: int
    sha256: str


def plan_checkpoints(
    specs: Sequence[str | os.PathLike[str]], *, explicit_step: int | None = None, unsafe: bool = False
) -> list[PlannedCheckpoint]:
    """Expand files, directories and globs into checkpoints ordered by training step.

    Each file is read once here (for its stored step and its hash) and again when it is analysed; only one state
    dict is held in memory at a time.

    Args:
        specs: checkpoint files, directories or glob patterns.
        explicit_step: the step of a file that neither stores one nor has a number in its name (``--step``).
        unsafe: load pickles that need arbitrary code (``--unsafe-load``; trusted files only).

    Returns:
        The checkpoints sorted by step (then path).

    Raises:
        hessspec.checkpoints.CheckpointError: a spec matches nothing, a file is unreadable or truncated, a step
            cannot be determined.
        PipelineError: ``explicit_step`` would be given to several files.
    """
    paths = expand_checkpoint_paths([os.fspath(spec) for spec in specs])
    planned, needed_explicit = [], []
    for path in paths:
        loaded = load_checkpoint(path, unsafe=unsafe)
        step = resolve_step(loaded, path, explicit_step)
        if loaded.step is None and step_from_filename(path) is None:
            needed_explicit.append(str(path))
        planned.append(PlannedCheckpoint(Path(path), step, loaded.sha256))
        del loaded
    if len(needed_explicit) > 1:
        msg = (
            f"--step {explicit_step} would be the step of {len(needed_explicit)} files that store none "
            f"({', '.join(needed_explicit[:3])}{', ...' if len(needed_explicit) > 3 else ''}); analyse them one at a "
            "time, each with its own --step"
        )
        raise PipelineError(msg)
    planned = sorted(planned, key=lambda item: (item.step, str(item.path)))
    _warn_duplicate_steps(planned)
    return planned


def _warn_duplicate_steps(planned: Sequence[PlannedCheckpoint]) -> None:
    # A .pt and a .safetensors of the same step (or a directory holding several formats) are analysed twice:
    # each is stored under its own source, which info and export show, but the user should know.
    by_step: dict[int, list[PlannedCheckpoint]] = {}
    for item in planned:
        by_step.setdefault(item.step, []).append(item)
    for step, items in by_step.items():
        if len(items) > 1:
            names = ", ".join(item.path.name for item in items)
            same = " (identical bytes)" if len({item.sha256 for item in items}) == 1 else ""
            warnings.warn(
                f"{len(items)} checkpoint files hold step {step}: {names}{same}; each is analysed and stored, "
                "told apart by its source file in info and export",
                HessspecWarning,
                stacklevel=3,
            )


def check_lanczos_memory(prepared: Prepared) -> None:
    """Refuse, before any data pass, a Lanczos basis that cannot fit where it would live.

    :func:`hessspec.analysis.analyze` checks this too, but only after the operator has summed the batch sizes
    across processes; run under ``sync`` this check lets a rank short of memory stop every rank with its message.

    Raises:
        MemoryError: see :func:`hessspec.analysis.check_memory`.
    """
    settings = prepared.job.settings
    chains = settings.probes + int(settings.gradient_crosscheck)
    block_sizes = tuple(n for _, n in prepared.blocks)
    check_memory(prepared.num_params, settings, chains, prepared.device, block_sizes=block_sizes)


def load_weights(prepared: Prepared, item: PlannedCheckpoint, *, unsafe: bool = False) -> str:
    """Load a checkpoint's state dict into the prepared model.

    Args:
        prepared: from :func:`prepare`.
        item: the checkpoint (from :func:`plan_checkpoints`).
        unsafe: see :func:`plan_checkpoints`.

    Returns:
        The SHA-256 of the bytes loaded (normally ``item.sha256``).

    Raises:
        hessspec.checkpoints.CheckpointError: unreadable file, keys or shapes that do not match the model
            (another architecture), non-finite weights (naming the tensor). The model is unchanged then.
    """
    loaded = load_checkpoint(item.path, unsafe=unsafe)
    apply_state_dict(prepared.model, loaded.state_dict)
    return loaded.sha256


def analyze_loaded(
    prepared: Prepared,
    item: PlannedCheckpoint,
    sha256: str,
    *,
    all_reduce: AllReduce | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CheckpointResult, ...]:
    """Analyse the curvatures and blocks of the job's settings for the weights currently in the prepared model
    (see :func:`load_weights`), all in the same data passes.

    Args:
        prepared: from :func:`prepare`.
        item: the checkpoint the weights came from (its step and path are recorded).
        sha256: the hash returned by :func:`load_weights`.
        all_reduce: sums a tensor across processes (data-parallel analysis), or None.
        progress: called as ``progress(done, total)`` after each Lanczos step.

    Returns:
        One result per (curvature, block), the whole-model result of the first curvature first (see
        :func:`hessspec.analysis.analyze_many`).

    Raises:
        ValueError, FloatingPointError, hessspec.curvature.hessian.DeterminismError, MemoryError: from
            :func:`hessspec.analysis.analyze_many`.
    """
    operator = CurvatureOperator(
        prepared.model,
        prepared.batches,
        bn_mode=prepared.job.bn_mode,
        params=prepared.selector,
        dtype=prepared.dtype,
        all_reduce=all_reduce,
        block_strategy=prepared.job.block_strategy,
        primal_cache=prepared.job.primal_cache,
        compile=prepared.job.compile,
        loss=prepared.loss,
    )
    return analyze_many(
        operator,
        prepared.job.settings,
        step=item.step,
        source=str(item.path),
        sha256=sha256,
        model_name=prepared.job.model.strip(),
        progress=progress,
    )


def analyze_checkpoint(
    prepared: Prepared,
    item: PlannedCheckpoint,
    *,
    unsafe: bool = False,
    all_reduce: AllReduce | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CheckpointResult, ...]:
    """Load one checkpoint into the prepared model and analyse it (:func:`load_weights`, then
    :func:`analyze_loaded`).

    Raises:
        See :func:`load_weights` and :func:`analyze_loaded`.
    """
    sha256 = load_weights(prepared, item, unsafe=unsafe)
    return analyze_loaded(prepared, item, sha256, all_reduce=all_reduce, progress=progress)


def dry_run(
    job: AnalysisJob,
    checkpoints: Sequence[str | os.PathLike[str]],
    *,
    explicit_step: int | None = None,
    unsafe: bool = False,
    shard_batches: ShardBatches | None = None,
) -> tuple[MemoryPlan, Prepared, list[PlannedCheckpoint]]:
    """Plan a run without analysing: the memory plan, with one batch's product and gradient timed on the first
    checkpoint's weights (``hessspec analyze --dry-run``).

    Returns:
        ``(plan, prepared, checkpoints)``.

    Raises:
        See :func:`prepare`, :func:`plan_checkpoints`, :func:`load_weights` and
        :func:`hessspec.runner.memory_plan.make_plan`.
    """
    plan = plan_checkpoints(checkpoints, explicit_step=explicit_step, unsafe=unsafe)
    prepared = prepare(job, shard_batches=shard_batches)
    load_weights(prepared, plan[0], unsafe=unsafe)
    prepared.plan = make_plan(prepared, timed=True)
    return prepared.plan, prepared, plan


class Observer:
    """Receives the progress of :func:`run`; every method does nothing unless overridden."""

    def planned(self, plan: Sequence[PlannedCheckpoint], done: Sequence[bool], prepared: Prepared) -> None:
        """Called once, before any analysis, with the ordered checkpoints and which are already stored."""

    def skipped(self, item: PlannedCheckpoint) -> None:
        """A checkpoint already in the result file with the same settings."""

    def started(self, item: PlannedCheckpoint, index: int, total: int) -> None:
        """Analysis of ``item`` begins; ``index`` counts the checkpoints to analyse (0-based) out of ``total``."""

    def lanczos_step(self, done: int, total: int) -> None:
        """After each Lanczos step of the current checkpoint."""

    def finished(self, item: PlannedCheckpoint, result: CheckpointResult) -> None:
        """The results of ``item`` are computed (and, on the main process, written); ``result`` is the first of
        them, the whole-model result of the first curvature (all of them: :meth:`analysed`)."""

    def analysed(self, item: PlannedCheckpoint, results: Sequence[CheckpointResult]) -> None:
        """Called just before :meth:`finished` with all of the checkpoint's results, one per (curvature, block)."""


@dataclass(frozen=True)
class RunReport:
    """What :func:`run` did.

    Attributes:
        out: the result file.
        analysed: the new results, in step order (one per checkpoint, curvature and block).
        skipped: the checkpoints that were already stored.
    """

    out: str
    analysed: tuple[CheckpointResult, ...]
    skipped: tuple[PlannedCheckpoint, ...]

    def __repr__(self) -> str:
        steps = sorted({r.step for r in self.analysed})
        return (
            f"RunReport(out={self.out!r}, analysed={len(self.analysed)} result(s) at steps {steps}, "
            f"skipped={len(self.skipped)} checkpoint(s))"
        )


def _no_sync(_what: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def _agree(flag: bool, all_reduce: AllReduce | None, device: torch.device) -> bool:
    # Under data parallelism only the main process knows the file; the others learn its answer from the sum.
    if all_reduce is None:
        return flag
    total = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    return bool(float(all_reduce(total)[0]) > 0)


def check_output(out: str | os.PathLike[str], job: AnalysisJob, *, force: bool = False) -> None:
    """Fail fast, before the model and data are loaded, when the result file cannot take this job's results.

    Args:
        out: the result file.
        job: the job.
        force: accept an existing file written with other settings.

    Raises:
        PipelineError: the directory is not writable and cannot be created, or ``out`` is a directory.
        hessspec.store.StoreError: ``out`` exists but is not a readable hessspec file (foreign or corrupt HDF5), or
            was written with other settings and ``force`` is False.
    """
    from hessspec.store import StoreError, config_differences, load_results

    path = Path(os.fspath(out)).expanduser()
    problem = output_problem(path)
    if problem is not None:
        msg = f"cannot write {str(path)!r}: {problem}"
        raise PipelineError(msg)
    if not path.exists():
        return
    stored = load_results(path)
    given, stored_config = job.config(), dict(stored.config)
    if job.loss_label() is None:  # the model's default loss, known once the model is built: compared by run()
        given.pop("loss", None)
        stored_config.pop("loss", None)
    diffs = config_differences(stored_config, given)
    if diffs and not force:
        shown = ", ".join(f"{key} ({a!r} in the file, {b!r} now)" for key, (a, b) in diffs.items())
        msg = (
            f"{str(path)!r} holds results computed with other settings: {shown}; use the same settings to resume, "
            "another output file, or --force to recompute with the new settings"
        )
        raise StoreError(msg)


def run(
    job: AnalysisJob,
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **options: Any,
) -> RunReport:
    """Analyse checkpoint files in step order into a result file (what ``hessspec analyze`` runs).

    ``checkpoints`` are files, directories or glob patterns (one, or a sequence). An in-memory ``nn.Module`` is not
    a checkpoint: analyse it with ``hessspec.analyze(hessspec.HessianOperator(model, batches))``, or save its
    ``state_dict()`` with ``torch.save`` and pass the file. While it runs, the current directory and the
    directories of ``FILE.py:FUNCTION`` factories are on the import path (see
    :func:`hessspec.models.factory.user_import_paths`). The options and what is raised are those of
    :func:`run_checkpoints`.

    Raises:
        TypeError: ``job`` is not an :class:`AnalysisJob`, or ``checkpoints`` are not paths.
    """
    from hessspec.models.factory import user_import_paths

    if not isinstance(job, AnalysisJob):
        msg = f"hessspec.run takes an AnalysisJob first, got {type(job).__module__}.{type(job).__qualname__}"
        raise TypeError(msg)
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    wrong = (
        [c for c in checkpoints if not isinstance(c, (str, os.PathLike))]
        if isinstance(checkpoints, Sequence)
        else [checkpoints]
    )
    if wrong:
        what = f"{type(wrong[0]).__module__}.{type(wrong[0]).__qualname__}"
        msg = (
            f"hessspec.run takes checkpoint files, directories or glob patterns, got a {what}; for a model in memory "
            "use hessspec.analyze(hessspec.HessianOperator(model, batches)), or torch.save(model.state_dict(), "
            "'ckpt_0.pt') and pass that file"
        )
        raise TypeError(msg)
    with user_import_paths(job.model, job.data, job.loss_factory):
        return run_checkpoints(job, checkpoints, out, **options)


def run_checkpoints(
    job: AnalysisJob,
    checkpoints: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    explicit_step: int | None = None,
    unsafe: bool = False,
    observer: Observer | None = None,
    all_reduce: AllReduce | None = None,
    is_main: bool = True,
    shard_batches: ShardBatches | None = None,
    sync: Sync | None = None,
    select: Callable[[list[PlannedCheckpoint]], list[PlannedCheckpoint]] | None = None,
    verify: Verify | None = None,
    world_size: int = 1,
) -> RunReport:
    """Analyse checkpoints in step order into a result file, skipping those already stored with the same settings.

    The result file is checked first (its directory, its format, its settings), then the checkpoints are read
    and ordered, the model built and the data loaded, and only then is the file (and its directory, when missing)
    created or opened for writing, so a bad checkpoint, model or data spec leaves no file behind. Each result is on
    disk before the next checkpoint starts; an interrupted run is resumed by running it again.

    Args:
        job: model, data and settings.
        checkpoints: files, directories or glob patterns.
        out: the result file (``.h5``), created or appended to.
        force: accept a file written with other settings (its entries become stale and are recomputed when
            analysed again) and replace stored entries.
        explicit_step: see :func:`plan_checkpoints`.
        unsafe: see :func:`plan_checkpoints`.
        observer: receives progress (on the main process only); None for silence.
        all_reduce: sums a tensor across processes (data-parallel analysis), or None.
        is_main: whether this process writes the file and reports (False on the other ranks).
        shard_batches: keeps this process's share of the batches, or None.
        sync: ``sync(what)`` returns a context manager around each block that may fail on one process only
            (reading files, opening and writing the result file on the main process); under data parallelism
            ``functools.partial(hessspec.runner.distributed.sync_errors, ctx)``, so that every rank raises instead of
            waiting in the next collective. None for one process.
        select: keeps the checkpoints of this task (``--shard``), given the step-ordered plan; None keeps all.
        verify: ``verify(result, what)`` is called on every process after each checkpoint's analysis, before it
            is written; under data parallelism it raises on every rank when the ranks' results differ
            (``hessspec.runner.distributed.verify_identical``). None for one process.
        world_size: the number of data-parallel processes, recorded in the file's config when above 1.

    Returns:
        A :class:`RunReport`.

    Raises:
        PipelineError, hessspec.store.StoreError, hessspec.checkpoints.CheckpointError, hessspec.models.ModelError,
        hessspec.data.datasets.DatasetError, MemoryError, ...: see :func:`prepare`, :func:`plan_checkpoints`,
        :func:`check_lanczos_memory`, :func:`analyze_checkpoint` and :class:`hessspec.store.ResultWriter`.
        Results already written stay.
    """
    from hessspec.store import ResultWriter

    observer = observer or Observer()
    guard = sync or _no_sync
    out = os.fspath(Path(os.fspath(out)).expanduser())
    with guard(f"checking {out}"):
        if is_main:
            check_output(out, job, force=force)
    with guard("reading the checkpoints"):
        plan = plan_checkpoints(checkpoints, explicit_step=explicit_step, unsafe=unsafe)
        if select is not None:
            plan = select(plan)
    if job.settings.scratch_dir is None:  # scratch files of a disk basis go next to the results
        job = replace(job, settings=replace(job.settings, scratch_dir=str(Path(out).parent)))
    remove_stale_scratch(job.settings.scratch_dir)  # left by a killed run
    with guard("building the model and loading the data"):
        prepared = prepare(job, shard_batches=shard_batches)
    with guard("planning the memory"):
        prepared.plan = make_plan(prepared)
    if job.loss_label() is None and prepared.loss is not None:  # record the model's default loss by its name
        job = replace(job, loss=prepared.loss.name)
    if job.label is None and not os.path.exists(out):
        job = replace(job, label=Path(out).stem)
    writer = None
    # Per checkpoint, the (curvature, block) results still to compute; a checkpoint is done when none is missing.
    missing: list[tuple[tuple[str, str], ...]] = [prepared.kinds] * len(plan)
    try:
        with guard(f"opening {out}"):
            if is_main:
                config = job.config(device=str(prepared.device), world_size=world_size)
                make_parent(out)
                writer = ResultWriter(out, label=job.label, config=config, force=force)
                writer.check_kinds(prepared.kinds)
                missing = [writer.missing(c.step, c.sha256, prepared.kinds) for c in plan]
        done = [_agree(not wanted, all_reduce, prepared.device) for wanted in missing]
        if is_main:
            observer.planned(plan, done, prepared)
        todo = [item for item, is_done in zip(plan, done, strict=True) if not is_done]
        analysed, skipped, started = [], [], 0
        for item, is_done, wanted in zip(plan, done, missing, strict=True):
            if is_done:
                skipped.append(item)
                if is_main:
                    observer.skipped(item)
                continue
            if is_main:
                observer.started(item, started, len(todo))
            started += 1
            with guard(f"loading {item.path}"):
                sha256 = load_weights(prepared, item, unsafe=unsafe)
            # Here, for every checkpoint, rather than once: the free memory it measures changes between them.
            with guard(f"checking memory for step {item.step}"):
                check_lanczos_memory(prepared)
            results = analyze_loaded(
                prepared, item, sha256, all_reduce=all_reduce, progress=observer.lanczos_step if is_main else None
            )
            if verify is not None:
                for result in results:
                    whole_hessian = (result.curvature, result.block) == ("hessian", "all")
                    what = "" if whole_hessian else f" ({result.curvature}, {result.block})"
                    verify(result, f"step {item.step}{what}")
            # Every process computes all of the checkpoint's results (they share the passes); the main process
            # writes those the file lacks (others of the checkpoint may be stored from an earlier run).
            new = tuple(result for result in results if (result.curvature, result.block) in wanted)
            with guard(f"writing step {item.step} to {out}"):
                if writer is not None:
                    writer.write(new)
            analysed.extend(new)
            if is_main:
                observer.analysed(item, results)
                observer.finished(item, results[0])
    finally:
        if writer is not None:
            writer.close()
    return RunReport(out=out, analysed=tuple(analysed), skipped=tuple(skipped))
