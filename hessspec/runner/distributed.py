"""Data-parallel analysis: one checkpoint's Hessian products spread over ranks with torch.distributed.

Data parallel (one checkpoint, many GPUs). Under ``torchrun`` every rank holds a contiguous block of whole batches of
the analysed set (:meth:`DistributedContext.shard_batches`); :class:`~hessspec.curvature.hessian.HessianOperator` sums
sizes, loss, gradient, Hessian products and population BatchNorm statistics across ranks with
:meth:`DistributedContext.all_reduce`, weighted by the global number of examples, so the operator is the single-process
one. Whole batches keep BatchNorm's per-mini-batch statistics (``bn_mode="train"``) exactly as in one process. The
probes come from a seeded CPU generator and an all-reduce hands every rank the same sum, so the Lanczos state is
identical on every rank; only the order of the cross-rank sum differs from the single-process loop, which changes
results by rounding only (~1e-15 relative in float64). :func:`verify_identical` checks the identity after each
checkpoint (:func:`pipeline_hooks` wires all of this into :func:`hessspec.runner.pipeline.run`).

Failures. A rank-local failure (a truncated checkpoint, a model that does not fit) must not leave the other ranks
waiting in a collective. Code that may fail on one rank only runs inside :func:`sync_errors`: at the end of the block
every rank learns of every rank's error and all raise the same :class:`DistributedError` (``"rank 1: checkpoint ... is
truncated"``). Non-finite losses or products need nothing: sums are all-reduced, so every rank sees the NaN. Whatever
escapes (a rank dying inside a collective) is ended by ``torchrun``, which stops all workers when one fails, and by the
process-group timeout (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S`).

Array jobs (many checkpoints, many tasks, one process each) are :mod:`hessspec.runner.shards`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from hessspec.data.placement import BatchSource

T = TypeVar("T")

TIMEOUT_ENV = "HESSSPEC_DIST_TIMEOUT_S"
# Longest wait of one collective for the slowest rank. One pass over CIFAR-10 with a ResNet takes a minute or two
# on a GPU; half an hour leaves room for slow ranks and big models and still ends a hung job.
DEFAULT_TIMEOUT_S = 1800.0
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """A rank failed (raised on every rank, with the failing ranks' messages), or the distributed setup is bad.

    A ``ValueError`` like the library's other errors, so that front ends show its message as a user error.
    """


# --------------------------------------------------------------------------------------------------------------
# Data parallel


@dataclass(frozen=True)
class DistributedContext:
    """One process of a data-parallel analysis (an initialised default process group).

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
        device: the device this rank computes on (``cuda:<local_rank>`` on GPUs).
        backend: the process-group backend, "nccl" (CUDA devices) or "gloo".
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes results and shows progress."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it. Every rank receives the same (bitwise) sum.

        Under NCCL a tensor off the rank's GPU is summed through a temporary copy on it.
        """
        if self.backend == "nccl" and tensor.device != self.device:
            staged = tensor.to(self.device)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
            return tensor
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def batch_range(self, num_batches: int) -> tuple[int, int]:
        """This rank's block ``[start, stop)`` of ``num_batches`` batches: ``[r B / W, (r + 1) B / W)``.

        Raises:
            DistributedError: fewer batches than ranks (a rank would have no data).
        """
        if num_batches < self.world_size:
            msg = (
                f"{num_batches} batch(es) cannot be shared by {self.world_size} ranks (each rank needs at least one "
                "whole batch); use a smaller --batch-size, more --samples or fewer ranks"
            )
            raise DistributedError(msg)
        return self.rank * num_batches // self.world_size, (self.rank + 1) * num_batches // self.world_size

    def example_range(self, num_examples: int, batch_size: int) -> tuple[int, int]:
        """This rank's examples ``[start, stop)`` when ``num_examples`` are cut into batches of ``batch_size``.

        Materialising only these examples with the same ``batch_size`` gives exactly this rank's batches of
        :meth:`shard_batches` (each rank then keeps only its share of the data on its device).

        Raises:
            DistributedError: fewer batches than ranks.
        """
        if batch_size < 1 or num_examples < 1:
            msg = f"need a positive number of examples and batch size; got {num_examples} and {batch_size}"
            raise DistributedError(msg)
        start, stop = self.batch_range(-(-num_examples // batch_size))
        return start * batch_size, min(stop * batch_size, num_examples)

    def shard_batches(self, batches: Sequence[T] | BatchSource) -> list[T] | BatchSource:
        """This rank's contiguous block of whole batches (see :meth:`batch_range`).

        Whole batches keep BatchNorm's per-mini-batch statistics as in one process; contiguous blocks keep the
        order of the per-rank sums fixed.

        Raises:
            DistributedError: fewer batches than ranks.
        """
        start, stop = self.batch_range(len(batches))
        part = batches[start:stop]  # a BatchSource (any data placement) gives a source of its share
        return part if isinstance(part, BatchSource) else list(part)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s (picklable) ``obj``, on every rank; other ranks' arguments are ignored."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        msg = f"environment variable {name}={raw!r} is not an integer (set by torchrun)"
        raise DistributedError(msg) from None


def _timeout_s(env: Mapping[str, str], timeout_s: float | None) -> float:
    if timeout_s is not None:
        value: Any = timeout_s
    else:
        value = env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0:
        msg = f"the distributed timeout must be a positive number of seconds ({TIMEOUT_ENV}); got {value!r}"
        raise DistributedError(msg)
    return seconds


def _rank_device(device: str | torch.device | None, local_rank: int, local_world_size: int) -> torch.device:
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(spec)
    except (RuntimeError, ValueError):
        msg = f"unknown device {device!r}; expected auto, cpu, cuda or cuda:INDEX"
        raise DistributedError(msg) from None
    if chosen.type != "cuda":
        return chosen
    count = torch.cuda.device_count()
    if count == 0:
        msg = f"device {spec!r} asked for, but this rank (local rank {local_rank}) sees no CUDA device"
        raise DistributedError(msg)
    if chosen.index is None:
        # torchrun starts one process per GPU; under srun with one visible GPU per task, that GPU is cuda:0.
        return torch.device("cuda", local_rank % count)
    if local_world_size > 1:
        msg = (
            f"device {spec!r} names one GPU, but {local_world_size} ranks run on this node and would share it; "
            "give --device cuda and each rank uses cuda:LOCAL_RANK"
        )
        raise DistributedError(msg)
    return chosen


def init_from_env(
    device: str | torch.device | None = None,
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedContext | None:
    """Join the process group that ``torchrun`` describes in the environment, or return None for one process.

    With ``WORLD_SIZE`` > 1 (torchrun also sets ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``; multi-node runs use the usual rendezvous options of torchrun), initialises the default
    process group: backend ``nccl`` for CUDA devices, ``gloo`` otherwise, with a timeout on every collective.

    Args:
        device: the requested device: "cuda" (each rank uses ``cuda:LOCAL_RANK``), "cpu", "auto"/None (CUDA if
            available), or an explicit "cuda:K" (only with one rank per node).
        timeout_s: longest wait of a collective; default ``$HESSSPEC_DIST_TIMEOUT_S`` or 1800 s.
        env: the environment to read (default ``os.environ``).

    Returns:
        The context of this rank, or None when ``WORLD_SIZE`` is unset or 1.

    Raises:
        DistributedError: incomplete or malformed torchrun variables, no GPU for a CUDA rank, a process group
            already initialised with another world size, or a failed rendezvous.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    world_size = _env_int(env, "WORLD_SIZE")
    if world_size < 1:
        msg = f"WORLD_SIZE must be >= 1; got {world_size}"
        raise DistributedError(msg)
    if world_size == 1:
        return None
    missing = [name for name in _TORCHRUN_VARIABLES if name not in env]
    if missing:
        msg = (
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch the ranks with torchrun "
            "(torchrun --nproc-per-node N -m hessspec analyze ...)"
        )
        raise DistributedError(msg)
    rank, local_rank = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    if not 0 <= rank < world_size:
        msg = f"RANK={rank} must lie in 0..WORLD_SIZE-1 ({world_size - 1})"
        raise DistributedError(msg)
    local_world_size = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
    chosen = _rank_device(device, local_rank, local_world_size)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    timeout = timedelta(seconds=_timeout_s(env, timeout_s))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            msg = (
                f"a process group is already initialised (rank {dist.get_rank()} of {dist.get_world_size()}), "
                f"not rank {rank} of {world_size}"
            )
            raise DistributedError(msg)
    else:
        kwargs: dict[str, Any] = {"device_id": chosen} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kwargs)
        except (RuntimeError, ValueError) as error:
            msg = (
                f"rank {rank} of {world_size} could not join the process group at "
                f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} ({backend}): {error}"
            )
            raise DistributedError(msg) from error
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen, backend=backend)


def shutdown(ctx: DistributedContext | None) -> None:
    """Leave the process group (no-op for None or when it is already gone). Call it in a ``finally``."""
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def agree_or_raise(ctx: DistributedContext | None, error: BaseException | None, what: str = "") -> None:
    """Sync point: every rank reports whether it failed; if any did, every rank raises the same error.

    Every rank must call this the same number of times (it is a collective). Without a context it re-raises
    ``error`` (if any) unchanged.

    Args:
        ctx: the distributed context, or None for one process.
        error: this rank's failure since the last sync point, or None.
        what: what the ranks were doing ("loading checkpoint ckpt_100.pt"), for the message.

    Raises:
        DistributedError: on every rank, when any rank failed; the message names each failing rank with its
            message, e.g. ``"rank 1: CheckpointError: checkpoint '...' is truncated"`` (ranks with the same
            message are listed together); on a failing rank it is chained to the rank's own exception.
        BaseException: ``error`` itself when ``ctx`` is None.
    """
    if ctx is None:
        if error is not None:
            raise error
        return
    mine = None if error is None else _describe(error)
    reports = ctx.all_gather_object(mine)
    failed = [(rank, message) for rank, message in enumerate(reports) if message is not None]
    if not failed:
        return
    where = f" while {what}" if what else ""
    by_message: dict[str, list[int]] = {}
    for rank, message in failed:
        by_message.setdefault(message, []).append(rank)
    details = "; ".join(f"{_ranks(ranks)}: {message}" for message, ranks in by_message.items())
    msg = f"{len(failed)} of {ctx.world_size} ranks failed{where}: {details}"
    raise DistributedError(msg) from error


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


@contextlib.contextmanager
def sync_errors(ctx: DistributedContext | None, what: str = "") -> Iterator[None]:
    """Run a block that may fail on some ranks only; at its end all ranks agree (:func:`agree_or_raise`).

    The block must not enter collectives that a failing rank would skip (loading files, building the model,
    checking memory, writing results on rank 0 are the intended contents). Without a context, exceptions pass
    through unchanged. ``KeyboardInterrupt`` and ``SystemExit`` are not caught.

    Raises:
        DistributedError: on every rank when the block raised on any rank.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as caught:
        if ctx is None:
            raise
        error = caught
    agree_or_raise(ctx, error, what)


def on_main(ctx: DistributedContext | None, fn: Callable[[], T], what: str = "") -> T:
    """Call ``fn`` on rank 0 only (opening the result file, checking what is already stored, writing a result)
    and give its (picklable) return value to every rank; a failure on rank 0 is raised on every rank.

    Raises:
        DistributedError: on every rank when ``fn`` raised (with a context).
    """
    if ctx is None:
        return fn()
    value = None
    with sync_errors(ctx, what):
        if ctx.is_main:
            value = fn()
    return ctx.broadcast_object(value)


def result_fingerprint(result: Any) -> str:
    """SHA-256 of the numbers of a :class:`hessspec.results.CheckpointResult` (arrays and scalar statistics).

    Bitwise equal on every rank of a correct data-parallel run; compare with :func:`verify_identical`.
    """
    digest = hashlib.sha256()
    for name in ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2"):
        array = np.ascontiguousarray(np.asarray(getattr(result, name), dtype=np.float64))
        digest.update(name.encode())
        digest.update(array.tobytes())
    for name in ("loss", "grad_norm", "trace"):
        digest.update(np.float64(getattr(result, name)).tobytes())
    return digest.hexdigest()


def verify_identical(ctx: DistributedContext | None, fingerprint: str, what: str = "the result") -> None:
    """Check that every rank holds the same ``fingerprint`` (e.g. :func:`result_fingerprint` of its result).

    Different fingerprints mean the Lanczos state diverged between ranks (nondeterministic kernels, different
    hardware), which makes the cross-rank sums meaningless.

    Raises:
        DistributedError: on every rank when the ranks disagree.
    """
    if ctx is None:
        return
    prints = ctx.all_gather_object(fingerprint)
    if len(set(prints)) > 1:
        groups = {p: [r for r, q in enumerate(prints) if q == p] for p in prints}
        detail = "; ".join(f"ranks {ranks}: {p[:12]}" for p, ranks in groups.items())
        msg = (
            f"the ranks computed different values for {what} ({detail}); their Lanczos states diverged "
            "(nondeterministic kernels or mixed hardware); rerun on one device or identical GPUs"
        )
        raise DistributedError(msg)


def pipeline_hooks(ctx: DistributedContext) -> dict[str, Any]:
    """The data-parallel keyword arguments of :func:`hessspec.runner.pipeline.run` for this rank.

    ``all_reduce``, ``is_main`` and ``shard_batches`` from ``ctx``; ``sync`` runs a block under
    :func:`sync_errors`; ``verify`` checks after each checkpoint that every rank holds the same result
    (:func:`verify_identical` of :func:`result_fingerprint`); ``world_size`` is recorded in the result file.
    """

    def verify(result: Any, what: str) -> None:
        verify_identical(ctx, result_fingerprint(result), what)

    return {
        "all_reduce": ctx.all_reduce,
        "is_main": ctx.is_main,
        "shard_batches": ctx.shard_batches,
        "sync": functools.partial(sync_errors, ctx),
        "verify": verify,
        "world_size": ctx.world_size,
    }
