"""Eager against compiled (``--compile``) full-data products and gradients, side by side in one run.

The CIFAR-shaped CNN of ``benchmarks/hvp.py`` (3x32x32 inputs, ~114k parameters), with and without BatchNorm
(train mode), on synthetic data (default 512 examples in batches of 256). For each model, the block strategy that
"auto" picks (on the CPU: "reverse" with BN, "vmap" without), eager and compiled:

  gradient     one full-data gradient (``loss_and_gradient``), the unit of every ratio
  1 column     one full-data product of 1 column, over the eager gradient
  10 columns   one full-data product of 10 columns, per column, over the eager gradient

Compile time is reported separately: the first call of each compiled function less a timed call (one graph per
shape: gradient, 1 column, 10 columns). Timings are the median of --repeats calls after that first call; eager and
compiled alternate per quantity, so a change of machine load hits both. The largest relative difference of the
compiled results to the eager ones is printed too (float32 model: rounding, and ReLU/max-pool decisions that flip
with it).

Run:  python benchmarks/compile.py [--examples 512] [--repeats 3] [--dtype float32]
Record results in benchmarks/RESULTS.md with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from hvp import _cpu_name, cifar_cnn, synthetic_cifar_batches  # the script's folder is on sys.path

from hessspec.curvature.hessian import HessianOperator
from hessspec.runtime import tune_cpu_allocator


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def bench(batch_norm: bool, examples: int, batch_size: int, repeats: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = cifar_cnn(batch_norm)
    batches = synthetic_cifar_batches(examples, batch_size)
    ops = {
        name: HessianOperator(model, batches, dtype=dtype, compile=name == "compiled") for name in ("eager", "compiled")
    }
    n = ops["eager"].n
    V = torch.randn(n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    work = {
        "gradient": lambda op: op.loss_and_gradient().gradient,
        "1 column": lambda op: op.matmat(V[:, :1]),
        "10 columns": lambda op: op.matmat(V),
    }
    out: dict = {"model": f"CIFAR CNN {'with' if batch_norm else 'without'} BN", "params": n}
    for what, fn in work.items():
        first, results = {}, {}
        for name, op in ops.items():  # the first call compiles (and, under "auto", settles the strategy)
            t0 = time.perf_counter()
            results[name] = fn(op)
            first[name] = time.perf_counter() - t0
        timed: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(repeats):  # alternate, so a change of load hits both
            for name, op in ops.items():
                timed[name].append(_seconds(lambda op=op, fn=fn: fn(op)))
        out[what] = {name: statistics.median(t) for name, t in timed.items()}
        out[what]["compile_s"] = first["compiled"] - out[what]["compiled"]
        out[what]["difference"] = _relative(results["compiled"], results["eager"])
    out["strategy"] = ops["compiled"].block_strategy
    out["fallback"] = ops["compiled"].compile_fallback
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    load = os.getloadavg()
    print(
        f"# torch {torch.__version__}, CPU {_cpu_name()}, {torch.get_num_threads()} threads, allocator "
        f"{'tuned' if tuned else 'default'}, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"# {args.examples} synthetic CIFAR-shaped examples, batches of {args.batch_size}, {args.dtype} model; "
        f"median of {args.repeats} call(s), eager and compiled alternating; ratios over the eager gradient"
    )
    print(
        "| model | strategy | gradient (s): eager / compiled | 1 column: eager / compiled | 10 columns, per column: "
        "eager / compiled | compile (s): gradient / 1 / 10 columns | compiled vs eager (max rel. diff.) |"
    )
    print("|" + "---|" * 7)
    for bn in (False, True):
        r = bench(bn, args.examples, args.batch_size, args.repeats, getattr(torch, args.dtype))
        unit = r["gradient"]["eager"]
        one = [r["1 column"][k] / unit for k in ("eager", "compiled")]
        ten = [r["10 columns"][k] / 10 / unit for k in ("eager", "compiled")]
        compile_s = " / ".join(f"{r[w]['compile_s']:.0f}" for w in ("gradient", "1 column", "10 columns"))
        difference = max(r[w]["difference"] for w in ("gradient", "1 column", "10 columns"))
        strategy = r["strategy"] + (f" (ran eagerly: {r['fallback']})" if r["fallback"] else "")
        print(
            f"| {r['model']} | {strategy} | {r['gradient']['eager']:.2f} / {r['gradient']['compiled']:.2f} | "
            f"{one[0]:.2f}x / {one[1]:.2f}x | {ten[0]:.2f}x / {ten[1]:.2f}x | {compile_s} | {difference:.1e} |",
            flush=True,
        )
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
