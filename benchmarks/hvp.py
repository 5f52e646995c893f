"""Cost of full-data Hessian-vector products relative to a full-data gradient, measured side by side.

A CIFAR-shaped CNN (3x32x32 inputs, 10 classes), with and without BatchNorm, on synthetic data (default 2,048
examples in batches of 256). For each model, in one run:

  gradient   one full-data gradient through HessianOperator.loss_and_gradient (the unit)
  (a)        one full-data HVP by double backward (autograd.grad of g.v), the classical approach
  (b)        hessspec's operator, one vector: forward-over-reverse (jvp of grad) and reverse-over-reverse
  (c)        hessspec's operator, a block of 10 vectors (reported per vector), with each block strategy: vmap
             (one vectorised forward-over-reverse pass), loop (one pass per column) and reverse (the gradient's
             graph built once per batch, one backward through it per column)
  (d)        one whole SLQ run (m = 30 steps, 3 probes, + gradient chain) end to end, over the time of its HVPs,
             on --slq-examples examples (the non-HVP work does not grow with the data, so a smaller set gives an
             upper bound on the overhead of the full set)

Run:  python benchmarks/hvp.py [--examples 2048] [--device cpu|cuda] [--repeats 3] [--allocator tuned|default]
Timings are the median of --repeats runs after one warm-up. Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from hessspec.analysis import AnalysisSettings, analyze
from hessspec.curvature.hessian import HessianOperator
from hessspec.runtime import tune_cpu_allocator

STRATEGIES = ("vmap", "loop", "reverse")


def cifar_cnn(batch_norm: bool) -> nn.Module:
    """Three conv stages (32, 64, 128 channels, 3x3, max-pool) and a linear head: ~0.11M parameters."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        return [*layers, nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 10))


def synthetic_cifar_batches(
    examples: int, batch_size: int, seed: int = 1, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded standard-normal 3x32x32 inputs and uniform labels of 10 classes, in batches of ``batch_size``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (examples,), generator=g)
    starts = range(0, examples, batch_size)
    return [(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)) for i in starts]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def double_backward_hvp(model: nn.Module, batches, v: torch.Tensor) -> torch.Tensor:
    """Full-data HVP by double backward on a train-mode copy (the usual approach), weighted by batch size."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(x) for x, _ in batches)
    out = torch.zeros_like(v)
    vs = list(v.to(params[0].dtype).split([p.numel() for p in params]))
    vs = [t.view_as(p) for t, p in zip(vs, params, strict=True)]
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True))
        hv = torch.autograd.grad(dot, params)
        out.add_(torch.cat([h.reshape(-1) for h in hv]).to(out.dtype), alpha=len(x) / total)
    return out


def bench(
    batch_norm: bool, examples: int, batch_size: int, device: torch.device, repeats: int, slq_examples: int
) -> dict:
    torch.manual_seed(0)
    model = cifar_cnn(batch_norm).to(device)
    batches = synthetic_cifar_batches(examples, batch_size, device=device)
    op = HessianOperator(model, batches)
    n = op.n
    v1 = torch.randn(n, 1, dtype=torch.float64, device=device)
    v10 = torch.randn(n, 10, dtype=torch.float64, device=device)
    db_model = copy.deepcopy(model).train()

    t_grad = timed(op.loss_and_gradient, device, repeats)
    t_db = timed(lambda: double_backward_hvp(db_model, batches, v1[:, 0]), device, repeats)
    one, block = {}, {}
    for strategy in STRATEGIES:
        s_op = HessianOperator(model, batches, block_strategy=strategy)
        if strategy != "loop":  # for one vector, loop and vmap are the same forward-over-reverse pass
            one[strategy] = timed(lambda s_op=s_op: s_op.matmat(v1), device, repeats) / t_grad
        block[strategy] = timed(lambda s_op=s_op: s_op.matmat(v10), device, repeats) / 10 / t_grad

    settings = AnalysisSettings(lanczos_steps=30, probes=3, top_k=5, determinism_check=False)
    slq_op = HessianOperator(model, batches[: max(1, slq_examples // batch_size)])
    t0 = time.perf_counter()
    result = analyze(slq_op, settings)
    _sync(device)
    t_slq = time.perf_counter() - t0
    t_slq_hvp = result.timings["hvp"]
    return {
        "model": f"CIFAR CNN {'with' if batch_norm else 'without'} BN",
        "params": n,
        "grad_s": t_grad,
        "a_double_backward": t_db / t_grad,
        "b_one_vector": one,
        "c_block10_per_vector": block,
        "strategy": op.block_strategy,
        "d_slq_overhead": t_slq / t_slq_hvp - 1.0,
        "slq_s": t_slq,
        "slq_hvp_s": t_slq_hvp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--slq-examples", type=int, default=512)
    parser.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: hessspec.runtime.tune_cpu_allocator() first, as the command line does on the CPU",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    tuned = args.allocator == "tuned" and tune_cpu_allocator()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"# torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads, "
        f"allocator {'tuned' if tuned else 'default'}"
    )
    print(
        f"# {args.examples} synthetic CIFAR-shaped examples, batches of {args.batch_size}, float32 model; "
        f"(d) on the first {args.slq_examples}; median of {args.repeats} run(s) after a warm-up"
    )
    print(
        "| model | params | gradient (s) | (a) double backward | (b) 1 vector: fwd-over-rev / rev-over-rev "
        "| (c) 10 vectors, per vector: vmap / loop / reverse | default (auto) | (d) SLQ overhead |"
    )
    print("|" + "---|" * 8)
    for bn in (False, True):
        r = bench(bn, args.examples, args.batch_size, device, args.repeats, args.slq_examples)
        one, block = r["b_one_vector"], r["c_block10_per_vector"]
        print(
            f"| {r['model']} | {r['params']:,} | {r['grad_s']:.3f} | {r['a_double_backward']:.2f}x | "
            f"{one['vmap']:.2f}x / {one['reverse']:.2f}x | "
            + " / ".join(f"{block[s]:.2f}x" for s in STRATEGIES)
            + f" | {r['strategy']} | {100 * r['d_slq_overhead']:.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
