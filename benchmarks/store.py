"""What writing one checkpoint costs as a result file grows: format version 2 against version 1's whole-file copy.

Writes ``--checkpoints`` checkpoints, each with ``--blocks`` results (one per block; realistic sizes: ``--probes``
probes of ``--steps`` Lanczos steps, 20 top eigenpairs, a gradient chain), and times every ``ResultWriter.write``
(fsync included). Three layouts side by side in one run, in the same directory:

* ``v2``: format version 2, the checkpoint's results in one new file, renamed into place.
* ``v1``: format version 1 (one whole-model result per checkpoint), each write an atomic copy of the whole file.
* ``v1-size``: version 1 again, with each checkpoint's one result as large as the ``--blocks`` results of ``v2``
  (``--blocks`` times the probes): what the whole-file copy would cost at version 2's volume.

Reports the median write time over the first 5 and over the last 5 checkpoints, and the total.

Run:  python benchmarks/store.py [--checkpoints 200] [--blocks 50] [--probes 10] [--steps 90] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import time

import h5py
import numpy as np

from hessspec.linalg import spectrum
from hessspec.results import CheckpointResult
from hessspec.store import ResultWriter, load_results

CONFIG = {"model": "benchmark", "data": "synthetic", "seed": 0}


def make_result(step: int, block: str, probes: int, steps: int, rng: np.random.Generator) -> CheckpointResult:
    alpha = rng.normal(size=(probes, steps))
    beta = rng.uniform(0.1, 1.0, size=(probes, steps - 1))
    quad = spectrum.quadrature(alpha, beta)
    k = min(20, steps)
    grad = spectrum.quadrature(rng.normal(size=(1, steps)), rng.uniform(0.1, 1.0, size=(1, steps - 1)))
    return CheckpointResult(
        step=step, loss=1.0, grad_norm=1.0, trace=1.0, trace_stderr=0.1, nodes=quad.nodes, weights=quad.weights,
        top_eigenvalues=np.sort(quad.nodes[0])[::-1][:k], top_residuals=np.full(k, 1e-6),
        overlap_k=np.arange(1, k + 1), overlap_ratio=np.linspace(0.1, 0.9, k), cos2=np.full(k, 0.01),
        n_params=100_000, n_samples=10_000, bn_mode="train", dtype="float32", device="cpu", seed=0,
        lanczos_steps=steps, probes=probes, elapsed_s=60.0, sha256=f"{step:064x}", model="benchmark",
        gradient_nodes=grad.nodes[0], gradient_weights=grad.weights[0], block=block,
    )  # fmt: skip


def run_layout(layout: str, directory: str, args: argparse.Namespace) -> dict:
    path = os.path.join(directory, f"{layout}.h5")
    version = 2 if layout == "v2" else 1
    blocks = [f"block{b:03d}" for b in range(args.blocks)] if layout == "v2" else ["all"]
    probes = args.probes * args.blocks if layout == "v1-size" else args.probes
    rng = np.random.default_rng(0)
    one = {block: make_result(0, block, probes, args.steps, rng) for block in blocks}
    times = []
    with ResultWriter(path, label=layout, config=CONFIG, format_version=version) as writer:
        for step in range(args.checkpoints):
            results = [dataclasses.replace(r, step=step, sha256=f"{step:064x}") for r in one.values()]
            start = time.perf_counter()
            writer.write(results if version == 2 else results[0])
            times.append(time.perf_counter() - start)
    start = time.perf_counter()
    run = load_results(path)
    load_s = time.perf_counter() - start
    assert len(run.results) == args.checkpoints * len(blocks)
    size = os.path.getsize(path)
    if version == 2:
        parts = path + ".d"
        size += sum(os.path.getsize(os.path.join(parts, name)) for name in os.listdir(parts))
    shutil.rmtree(path + ".d", ignore_errors=True)
    os.unlink(path)
    return {
        "layout": layout,
        "results_per_checkpoint": len(blocks),
        "probes_per_result": probes,
        "first5_ms": 1e3 * statistics.median(times[:5]),
        "last5_ms": 1e3 * statistics.median(times[-5:]),
        "total_s": sum(times),
        "load_s": load_s,
        "size_mb": size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--layouts", default="v2,v1,v1-size")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, h5py {h5py.__version__}, "
          f"HDF5 {h5py.version.hdf5_version}; {args.checkpoints} checkpoints, {args.blocks} blocks, "
          f"{args.probes} probes x {args.steps} steps")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        print("| layout | results per checkpoint | probes per result | write #1-5 (ms) | write last 5 (ms) | "
              "all writes (s) | load_results (s) | size (MB) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for layout in args.layouts.split(","):
            r = run_layout(layout, directory, args)
            print(f"| {r['layout']} | {r['results_per_checkpoint']} | {r['probes_per_result']} | "
                  f"{r['first5_ms']:.1f} | {r['last5_ms']:.1f} | {r['total_s']:.1f} | {r['load_s']:.1f} | "
                  f"{r['size_mb']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
