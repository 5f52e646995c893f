"""CIFAR ResNet-32 (with and without BN): full-data HVP cost and an honest SLQ time estimate.

For each model, side by side in one run: the time of one gradient pass over ``--examples`` CIFAR-shaped synthetic
examples, of one HVP pass with 1 probe and with a block of 10 probes (reported per probe, over the gradient), and
the time of a whole SLQ of ``--lanczos-steps`` x 10 probes on 50,000 examples, measured whole when ``--examples``
is 50,000 and otherwise extrapolated linearly from the measured block-of-10 pass (each Lanczos step is one pass
over the data; Lanczos' own arithmetic is measured separately and added).

Run:  python benchmarks/resnet_slq.py [--device cuda] [--examples 50000] [--batch-size 128] [--hvp-strategy auto]
"""

from __future__ import annotations

import argparse
import time

import torch
from hvp import (  # shared timing helpers (the script's folder is on sys.path)
    _cpu_name,
    _sync,
    synthetic_cifar_batches,
    timed,
)

from hessspec.curvature.hessian import BLOCK_STRATEGIES, HessianOperator
from hessspec.linalg.lanczos import lanczos
from hessspec.models import build_model
from hessspec.runtime import tune_cpu_allocator

FULL_SET = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lanczos-steps", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hvp-strategy", choices=BLOCK_STRATEGIES, default="auto", help="the block_strategy")
    args = parser.parse_args()
    device = torch.device(args.device)
    tuned = device.type == "cpu" and tune_cpu_allocator()  # as the command line does
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"# torch {torch.__version__}, {device} ({name}), {torch.get_num_threads()} threads, float32 model, "
        f"allocator {'tuned' if tuned else 'default'}, hvp strategy {args.hvp_strategy}"
    )
    print(f"# {args.examples} synthetic CIFAR-shaped examples in batches of {args.batch_size}")
    print(
        "| model | params | gradient (s) | 1 probe / gradient | 10 probes, per probe / gradient | "
        f"SLQ m={args.lanczos_steps} x 10 probes on 50k |"
    )
    print("|" + "---|" * 6)
    batches = synthetic_cifar_batches(args.examples, args.batch_size, seed=0)
    for model_name in ("cifar-resnet32-nobn", "cifar-resnet32"):
        torch.manual_seed(0)
        model = build_model(model_name, num_classes=10).to(device)
        op = HessianOperator(model, batches, block_strategy=args.hvp_strategy)
        t_grad = timed(op.loss_and_gradient, device, args.repeats)
        V1 = torch.randn(op.n, 1, dtype=torch.float64, device=device)
        V10 = torch.randn(op.n, 10, dtype=torch.float64, device=device)
        t1 = timed(lambda op=op, V=V1: op.matmat(V), device, args.repeats)
        t10 = timed(lambda op=op, V=V10: op.matmat(V), device, args.repeats)
        # Lanczos arithmetic alone (reorthogonalisation against the growing basis), with a free operator.
        t0 = time.perf_counter()
        lanczos(lambda V: V * 1.0, torch.randn(op.n, 10, dtype=torch.float64, device=device), args.lanczos_steps)
        _sync(device)
        t_lanczos = time.perf_counter() - t0
        slq = args.lanczos_steps * t10 * FULL_SET / args.examples + t_lanczos
        how = "measured pass" if args.examples == FULL_SET else f"extrapolated from {args.examples} examples"
        print(
            f"| {model_name} ({op.block_strategy}) | {op.n:,} | {t_grad:.3f} | {t1 / t_grad:.2f}x | "
            f"{t10 / 10 / t_grad:.2f}x | "
            f"{slq / 60:.1f} min ({how}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
