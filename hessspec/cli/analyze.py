"""``hessspec analyze``: the Hessian spectrum of each checkpoint, in step order, into a resumable result file."""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from typing import Any

import click

from hessspec.cli._common import (
    CONTEXT_SETTINGS,
    can_encode,
    debug_option,
    describe_error,
    fmt_number,
    is_debug,
    tune_allocator_for,
)
from hessspec.cli._progress import ProgressLine, format_duration

_DEFAULTS = {  # hessspec.analysis.AnalysisSettings and hessspec.runner.job; kept here so --help needs no torch
    "batch_size": 128,
    "lanczos_steps": 90,
    "probes": 10,
    "top_k": 20,
}


class _AnalyzeCommand(click.Command):
    """Lists the model zoo and the dataset specs after the options (imported only when help is shown)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from hessspec.data.datasets import available_datasets
        from hessspec.models import describe_models

        with formatter.section("Models (--model)"):
            rows = list(describe_models().items())
            rows += [
                ("tv:NAME", "a torchvision model, built without pretrained weights"),
                ("timm:NAME", "a timm model, built without pretrained weights (needs hessspec[hf])"),
                (
                    "hf:DIR",
                    "a Hugging Face model saved with save_pretrained, loaded offline, never running code from DIR "
                    "(needs hessspec[hf]); its head sets the default loss",
                ),
                ("MODULE:FUNCTION", "your factory, importable from the current directory, or FILE.py:FUNCTION"),
            ]
            formatter.write_dl(rows)
        with formatter.section("Data (--data)"):
            formatter.write_text(", ".join(available_datasets()))
            formatter.write_paragraph()
            formatter.write_text(
                "ROOT is a directory in torchvision's layout; nothing is downloaded. --data-arg is taken by "
                "synthetic (shape, num_classes, size, data_seed), text (seq_len: tokens per sequence, default 128; "
                "tokenizer: a directory, default the hf:DIR model's), tokens (pad_id) and factories. text:FILE is a "
                "UTF-8 text cut into sequences, tokens:FILE an integer array [N, T] (.npy or .pt); --samples counts "
                "sequences. Attention of hf: and timm: models runs eager unless --model-arg "
                "attn_implementation=sdpa."
            )
        with formatter.section("Several processes"):
            formatter.write_text(
                "Many checkpoints: run N tasks with --shard I/N (or --shard slurm in an array job), then hessspec "
                "merge OUT.h5 OUT.shard-*-of-N.h5. One big checkpoint: torchrun --standalone --nproc-per-node G -m "
                "hessspec analyze ... splits the data by whole batches over G ranks (one per GPU with --device cuda; "
                "gloo with --device cpu); the result equals one process's to rounding and rank 0 writes the file. "
                "Templates: scripts/slurm/."
            )
        super().format_epilog(ctx, formatter)


def _parse_pairs(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    from hessspec.models import parse_model_args

    try:
        return parse_model_args(pairs)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _primal_cache(value: str) -> int | str:
    """``--primal-cache``: "auto", "off", or a size in bytes with an optional K/M/G/T suffix (powers of 1024)."""
    text = value.strip().lower()
    if text in ("auto", "off"):
        return text
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number, factor = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text.removesuffix("b"), 1)
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if not size >= 0:
        msg = f"--primal-cache must be auto, off or a size such as 8G or 500M; got {value!r}"
        raise click.BadParameter(msg)
    return int(size * factor)


def _choose(value: str | None, factory: str | None, option: str, factory_option: str) -> str:
    if value and factory:
        msg = f"give {option} or {factory_option}, not both"
        raise click.UsageError(msg)
    if not value and not factory:
        msg = f"missing {option} NAME (or {factory_option} MODULE:FUNCTION)"
        raise click.UsageError(msg)
    if factory is not None and ":" not in factory:
        msg = f"expected MODULE:FUNCTION, got {factory!r}"
        raise click.BadParameter(msg, param_hint=factory_option)
    return (value or factory).strip()


class _Reporter:
    """Turns pipeline events into the progress line (stderr) and one summary line per checkpoint (stdout)."""

    def __init__(self, out: str, quiet: bool, world_size: int = 1) -> None:
        from hessspec.runner.pipeline import Observer

        self.out = out
        self.quiet = quiet
        self.world_size = world_size
        self.progress = ProgressLine(sys.stderr, enabled=not quiet and sys.stderr.isatty())
        self.lam = "λ" if can_encode("λ") else "lambda"
        self.started = time.monotonic()
        self.results: tuple = ()
        reporter = self

        # Subclassed here, not at module level: hessspec.runner.pipeline imports torch, which `hessspec --help`
        # should not.
        class _Observer(Observer):
            def planned(self, plan, done, prepared) -> None:
                reporter.planned(plan, done, prepared)

            def skipped(self, item) -> None:
                reporter.say(f"step {item.step:>8}  already in {reporter.out} with these settings, skipped")

            def started(self, item, index, total) -> None:
                reporter.progress.start_checkpoint(index, item.step)

            def lanczos_step(self, done, total) -> None:
                reporter.progress.lanczos(done, total)

            def analysed(self, item, results) -> None:
                reporter.results = results

            def finished(self, item, result) -> None:
                reporter.progress.finish_checkpoint()
                # One line per curvature (its whole-model result); blocks are in the file (hessspec info).
                for each in [r for r in reporter.results if r.block == "all"] or [result]:
                    reporter.say(reporter.summary(each))

        self.observer = _Observer()

    def warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Show a warning as one line (``warnings.showwarning``), even with --quiet."""
        self.progress.echo(f"Warning: {' '.join(str(message).split())}", err=True)

    def say(self, line: str, err: bool = False) -> None:
        if not self.quiet:
            self.progress.echo(line, err=err)

    def planned(self, plan, done, prepared) -> None:
        todo = len(plan) - sum(done)
        self.progress.begin(todo)
        stored = f", {sum(done)} already in {self.out}" if any(done) else ""
        batches = prepared.total_batches
        ranks = f" over {self.world_size} ranks" if self.world_size > 1 else ""
        placement, memory_plan = getattr(prepared, "placement", None), getattr(prepared, "plan", None)
        self.say(
            f"analysing {todo} of {len(plan)} checkpoint(s){stored}: {prepared.job.model} "
            f"({prepared.num_params:,} parameters) on {prepared.job.data} ({prepared.total_examples:,} examples in "
            f"{batches} batch{'es' if batches != 1 else ''}{ranks}), {prepared.device}, {prepared.job.dtype}"
            + (f"; data: {prepared.batches.describe()} ({placement.reason})" if placement is not None else ""),
            err=True,
        )
        if memory_plan is not None:
            self.say(memory_plan.line(), err=True)

    def summary(self, result) -> str:
        ranks = [int(k) for k in result.overlap_k]
        rank = 10 if 10 in ranks else (max(ranks) if ranks else None)
        trusted = result.trusted_rank()  # r_k and λ1 only from converged pairs
        overlap = ""
        if rank is not None:
            overlap = f"  r_{rank} {fmt_number(result.overlap_at(rank), 3) if rank <= trusted else 'n.c.'}"
        lambda_1 = fmt_number(result.lambda_max) if trusted >= 1 else "n.c."
        return (
            f"step {result.step:>8}  loss {fmt_number(result.loss)}  {self.lam}1 {lambda_1}  "
            f"trace {fmt_number(result.trace)}{overlap}  {result.elapsed_s:.1f} s"
            + ("" if result.curvature == "hessian" else f"  [{result.curvature}]")
        )

    def close(self, report=None) -> None:
        self.progress.clear()
        if report is not None:
            elapsed = format_duration(time.monotonic() - self.started)
            checkpoints = len({(r.step, r.sha256) for r in report.analysed})
            self.say(
                f"done: {checkpoints} analysed, {len(report.skipped)} skipped, in {elapsed}; results in {report.out}",
                err=True,
            )


@click.command(
    cls=_AnalyzeCommand,
    context_settings=CONTEXT_SETTINGS,
    short_help="Compute the spectrum of each checkpoint into a result file.",
)
@click.argument("checkpoints", metavar="CHECKPOINT...", nargs=-1, required=True)
@click.option("--model", "model", metavar="NAME", help="Zoo model, tv:NAME or MODULE:FUNCTION (listed below).")
@click.option(
    "--model-factory", metavar="MODULE:FUNCTION", help="Your function returning the nn.Module (instead of --model)."
)
@click.option(
    "--model-arg", "model_args", metavar="KEY=VALUE", multiple=True,
    help="Model constructor argument (repeatable), e.g. width=32. Zoo models get num_classes from the data.",
)  # fmt: skip
@click.option("--data", "data", metavar="NAME[:ROOT]", help="Dataset: digits, cifar10:ROOT, ... (listed below).")
@click.option(
    "--data-factory",
    metavar="MODULE:FUNCTION",
    help="Your function returning a Dataset: (input, label) pairs, tuples (input first) or dicts of tensors.",
)
@click.option(
    "--data-arg", "data_args", metavar="KEY=VALUE", multiple=True,
    help="Argument of 'synthetic' or of the data factory (repeatable).",
)  # fmt: skip
@click.option(
    "--loss", type=click.Choice(["cross-entropy", "mse", "nll", "lm"]), default=None,
    show_default="the hf: model's head's, else cross-entropy",
    help="Loss averaged over the data. cross-entropy: logits [batch, classes] vs integer labels. mse: squared "
    "error summed over each example's outputs, averaged over examples (a unit-variance Gaussian's negative "
    "log-likelihood times 2, so the Hessian does not shrink as outputs are added; torch's F.mse_loss, which also "
    "averages over outputs, gives this Hessian divided by the outputs per example). nll: log-probabilities vs "
    "labels. lm: next-token cross-entropy, logits [batch, T, vocab] at t vs labels (else input_ids) at t+1, "
    "ignoring label -100 and padding (attention_mask 0), averaged over all target tokens of the data. Targets: "
    "an item's 2nd element, or its 'labels' entry.",
)  # fmt: skip
@click.option(
    "--loss-factory", metavar="MODULE:FUNCTION",
    help="Your loss f(output, batch) -> scalar: the batch's mean over its examples, any batch structure, targets or "
    "none (e.g. a PDE residual); or FILE.py:FUNCTION. Instead of --loss.",
)  # fmt: skip
@click.option(
    "--samples", type=click.IntRange(min=1), default=None, show_default="all",
    help="Analyse this many examples, a subset drawn with --seed.",
)  # fmt: skip
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=_DEFAULTS["batch_size"],
    help="Examples per batch; with --bn-mode train use the training batch size.",
)  # fmt: skip
@click.option(
    "--lanczos-steps", type=click.IntRange(min=1), default=_DEFAULTS["lanczos_steps"],
    help="Lanczos steps per probe (Ghorbani et al. 2019 use 90).",
)  # fmt: skip
@click.option(
    "--probes", type=click.IntRange(min=1), default=_DEFAULTS["probes"],
    help="Random probe vectors (Ghorbani et al. 2019 use 10).",
)  # fmt: skip
@click.option(
    "--top-k", type=click.IntRange(min=1), default=_DEFAULTS["top_k"],
    help="Top eigenpairs kept, and the largest rank k of the gradient overlap r_k.",
)  # fmt: skip
@click.option(
    "--bn-mode", type=click.Choice(["train", "eval", "population"]), default="train",
    help="BatchNorm statistics: of each batch (as trained), running (stored), or recomputed over the data.",
)  # fmt: skip
@click.option(
    "--dtype", type=click.Choice(["float32", "float64", "bfloat16"]), default="float32",
    help="Precision of the model evaluation (products accumulate, and Lanczos runs, in float64); float64 for "
    "exactness on small models; the README gives what float32 and bfloat16 cost in accuracy.",
)  # fmt: skip
@click.option(
    "--tf32", is_flag=True,
    help="Allow TensorFloat-32 products on CUDA (faster float32 on Ampere and later; no effect on the CPU).",
)  # fmt: skip
@click.option(
    "--device", default="auto", metavar="auto|cpu|cuda|cuda:I",
    help="Where the Hessian products run; auto is cuda if available, else cpu.",
)  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the probes and of the --samples subset.")
@click.option("--params", metavar="REGEX", default=None, show_default="all",
              help="Only parameters whose names match (re.search), e.g. 'layers\\.4\\.'.")  # fmt: skip
@click.option(
    "--basis-dtype", type=click.Choice(["float64", "float32"]), default="float64",
    help="Storage of the Lanczos vectors (float32 halves their memory).",
)  # fmt: skip
@click.option(
    "--basis-device", type=click.Choice(["same", "cpu"]), default="same",
    help="Older spelling: cpu is --basis-placement host.",
)  # fmt: skip
@click.option(
    "--hvp-strategy", "block_strategy", type=click.Choice(["auto", "traced", "vmap", "loop", "reverse"]),
    default="auto",
    help="How one data pass serves all probes: traced (forward-over-reverse traced once, the primal kept across "
    "passes, tangents per probe), vmap (torch.func, primal once per pass), loop (a pass per probe), reverse (plain "
    "autograd, double backward); auto picks traced (reverse on the CPU for attention) and falls back to vmap, then "
    "reverse, for models it cannot trace or torch.func cannot transform. Changes rounding only.",
)  # fmt: skip
@click.option(
    "--primal-cache", "primal_cache", default="auto", show_default=True, metavar="auto|off|SIZE",
    callback=lambda _ctx, _param, value: _primal_cache(value),
    help="Memory for keeping each batch's primal results (forward pass, gradient, what the tangents read) across "
    "the passes of the traced strategy: auto is a quarter of the available memory, SIZE e.g. 8G or 500M. Batches "
    "past it are recomputed every pass. Changes no number.",
)  # fmt: skip
@click.option(
    "--compile", "compile_products", is_flag=True,
    help="Evaluate the per-batch products through torch.compile (inductor): compiles once per shape (seconds to "
    "minutes), then may run faster; falls back to eager with one warning where compilation fails; the Gauss-Newton "
    "family stays eager. Changes rounding only.",
)  # fmt: skip
@click.option(
    "--curvature", "curvatures", multiple=True, default=("hessian",), show_default=True,
    type=click.Choice(["hessian", "ggn", "empirical-fisher", "gradient-covariance", "residual"]),
    help="Matrix to analyse (repeatable; all share the data passes): the Hessian H, the generalised Gauss-Newton G "
    "(the Fisher for cross-entropy), the empirical Fisher F, the gradient covariance F - gg^T, the residual H - G.",
)  # fmt: skip
@click.option(
    "--blocks", "blocks", multiple=True, metavar="tensors|modules|NAME=REGEX",
    help="Also analyse the diagonal block of each parameter group (repeatable; in the same data passes): one per "
    "parameter tensor, one per module, or the parameters whose names match REGEX. Parameters in no group are left "
    "out of the blocks; overlapping groups are an error.",
)  # fmt: skip
@click.option(
    "--crosscheck/--no-crosscheck", default=False, show_default=True,
    help="Also run a Lanczos chain started from the gradient (its spectral measure, an independent check of the "
    "overlap; one more column in every product).",
)  # fmt: skip
@click.option(
    "--data-placement", type=click.Choice(["auto", "device", "host", "stream"]), default="auto",
    help="Where the data live between passes: stacked on the device, stacked in host memory (copied batch by batch, "
    "the next prefetched), or read afresh each pass by a DataLoader (any size; images decoded on the fly). auto "
    "picks from the free memory and says which. Changes no number.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=0), default=2,
    help="DataLoader worker processes of --data-placement stream (0: read in the main process).",
)  # fmt: skip
@click.option(
    "--basis-placement", type=click.Choice(["auto", "device", "host", "disk"]), default="auto",
    help="Where the Lanczos vectors live: on the device, in host memory, or in a memory-mapped scratch file "
    "(removed after the run); reorthogonalisation reads them back in chunks. auto: the first that holds them. "
    "Changes no number.",
)  # fmt: skip
@click.option(
    "--scratch", "scratch", metavar="DIR", default=None, show_default="the result file's directory",
    help="Directory of the scratch files of --basis-placement disk.",
)  # fmt: skip
@click.option(
    "--probes-per-pass", type=click.IntRange(min=1), default=None, show_default="all",
    help="Evaluate at most G Lanczos chains (probes, then the gradient chain) per data pass, when the activations "
    "of all at once do not fit; the groups run one after another. Changes no stored number.",
)  # fmt: skip
@click.option(
    "--step", type=click.IntRange(min=0), default=None,
    help="Step of a file that stores none and has no number in its name.",
)  # fmt: skip
@click.option("--unsafe-load", is_flag=True, help="Allow checkpoints that run code when loaded (trusted files only).")
@click.option(
    "--label", default=None, show_default="the file's, or its name", help="Name of the run in plots and tables."
)
@click.option("--out", "out", required=True, metavar="FILE.h5", help="Result file, created or resumed.")
@click.option("--force", is_flag=True, help="Accept a result file written with other settings and recompute.")
@click.option(
    "--shard", metavar="I/N|slurm", default=None,
    help="Analyse only the I-th (0-based) of N disjoint shards of the step-ordered checkpoints, into "
    "OUT.shard-I-of-N.h5 ('slurm': from SLURM_ARRAY_TASK_ID/COUNT); join the files with hessspec merge.",
)  # fmt: skip
@click.option(
    "--dry-run", is_flag=True,
    help="Print the memory plan and the estimated time per checkpoint (from one timed batch) and stop: nothing is "
    "analysed or written.",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="Print errors only: no progress, no summary lines.")
@debug_option
def analyze(
    checkpoints: tuple[str, ...],
    model: str | None,
    model_factory: str | None,
    model_args: tuple[str, ...],
    data: str | None,
    data_factory: str | None,
    data_args: tuple[str, ...],
    loss: str | None,
    loss_factory: str | None,
    samples: int | None,
    batch_size: int,
    lanczos_steps: int,
    probes: int,
    top_k: int,
    bn_mode: str,
    dtype: str,
    tf32: bool,
    device: str,
    seed: int,
    params: str | None,
    basis_dtype: str,
    basis_device: str,
    block_strategy: str,
    compile_products: bool,
    primal_cache: int | str,
    curvatures: tuple[str, ...],
    blocks: tuple[str, ...],
    crosscheck: bool,
    data_placement: str,
    workers: int,
    basis_placement: str,
    scratch: str | None,
    probes_per_pass: int | None,
    step: int | None,
    unsafe_load: bool,
    label: str | None,
    out: str,
    force: bool,
    shard: str | None,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Analyse the Hessian spectrum of each CHECKPOINT (files, directories or globs), in training-step order.

    Each checkpoint's result is in FILE.h5 as soon as it is computed; rerunning the same command skips the
    checkpoints already there and finishes the others. A progress line goes to stderr (on a terminal) and one line
    per checkpoint to stdout: step, loss, top eigenvalue, trace, gradient overlap r_10 and seconds. Under torchrun
    the ranks share each checkpoint's data and rank 0 reports; see 'Several processes' below.
    """
    from hessspec.analysis import AnalysisSettings
    from hessspec.results import HessspecWarning
    from hessspec.runner.pipeline import AnalysisJob, run

    model_spec = _choose(model, model_factory, "--model", "--model-factory")
    data_spec = _choose(data, data_factory, "--data", "--data-factory")
    if loss and loss_factory:
        raise click.UsageError("give --loss or --loss-factory, not both")
    if loss_factory is not None and ":" not in loss_factory:
        msg = f"expected MODULE:FUNCTION, got {loss_factory!r}"
        raise click.BadParameter(msg, param_hint="--loss-factory")
    job = AnalysisJob(
        model=model_spec,
        data=data_spec,
        model_args=_parse_pairs(model_args, "--model-arg"),
        data_args=_parse_pairs(data_args, "--data-arg"),
        samples=samples,
        batch_size=batch_size,
        bn_mode=bn_mode,
        dtype=dtype,
        tf32=tf32,
        device=device,
        params=params,
        block_strategy=block_strategy,
        compile=compile_products,
        primal_cache=primal_cache,
        loss=loss,
        loss_factory=loss_factory.strip() if loss_factory else None,
        data_placement=data_placement,
        workers=workers,
        settings=AnalysisSettings(
            lanczos_steps=lanczos_steps,
            probes=probes,
            top_k=top_k,
            seed=seed,
            basis_dtype=basis_dtype,
            basis_device=basis_device,
            gradient_crosscheck=crosscheck,
            probes_per_pass=probes_per_pass,
            curvatures=tuple(dict.fromkeys(curvatures)),
            blocks=_check_blocks(blocks),
            basis_placement=basis_placement,
            scratch_dir=scratch,
        ),
        label=label,
    )
    from hessspec.analysis import resolvable_top_k, top_k_limit_reason

    if top_k > resolvable_top_k(job.settings):
        limit = resolvable_top_k(job.settings)
        msg = f"--top-k {top_k} is more than {limit}: {top_k_limit_reason(job.settings)}"
        raise click.BadParameter(msg, param_hint="--top-k")
    import functools

    from hessspec.runner import distributed, shards

    shard_spec = None
    if shard is not None:
        try:
            shard_spec = shards.parse_shard(shard)
        except shards.ShardError as error:
            raise click.BadParameter(str(error), param_hint="--shard") from None
        out = str(shards.shard_output_path(out, shard_spec))
    if dry_run:
        _dry_run(job, checkpoints, step, unsafe_load)
        return
    ctx = distributed.init_from_env(device)  # under torchrun (WORLD_SIZE > 1): this rank's context
    hooks = {}
    if ctx is not None:
        job = dataclasses.replace(job, device=str(ctx.device))
        hooks = distributed.pipeline_hooks(ctx)
    tune_allocator_for(job.device)
    reporter = _Reporter(out, quiet or (ctx is not None and not ctx.is_main), 1 if ctx is None else ctx.world_size)
    report = None
    with warnings.catch_warnings():
        # torch.func loads its decompositions through the deprecated torch.jit.script (torch-internal noise).
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        warnings.simplefilter("always", HessspecWarning)
        warnings.showwarning = reporter.warning
        try:
            report = run(
                job,
                checkpoints,
                out,
                force=force,
                explicit_step=step,
                unsafe=unsafe_load,
                observer=reporter.observer,
                select=functools.partial(shards.select_shard, spec=shard_spec) if shard_spec else None,
                **hooks,
            )
        except Exception as error:
            if ctx is None or ctx.is_main or is_debug(click.get_current_context(silent=True)):
                raise
            if _known_to_all_ranks(error):
                raise click.exceptions.Exit(1) from None  # rank 0 prints the same message
            raise click.ClickException(f"rank {ctx.rank}: {describe_error(error)}") from None
        finally:
            reporter.close(report)
            distributed.shutdown(ctx)


def _check_blocks(blocks: tuple[str, ...]) -> tuple[str, ...]:
    from hessspec.curvature.blocks import BlockError, check_block_specs

    try:
        return check_block_specs(blocks)
    except BlockError as error:
        raise click.BadParameter(
            str(error).removeprefix("--blocks: ").removeprefix("--blocks "), param_hint="--blocks"
        ) from None


def _dry_run(job, checkpoints: tuple[str, ...], step: int | None, unsafe: bool) -> None:
    from hessspec.runner.pipeline import dry_run

    tune_allocator_for(job.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        plan, prepared, planned = dry_run(job, checkpoints, explicit_step=step, unsafe=unsafe)
    click.echo(plan.line())
    seconds = plan.seconds_per_checkpoint()
    passes = 1 + plan.lanczos_steps * plan.rounds
    click.echo(
        f"estimated time per checkpoint: {format_duration(seconds)} ({len(planned)} checkpoint(s) planned; from one "
        f"timed batch of step {planned[0].step} on {plan.device}: product {plan.product_s:.3g} s with "
        f"{plan.columns_per_pass} column(s), gradient {plan.gradient_s:.3g} s; {plan.batches} batches x {passes} "
        "passes); nothing analysed"
    )


def _known_to_all_ranks(error: BaseException) -> bool:
    # Failures inside the pipeline's sync blocks arrive as the same DistributedError on every rank; the other
    # ValueErrors (settings), FloatingPointError (sums are all-reduced: every rank sees the NaN) and
    # DeterminismError (checked on the all-reduced gradient) are raised alike by every rank. Anything else (CUDA
    # out of memory, a broken connection) may be this rank's alone, and would be lost if only rank 0 spoke.
    from hessspec.curvature.hessian import DeterminismError

    return isinstance(error, (ValueError, ArithmeticError, DeterminismError))
