"""The GPU measurements of hessspec in one run, written as markdown ready for benchmarks/RESULTS.md.

1. HVP cost on CIFAR ResNet-32 (the zoo's ``cifar-resnet32``, 0.46M parameters) with and without BatchNorm: one
   batch of 128 CIFAR-shaped examples, the product of 1 and of 10 columns (probes) against the batch gradient, with
   the model in float32, float32 with TF32, and bfloat16 (products accumulated in float64), eager; and compiled
   (``--compile``: ``torch.compile``, inductor) in float32 and bfloat16 at 10 columns only. A compiled graph has
   static shapes, so 1 and 10 columns would be two graphs, and compiling ResNet-32's product takes about a minute
   per graph: four compiled cells fit the 8 minutes of ``gpu_check.sh``, twelve would not. Each compiled cell
   gives its cost per column against the same eager gradient, its compile time (the first call less a timed one)
   and its relative difference to the eager product; a cell that fails, or falls back to eager, says why in the
   table; one that would start with less than ``--compile-s`` of ``--budget-s`` left is skipped and says so.
2. A timed part of a full-size SLQ: m = 90 Lanczos steps, 10 probes plus the gradient chain, 50,000 CIFAR-shaped
   examples (391 batches of 128): a few batches of the 11-column product and of the gradient are timed, plus the
   Lanczos work of one step at this n (reorthogonalisation against 90 vectors per chain), and extrapolated to
   the whole run: 2 gradient passes + 90 product passes of 391 batches + 90 Lanczos steps.

``--tiny --device cpu`` runs every part at toy size (ResNet-8 on 8x8 images; the compiled float32 cell of the no-BN
model only, compiling being slow on the CPU; a test runs it, so this script cannot rot); the numbers are then
meaningless. The markdown file is rewritten after each part, so a run stopped by its time limit keeps what it
measured. Run it through ``benchmarks/gpu_check.sh``, which also runs the CUDA tests.

    python benchmarks/gpu_check.py --out gpu_check.md [--device cuda] [--tiny] [--budget-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
import warnings
from pathlib import Path

import torch
from hvp import _sync  # shared timing helpers (the script's folder is on sys.path)
from hvp import timed as _median_time

from hessspec.curvature.compiled import first_line
from hessspec.curvature.hessian import HessianOperator
from hessspec.data.placement import DeviceBatches
from hessspec.linalg.lanczos import LanczosChains
from hessspec.models.cifar_resnet import CifarResNet
from hessspec.results import HessspecWarning
from hessspec.runtime import set_tf32

PRECISIONS = (
    ("float32", torch.float32, False),
    ("float32 + TF32", torch.float32, True),
    ("bfloat16", torch.bfloat16, False),
)
COMPILED = ("float32", "bfloat16")  # the precision rows that get a compiled column (see the module docstring)


SIZE = {"image": 32, "depth": 32}  # --tiny: 8x8 images, ResNet-8


def _batch(examples: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 3, SIZE["image"], SIZE["image"], generator=g)
    return x.to(device), torch.randint(0, 10, (examples,), generator=g).to(device)


def _resnet(batch_norm: bool) -> tuple[str, torch.nn.Module]:
    """The zoo's CIFAR ResNet of depth ``SIZE["depth"]`` (6 n + 2), seeded, and its name."""
    torch.manual_seed(0)
    depth = SIZE["depth"]
    name = f"cifar-resnet{depth}{'' if batch_norm else '-nobn'}"
    return name, CifarResNet(blocks_per_stage=(depth - 2) // 6, batch_norm=batch_norm)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {platform.platform()}"


HVP_HEADER = [
    "| model | model dtype | gradient (ms/batch) | 1 column (x gradient) | 10 columns (x gradient per column) "
    "| compiled: 10 columns (x eager gradient per column) | compile (s) | compiled vs eager (rel. diff.) |",
    "|---|---|---|---|---|---|---|---|",
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def eager_rows(device: torch.device, batch_size: int, repeats: int) -> list[dict]:
    """One row per (model, precision): the eager gradient and the products of 1 and 10 columns."""
    rows = []
    batch = _batch(batch_size, device)
    for batch_norm in (False, True):
        for label, dtype, tf32 in PRECISIONS:
            name, model = _resnet(batch_norm)
            row = {"model": name, "label": label, "batch_norm": batch_norm, "dtype": dtype, "tf32": tf32}
            rows.append(row)
            set_tf32(tf32)
            try:
                model = model.to(device)
                op = HessianOperator(model, DeviceBatches([batch], device), dtype=dtype, block_strategy="auto")
                V = torch.randn(op.n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                V = V.to(device)
                row["grad_s"] = _median_time(op.loss_and_gradient, device, repeats)
                row["one"] = _median_time(lambda op=op, V=V: op.matmat(V[:, :1]), device, repeats) / row["grad_s"]
                row["ten"] = _median_time(lambda op=op, V=V: op.matmat(V), device, repeats) / 10 / row["grad_s"]
                row["strategy"] = op.block_strategy
                if label in COMPILED:
                    row["V"], row["HV"] = V, op.matmat(V)  # the compiled product is compared with this one
            except Exception as error:  # one failing precision must not hide the others
                row["failed"] = first_line(error)[:100].replace("|", "/")
            finally:
                set_tf32(False)
    return rows


def compile_row(row: dict, device: torch.device, batch_size: int, repeats: int) -> None:
    """The compiled 10-column product of ``row``'s model and precision: cost, compile time, difference to eager."""
    set_tf32(row["tf32"])
    try:
        _, model = _resnet(row["batch_norm"])
        batches = DeviceBatches([_batch(batch_size, device)], device)
        op = HessianOperator(model.to(device), batches, dtype=row["dtype"], block_strategy="auto", compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HessspecWarning)  # a fallback is reported in the table instead
            _sync(device)
            t0 = time.perf_counter()
            HV = op.matmat(row["V"])  # compiles
            _sync(device)
            first = time.perf_counter() - t0
        if op.compile_fallback is not None:
            row["compiled"] = f"ran eagerly: {op.compile_fallback[:100].replace('|', '/')}"
            return
        t10 = _median_time(lambda: op.matmat(row["V"]), device, repeats)
        row["compiled"] = f"{t10 / 10 / row['grad_s']:.2f} | {first - t10:.0f} | {_relative(HV, row['HV']):.1e}"
    except Exception as error:  # reported in its row; the other rows go on
        row["compiled"] = f"failed: {first_line(error)[:100].replace('|', '/')}"
    finally:
        set_tf32(False)


def hvp_table(rows: list[dict]) -> list[str]:
    lines = list(HVP_HEADER)
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['label']} | failed: {r['failed']} | | | | | |")
            continue
        compiled = r.get("compiled", "not compiled | |" if r["label"] not in COMPILED else "not run | |")
        if compiled.count("|") < 2:  # a message: one cell, two empty ones
            compiled += " | |"
        lines.append(
            f"| {r['model']} | {r['label']} | {1e3 * r['grad_s']:.1f} | {r['one']:.2f} | {r['ten']:.2f} "
            f"({r['strategy']}) | {compiled} |"
        )
    return lines


def slq_extrapolation(
    device: torch.device, batch_size: int, examples: int, steps: int, probes: int, timed_batches: int
) -> list[str]:
    _, model = _resnet(batch_norm=True)
    model = model.to(device)
    batches = [_batch(batch_size, device, seed=i) for i in range(timed_batches)]
    op = HessianOperator(model, DeviceBatches(batches, device), block_strategy="auto")
    columns = probes + 1
    V = torch.randn(op.n, columns, dtype=torch.float64, device=device)
    t_product = _median_time(lambda: op.matmat(V), device, 1) / timed_batches
    t_grad = _median_time(op.loss_and_gradient, device, 1) / timed_batches
    # The Lanczos work of the last (most expensive) step: reorthogonalising 11 chains against `steps` vectors.
    chains = LanczosChains(V, steps, keep_basis=True)
    for _ in range(steps - 1):
        chains.advance(V * 1.0)  # the product does not matter for the cost of the arithmetic
    t0 = time.perf_counter()
    chains.advance(V * 1.0)
    _sync(device)
    t_lanczos_last = time.perf_counter() - t0
    n_batches = -(-examples // batch_size)
    total = n_batches * (2 * t_grad + steps * t_product) + steps * t_lanczos_last
    basis_gib = op.n * steps * columns * 8 / 2**30
    return [
        f"Full-size SLQ on CIFAR ResNet-{SIZE['depth']} ({op.n:,} parameters), float32 model, m = {steps}, "
        f"{probes} probes + the gradient chain, {examples:,} examples in {n_batches} batches of {batch_size}; "
        f"timed on {timed_batches} batches, extrapolated:",
        "",
        "| part | measured | whole run |",
        "|---|---|---|",
        f"| gradient, per batch | {1e3 * t_grad:.1f} ms | 2 passes: {2 * n_batches * t_grad:.0f} s |",
        f"| {columns}-column product, per batch ({op.block_strategy}) | {1e3 * t_product:.1f} ms | {steps} passes: "
        f"{steps * n_batches * t_product:.0f} s |",
        f"| Lanczos work of step {steps} ({columns} chains) | {1e3 * t_lanczos_last:.1f} ms | at most "
        f"{steps * t_lanczos_last:.1f} s |",
        f"| **one checkpoint** | | **{total / 60:.1f} min** (bases {basis_gib:.2f} GiB in float64) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke test of this script)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="seconds this script may take: a compiled column is started only while --compile-s are left",
    )  # fmt: skip
    parser.add_argument("--compile-s", type=float, default=150.0, help="the time one compiled column may need")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        SIZE.update(image=8, depth=8)
        sizes = {"batch_size": 4, "repeats": 1, "examples": 16, "steps": 3, "probes": 2, "timed_batches": 2}
    else:
        sizes = {"batch_size": 128, "repeats": 5, "examples": 50_000, "steps": 90, "probes": 10, "timed_batches": 5}
    started = time.perf_counter()
    head = [
        f"### GPU check ({'tiny, not a measurement' if args.tiny else 'benchmarks/gpu_check.sh'})",
        "",
        f"Machine: {_machine(device)}.",
        "",
        f"HVP cost on one batch of {sizes['batch_size']} CIFAR-shaped examples (median of {sizes['repeats']} after a "
        "warm-up; products accumulated in float64). Compiled (`--compile`, torch.compile with inductor): the "
        f"10-column product in {'float32, no-BN model only' if args.tiny else ' and '.join(COMPILED)}, against the "
        "same eager gradient; compile = the first call less a timed one; the relative difference of the compiled "
        "product to the eager one (float32: rounding, and ReLU/max decisions that flip with it):",
        "",
    ]
    rows = eager_rows(device, sizes["batch_size"], sizes["repeats"])
    slq: list[str] = []

    def write() -> str:
        took = f"(this check took {time.perf_counter() - started:.0f} s)"
        text = "\n".join([*head, *hvp_table(rows), "", *slq, "", took]) + "\n"
        args.out.write_text(text)  # after each part: a check stopped by its time limit keeps what it measured
        return text

    write()
    with contextlib.suppress(KeyboardInterrupt):
        slq = slq_extrapolation(
            device, sizes["batch_size"], sizes["examples"], sizes["steps"], sizes["probes"], sizes["timed_batches"]
        )
    write()
    # float32 of both models first (BN against no BN), then bfloat16: the cells that fit the budget run.
    for row in sorted(rows, key=lambda r: (r["label"] != "float32", r["batch_norm"])):
        if row["label"] not in COMPILED or "failed" in row:
            continue
        if args.tiny and (row["batch_norm"] or row["label"] != "float32"):
            row["compiled"] = "not run (tiny)"
            continue
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - started)
        if left is not None and left < args.compile_s:
            row["compiled"] = f"skipped: {left:.0f} s of the time budget left"
            continue
        compile_row(row, device, sizes["batch_size"], sizes["repeats"])
        write()
    print(write())


if __name__ == "__main__":
    main()
