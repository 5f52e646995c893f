"""Throughput of each data placement against ``device``: the time of one pass over an image folder.

Writes a folder of N CIFAR-shaped images (32x32 RGB PNG files, 10 classes), then, in one process, builds the
batches of ``hessspec.data.placement.place`` in each placement (``device``: stacked once; ``host``: stacked in host
memory and copied batch by batch, the next prefetched; ``stream``: decoded from the files on every pass by a
DataLoader with ``--workers`` worker processes) and times, interleaved (device, host, stream, device, ...), passes of

  gradient   ``HessianOperator.loss_and_gradient`` (the lightest pass: the data path weighs most here)
  product    ``HessianOperator.matmat`` of ``--columns`` columns (a Lanczos step of an SLQ with that many probes)

on the CIFAR-shaped CNN of ``vs_peers.py`` (~156k parameters, float32, strategy as ``auto`` picks). Stacking the
data (decoding every image once) is not part of a pass and is reported separately. The figure of merit is the median
pass time of each placement over ``device``'s (the issue's targets on the CPU: host <= 1.05, stream <= 1.15 with 2
workers).

    python benchmarks/placement_throughput.py [--images 2048] [--batch-size 256] [--columns 10] [--passes 3]
        [--workers 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from placement import write_folder  # the script's folder is on sys.path
from vs_peers import peer_cnn

from hessspec.curvature.hessian import HessianOperator
from hessspec.data.datasets import load_dataset
from hessspec.data.placement import place
from hessspec.runtime import tune_cpu_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    device = torch.device("cpu")
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {args.images} PNG images 32x32 in batches of {args.batch_size}; "
        f"stream with {args.workers} workers"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_folder(folder, args.images, side=32)
        dataset = load_dataset(f"imagefolder:{folder}", image_size=None)
        torch.manual_seed(0)
        model = peer_cnn(False)
        operators = {}
        for placement in ("device", "host", "stream"):
            t0 = time.perf_counter()
            source, _ = place(dataset, args.batch_size, device, placement=placement, workers=args.workers)
            operators[placement] = HessianOperator(model, source)
            print(f"# {placement}: batches ready in {time.perf_counter() - t0:.1f} s (stacking, or one counting pass)")
        V = torch.randn(next(iter(operators.values())).n, args.columns, dtype=torch.float64)
        work = {
            "gradient": lambda op: op.loss_and_gradient(),
            f"product of {args.columns} columns": lambda op: op.matmat(V),
        }
        print("| pass | placement | median pass (s) | all passes (s) | over device |")
        print("|---|---|---|---|---|")
        for label, fn in work.items():
            for op in operators.values():
                fn(op)  # warm-up (and under auto, the strategy check)
            times: dict[str, list[float]] = {p: [] for p in operators}
            for _ in range(args.passes):
                for placement, op in operators.items():
                    t0 = time.perf_counter()
                    fn(op)
                    times[placement].append(time.perf_counter() - t0)
            base = statistics.median(times["device"])
            for placement, values in times.items():
                med = statistics.median(values)
                print(
                    f"| {label} | {placement} | {med:.3f} | {[round(v, 3) for v in values]} | {med / base:.3f} |",
                    flush=True,
                )
    print(f"# load average at the end {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
