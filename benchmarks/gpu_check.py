"""The GPU measurements of hessspec in one run, written as markdown ready for benchmarks/RESULTS.md.

1. HVP cost on CIFAR ResNet-32 (the zoo's ``cifar-resnet32``, 0.46M parameters) with and without BatchNorm: one
   batch of 128 CIFAR-shaped examples, the product of 1 and of 10 columns (probes) against the batch gradient, with
   the model in float32, float32 with TF32, and bfloat16 (products accumulated in float64), eager. (``--compile``
   is not implemented in hessspec yet: there is no compiled row.)
2. A timed part of a full-size SLQ: m = 90 Lanczos steps, 10 probes plus the gradient chain, 50,000 CIFAR-shaped
   examples (391 batches of 128): a few batches of the 11-column product and of the gradient are timed, plus the
   Lanczos work of one step at this n (reorthogonalisation against 90 vectors per chain), and extrapolated to
   the whole run: 2 gradient passes + 90 product passes of 391 batches + 90 Lanczos steps.

``--tiny --device cpu`` runs every part at toy size (a test runs it, so this script cannot rot); the numbers are
then meaningless. Run it through ``benchmarks/gpu_check.sh``, which also runs the CUDA tests.

    python benchmarks/gpu_check.py --out gpu_check.md [--device cuda] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
from hvp import _sync  # shared timing helpers (the script's folder is on sys.path)
from hvp import timed as _median_time

from hessspec.curvature.hessian import HessianOperator
from hessspec.data.placement import DeviceBatches
from hessspec.linalg.lanczos import LanczosChains
from hessspec.models import build_model
from hessspec.runtime import set_tf32

PRECISIONS = (
    ("float32", torch.float32, False),
    ("float32 + TF32", torch.float32, True),
    ("bfloat16", torch.bfloat16, False),
)


SIZE = {"image": 32, "depth": 32}  # --tiny: 8x8 images, ResNet-20


def _batch(examples: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 3, SIZE["image"], SIZE["image"], generator=g)
    return x.to(device), torch.randint(0, 10, (examples,), generator=g).to(device)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {platform.platform()}"


def hvp_table(device: torch.device, batch_size: int, repeats: int, model_names: tuple[str, str]) -> list[str]:
    rows = [
        "| model | model dtype | gradient (ms/batch) | 1 column (x gradient) | 10 columns (x gradient per column) |",
        "|---|---|---|---|---|",
    ]
    batch = _batch(batch_size, device)
    for name in model_names:
        for label, dtype, tf32 in PRECISIONS:
            set_tf32(tf32)
            try:
                torch.manual_seed(0)
                model = build_model(name.replace("32", str(SIZE["depth"]))).to(device)
                op = HessianOperator(model, DeviceBatches([batch], device), dtype=dtype, block_strategy="auto")
                V = torch.randn(op.n, 10, dtype=torch.float64, device=device)
                t_grad = _median_time(op.loss_and_gradient, device, repeats)
                t1 = _median_time(lambda op=op, V=V: op.matmat(V[:, :1]), device, repeats)
                t10 = _median_time(lambda op=op, V=V: op.matmat(V), device, repeats)
                rows.append(
                    f"| {name.replace('32', str(SIZE['depth']))} | {label} | {1e3 * t_grad:.1f} | "
                    f"{t1 / t_grad:.2f} | {t10 / 10 / t_grad:.2f} "
                    f"({op.block_strategy}) |"
                )
            except Exception as error:  # one failing precision must not hide the others
                rows.append(f"| {name} | {label} | failed: {type(error).__name__}: {str(error)[:80]} | | |")
            finally:
                set_tf32(False)
    return rows


def slq_extrapolation(
    device: torch.device, batch_size: int, examples: int, steps: int, probes: int, timed_batches: int
) -> list[str]:
    torch.manual_seed(0)
    model = build_model(f"cifar-resnet{SIZE['depth']}").to(device)
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
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        SIZE.update(image=8, depth=20)
        sizes = {"batch_size": 4, "repeats": 1, "examples": 16, "steps": 3, "probes": 2, "timed_batches": 2}
    else:
        sizes = {"batch_size": 128, "repeats": 5, "examples": 50_000, "steps": 90, "probes": 10, "timed_batches": 5}
    started = time.perf_counter()
    lines = [
        f"### GPU check ({'tiny, not a measurement' if args.tiny else 'benchmarks/gpu_check.sh'})",
        "",
        f"Machine: {_machine(device)}.",
        "",
        f"HVP cost on one batch of {sizes['batch_size']} CIFAR-shaped examples (median of {sizes['repeats']} after a "
        "warm-up; products accumulated in float64; eager: --compile is not implemented):",
        "",
    ]
    lines += hvp_table(device, sizes["batch_size"], sizes["repeats"], ("cifar-resnet32-nobn", "cifar-resnet32"))
    lines += [""]
    with contextlib.suppress(KeyboardInterrupt):
        lines += slq_extrapolation(
            device, sizes["batch_size"], sizes["examples"], sizes["steps"], sizes["probes"], sizes["timed_batches"]
        )
    lines += ["", f"(this check took {time.perf_counter() - started:.0f} s)"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
