"""What hessspec.runtime.tune_cpu_allocator() buys on the CPU, measured side by side in one run.

The setting is process-wide, so each (model, allocator) pair runs in its own child process with the same data and
seed: glibc's default allocator (HESSSPEC_TUNE_ALLOCATOR=0) and the tuned one. Each child times a full-data
gradient and a full-data HVP on a block of 10 vectors (the operator's default strategy), and reports its kernel
(system) CPU time, which is where the page faults of a fresh mapping per large allocation show up.

Run:  python benchmarks/allocator.py [--examples 1024] [--batch-size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from hvp import (  # shared helpers (the script's folder is on sys.path)
    _cpu_name,
    cifar_cnn,
    synthetic_cifar_batches,
    timed,
)

from hessspec.curvature.hessian import HessianOperator
from hessspec.runtime import tune_cpu_allocator


def child(batch_norm: bool, examples: int, batch_size: int, repeats: int) -> dict:
    tuned = tune_cpu_allocator()  # honours HESSSPEC_TUNE_ALLOCATOR=0
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = cifar_cnn(batch_norm)
    batches = synthetic_cifar_batches(examples, batch_size)
    op = HessianOperator(model, batches)
    V = torch.randn(op.n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    start = resource.getrusage(resource.RUSAGE_SELF)
    t_grad = timed(op.loss_and_gradient, device, repeats)
    t_block = timed(lambda: op.matmat(V), device, repeats)
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tuned": tuned,
        "strategy": op.block_strategy,
        "grad_s": t_grad,
        "block_per_vector_s": t_block / 10,
        "system_s": end.ru_stime - start.ru_stime,
        "user_s": end.ru_utime - start.ru_utime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=("bn", "nobn"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child == "bn", args.examples, args.batch_size, args.repeats)
        print(json.dumps(result))
        return
    print(f"# torch {torch.__version__}, cpu ({_cpu_name()}), {torch.get_num_threads()} threads")
    print(
        f"# {args.examples} synthetic CIFAR-shaped examples, batches of {args.batch_size}; "
        f"median of {args.repeats} after a warm-up; one child process per row"
    )
    print("| model | allocator | strategy | gradient (s) | HVP per vector, block of 10 (s) | kernel CPU (s) |")
    print("|" + "---|" * 6)
    for kind in ("nobn", "bn"):
        rows = {}
        for setting in ("0", "1"):
            env = {**os.environ, "HESSSPEC_TUNE_ALLOCATOR": setting}
            command = [sys.executable, "-W", "ignore", __file__, "--child", kind, "--examples", str(args.examples)]
            command += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[setting] = r
            name = f"CIFAR CNN {'with' if kind == 'bn' else 'without'} BN"
            print(
                f"| {name} | {'tuned' if r['tuned'] else 'default'} | {r['strategy']} | {r['grad_s']:.3f} | "
                f"{r['block_per_vector_s']:.3f} | {r['system_s']:.1f} |",
                flush=True,
            )
        default, tuned = rows["0"], rows["1"]
        print(
            f"| speed-up (default / tuned) | | | {default['grad_s'] / tuned['grad_s']:.2f}x | "
            f"{default['block_per_vector_s'] / tuned['block_per_vector_s']:.2f}x | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
