"""Peak memory against the number of probes, with the Lanczos bases on the device, in host memory, or on disk.

Each run is ``hessspec.analysis.analyze`` of one MLP (``--width``: 64 -> W -> W -> 10, ~1.1M parameters at W = 1000)
on 512 random examples, ``--steps`` Lanczos steps (float64 bases: 8 * n * steps bytes per probe), in a fresh
process, with ``basis_placement`` = device, host or disk (a memory-mapped scratch file). On the CPU "device" and
"host" are the same memory, so they should match; "disk" should stay flat. Memory is sampled every 20 ms from
``/proc/self/status`` while the analysis runs:

  anon   the largest RssAnon (private memory: tensors, the bases unless on disk)
  rss    the largest VmRSS (also counts the scratch file's pages while they are cached and mapped)

    python benchmarks/basis_memory.py [--probes 1 2 4 8] [--steps 20] [--width 1000]
"""

from __future__ import annotations

import argparse

from placement import run_child  # the script's folder is on sys.path

CHILD = r"""
import json, sys, tempfile, threading, time
import torch
from torch import nn
from hessspec.analysis import AnalysisSettings, analyze
from hessspec.curvature.hessian import HessianOperator

placement, probes, steps, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
peak = {"anon": 0, "rss": 0}
done = threading.Event()

def sample():
    while not done.is_set():
        for line in open("/proc/self/status"):
            key = {"RssAnon:": "anon", "VmRSS:": "rss"}.get(line.split(":")[0] + ":")
            if key:
                peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        time.sleep(0.02)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
op = HessianOperator(model, [(x[i : i + 256], y[i : i + 256]) for i in range(0, 512, 256)])
base = {}
for line in open("/proc/self/status"):
    if line.startswith(("RssAnon:", "VmRSS:")):
        base[line.split(":")[0]] = int(line.split()[1]) * 1024
thread = threading.Thread(target=sample, daemon=True)
thread.start()
with tempfile.TemporaryDirectory() as scratch:
    t0 = time.perf_counter()
    analyze(op, AnalysisSettings(lanczos_steps=steps, probes=probes, top_k=2, basis_placement=placement,
                                 scratch_dir=scratch))
    wall = time.perf_counter() - t0
done.set()
thread.join()
print("RESULT " + json.dumps({"n": op.n, "wall": wall, "anon": peak["anon"], "rss": peak["rss"],
                              "anon0": base["RssAnon"], "rss0": base["VmRSS"]}), flush=True)
"""


def run(placement: str, probes: int, steps: int, width: int) -> dict:
    return run_child(CHILD, [placement, str(probes), str(steps), str(width)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--placements", nargs="+", default=["device", "host", "disk"])
    args = parser.parse_args()
    print("| probes | bases (MiB) | placement | peak RssAnon - start (MiB) | peak VmRSS - start (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for probes in args.probes:
        for placement in args.placements:
            r = run(placement, probes, args.steps, args.width)
            bases = 8 * r["n"] * args.steps * probes / 2**20
            print(
                f"| {probes} | {bases:.0f} | {placement} | {(r['anon'] - r['anon0']) / 2**20:.0f} | "
                f"{(r['rss'] - r['rss0']) / 2**20:.0f} | {r['wall']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
