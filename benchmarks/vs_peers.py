"""Full-data SLQ, side by side: hessspec, PyHessian and curvlinops on the same model, data and settings.

One run builds one model per configuration (without and with BatchNorm) and one fixed list of batches, then times,
interleaved (A B C A B C ... for ``--repeats``), for each setting ``m x p`` (Lanczos steps x probes):

  gradient          one full-data gradient, ``HessianOperator.loss_and_gradient`` (the unit of the ratios)
  hessspec          ``hessspec.analysis.analyze`` with its defaults (float64 Lanczos with full
                    reorthogonalisation, Ritz pairs, overlap; BN in ``--bn-mode``: "eval" as the peers, and
                    "train", hessspec's default, for the BN model), including building the operator
  pyhessian         ``pyhessian.hessian(...).density(iter=m, n_v=p)`` on a dataloader of the same batches. It
                    calls ``model.eval()`` itself, so BN always uses its running statistics; one probe at a time,
                    float32, each product a double backward per batch. Its ``density()`` calls ``torch.eig``,
                    which current torch no longer has: :func:`pyhessian_eig_shim` supplies it for the duration of
                    the call from ``torch.linalg.eigh`` (exact for PyHessian's symmetric tridiagonal).
  curvlinops        ``curvlinops.HessianLinearOperator`` (default ``check_deterministic=True``) and its Lanczos
                    (``curvlinops.papyan2020traces.spectrum.fast_lanczos``, no reorthogonalisation, float32, one
                    probe at a time), ``p`` runs of ``m`` steps. Its per-batch product vmaps ``jvp`` over
                    ``jacrev``, which is wrong through train-mode BatchNorm (docs/DESIGN pitfalls), so it runs on
                    the model in eval mode only.

The peers are run only when importable (``pip install -e '.[bench]'``, as ``make bench`` does); the line says so
otherwise. The per-column cost is the time of the products alone over (m x columns) for hessspec (its columns
include the gradient chain when that is on) and the whole SLQ over (m x p) for the peers, over the gradient.

Configurations (``--model``):
  cnn        a CIFAR-shaped CNN of ~156k parameters (3x3 convolutions of 16, 32, 64 channels with max-pooling, a
             hidden layer of 128), 2,048 synthetic examples in batches of 256 (the setting of the issue)
  resnet32   CIFAR ResNet-32 (hessspec's zoo) with and without BN, batches of 128: for a GPU
             (``--device cuda --examples 50000``)

Run:  python benchmarks/vs_peers.py [--quick] [--model cnn|resnet32] [--device cpu|cuda] [--settings 90x10,20x3]
      [--examples 2048] [--repeats 1] [--tools hessspec,pyhessian,curvlinops] [--hvp-strategy auto[,vmap,...]]
      [--threads N]
Timings are wall times of one run each (median and spread over ``--repeats``), with the process's CPU time beside
them (user + system: with ``--threads 1`` it shows whether another process shared the core); record them in
benchmarks/RESULTS.md with the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from hvp import _cpu_name, _sync, synthetic_cifar_batches  # the script's folder is on sys.path
from torch import nn

from hessspec.analysis import AnalysisSettings, analyze
from hessspec.curvature.hessian import BLOCK_STRATEGIES, HessianOperator
from hessspec.models import build_model
from hessspec.runtime import tune_cpu_allocator

PEERS = ("pyhessian", "curvlinops")


def peer_cnn(batch_norm: bool) -> nn.Module:
    """The CIFAR-shaped CNN: 16/32/64-channel 3x3 convolutions (+ BN), max-pooling, 1024 -> 128 -> 10 (~156k)."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (16, 32, 64):
        layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def _trained_statistics(model: nn.Module, batches) -> None:
    # BN running statistics as after training (eval mode would otherwise normalise with mean 0, variance 1).
    with torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the batches
        for x, _ in batches:
            model(x)
    model.eval()


def available(peer: str) -> bool:
    """Whether a peer library can be imported."""
    return importlib.util.find_spec(peer) is not None


@contextlib.contextmanager
def pyhessian_eig_shim() -> Iterator[None]:
    """Provide ``torch.eig`` (removed in torch 2.x) for PyHessian's ``density()`` while the context is open.

    PyHessian calls ``torch.eig(T, eigenvectors=True)`` on its symmetric tridiagonal ``T`` and reads column 0 of the
    eigenvalues (real parts) and row 0 of the eigenvectors. For a symmetric matrix ``torch.linalg.eigh`` gives the
    same (real) eigenpairs; the imaginary column is zero.
    """
    had = hasattr(torch, "eig")
    previous = getattr(torch, "eig", None)

    def eig(T: torch.Tensor, eigenvectors: bool = False):
        values, vectors = torch.linalg.eigh(T)
        values = torch.stack([values, torch.zeros_like(values)], dim=1)
        return values, (vectors if eigenvectors else torch.empty(0, dtype=T.dtype))

    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = previous
        else:
            del torch.eig


def run_hessspec(model, batches, bn_mode: str, steps: int, probes: int, strategy: str = "auto") -> dict:
    t0 = time.perf_counter()
    op = HessianOperator(model, batches, bn_mode=bn_mode, block_strategy=strategy)
    result = analyze(op, AnalysisSettings(lanczos_steps=steps, probes=probes, top_k=min(20, steps)))
    _sync(op.device)
    columns = probes + int(result.gradient_nodes is not None)
    return {
        "s": time.perf_counter() - t0,
        "hvp_s": result.timings["hvp"],
        "columns": columns,
        "strategy": op.block_strategy,
        "lambda1": float(result.top_eigenvalues[0]),
    }


def run_pyhessian(model, batches, steps: int, probes: int, device: torch.device) -> dict:
    from pyhessian import hessian

    peer_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    with pyhessian_eig_shim(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backward(create_graph=True) reference-cycle warnings
        h = hessian(peer_model, nn.CrossEntropyLoss(), dataloader=batches, cuda=device.type == "cuda")
        nodes, _weights = h.density(iter=steps, n_v=probes)
    _sync(device)
    return {"s": time.perf_counter() - t0, "lambda1": float(max(max(row) for row in nodes))}


def run_curvlinops(model, batches, steps: int, probes: int, device: torch.device) -> dict:
    from curvlinops import HessianLinearOperator
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    peer_model = copy.deepcopy(model).eval()
    params = [p for p in peer_model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    H = HessianLinearOperator(peer_model, nn.CrossEntropyLoss(), params, batches)
    top = max(float(fast_lanczos(H, steps)[0].max()) for _ in range(probes))
    _sync(device)
    return {"s": time.perf_counter() - t0, "lambda1": top}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(values: list[float]) -> str:
    med, lo, hi = _median(values)
    return f"{med:.1f}" if len(values) == 1 else f"{med:.1f} ({lo:.1f}-{hi:.1f})"


def bench_config(
    label: str,
    model: nn.Module,
    batches,
    bn_modes: list[str],
    settings: list[tuple[int, int]],
    tools: list[str],
    repeats: int,
    device: torch.device,
    log: Callable[[str], None],
    strategies: tuple[str, ...] = ("auto",),
) -> None:
    """Time every tool at every setting on one model, interleaved, and print one table row per tool and setting."""
    unit_op = HessianOperator(model, batches, bn_mode=bn_modes[0])
    unit_op.loss_and_gradient()  # warm-up
    grads = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        unit_op.loss_and_gradient()
        _sync(device)
        grads.append(time.perf_counter() - t0)
    grad = statistics.median(grads)
    log(f"# {label}: {unit_op.n:,} parameters, gradient pass {grad:.3f} s (median of {len(grads)})")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    runners: list[tuple[str, Callable[[int, int], dict]]] = []
    for mode in bn_modes if "hessspec" in tools else []:
        for strategy in strategies:
            name = f"hessspec (BN {mode})" if has_bn else "hessspec"
            if len(strategies) > 1:
                name = f"{name}, {strategy}"
            runners.append((name, _hs(model, batches, mode, strategy)))
    suffix = " (BN eval)" if has_bn else ""
    if "pyhessian" in tools:
        runners.append((f"PyHessian{suffix}", _ph(model, batches, device)))
    if "curvlinops" in tools:
        runners.append((f"curvlinops{suffix}", _cl(model, batches, device)))

    for steps, probes in settings:
        times: dict[str, list[float]] = {name: [] for name, _ in runners}
        cpu: dict[str, list[float]] = {name: [] for name, _ in runners}
        extra: dict[str, dict] = {}
        for _ in range(repeats):
            for name, run in runners:
                c0 = _cpu_seconds()
                out = run(steps, probes)
                cpu[name].append(_cpu_seconds() - c0)
                times[name].append(out["s"])
                extra.setdefault(name, out)
                if "hvp_s" in out:
                    extra[name].setdefault("per_column", []).append(out["hvp_s"] / (steps * out["columns"]) / grad)
        reference = statistics.median(times[runners[0][0]])
        for name, _ in runners:
            med = statistics.median(times[name])
            per_col = extra[name].get("per_column")
            column = (
                f"{statistics.median(per_col):.2f}x ({extra[name]['columns']} columns, {extra[name]['strategy']})"
                if per_col
                else f"{med / (steps * probes) / grad:.2f}x (whole SLQ)"
            )
            log(
                f"| {label} | {steps}x{probes} | {name} | {_fmt(times[name])} | {_fmt(cpu[name])} | "
                f"{med / reference:.2f} | {column} | "
                f"{extra[name]['lambda1']:.4g} |"
            )


def _hs(model, batches, mode, strategy):
    return lambda steps, probes: run_hessspec(model, batches, mode, steps, probes, strategy)


def _ph(model, batches, device):
    return lambda steps, probes: run_pyhessian(model, batches, steps, probes, device)


def _cl(model, batches, device):
    return lambda steps, probes: run_curvlinops(model, batches, steps, probes, device)


def _settings(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m, p = part.lower().split("x")
        out.append((int(m), int(p)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cnn", "resnet32"), default="cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=None, help="default 2048 (cnn), 512 (resnet32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (cnn), 128 (resnet32)")
    parser.add_argument("--settings", type=_settings, default=_settings("90x10,20x3"), help="MxP,... (m x probes)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tools", default="hessspec," + ",".join(PEERS))
    parser.add_argument("--bn", choices=("both", "without", "with"), default="both")
    parser.add_argument(
        "--bn-modes", default="eval,train", help="hessspec's BN modes on the BN model: eval, train or eval,train"
    )
    parser.add_argument(
        "--hvp-strategy",
        default="auto",
        help=f"hessspec's block_strategy, or several separated by commas, each a row ({', '.join(BLOCK_STRATEGIES)})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 examples, 2x2 only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tuned = device.type == "cpu" and tune_cpu_allocator()
    examples = args.examples or (2048 if args.model == "cnn" else 512)
    batch_size = args.batch_size or (256 if args.model == "cnn" else 128)
    settings = args.settings
    if args.quick:
        examples, batch_size, settings = 8, 4, [(2, 2)]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - {"hessspec", *PEERS})
    if unknown:
        parser.error(f"unknown tools {unknown}")
    if not set(args.bn_modes.split(",")) & {"eval", "train"}:
        parser.error(f"--bn-modes: eval, train or both; got {args.bn_modes!r}")
    strategies = tuple(t.strip() for t in args.hvp_strategy.split(",") if t.strip())
    if not strategies or set(strategies) - set(BLOCK_STRATEGIES):
        parser.error(f"--hvp-strategy: each of {', '.join(BLOCK_STRATEGIES)}; got {args.hvp_strategy!r}")
    missing = [t for t in tools if t in PEERS and not available(t)]
    tools = [t for t in tools if t not in missing]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"# torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads, "
        f"allocator {'tuned' if tuned else 'default'}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"# {args.model}: {examples} synthetic CIFAR-shaped examples in batches of {batch_size}, float32 model; "
        f"{args.repeats} interleaved repeat(s)"
    )
    for peer in missing:
        print(f"# {peer}: not importable, not run (pip install -e '.[bench]')")
    print(
        "| model | m x p | tool | wall time (s) | CPU time (s) | wall time / first row | per column / gradient | "
        "top Ritz value |"
    )
    print("|---|---|---|---|---|---|---|---|")
    batches = synthetic_cifar_batches(examples, batch_size, device=device)
    for batch_norm in {"both": (False, True), "without": (False,), "with": (True,)}[args.bn]:
        torch.manual_seed(0)
        if args.model == "cnn":
            model = peer_cnn(batch_norm)
        else:
            model = build_model("cifar-resnet32" if batch_norm else "cifar-resnet32-nobn")
        model = model.to(device)
        if batch_norm:
            _trained_statistics(model, batches)
        label = f"{args.model} {'with' if batch_norm else 'without'} BN"
        modes = [m for m in ("eval", "train") if m in args.bn_modes.split(",")] if batch_norm else ["train"]
        log = lambda line: print(line, flush=True)  # noqa: E731
        bench_config(label, model, batches, modes, settings, tools, args.repeats, device, log, strategies)


if __name__ == "__main__":
    main()
