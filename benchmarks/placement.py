"""Data placements against the size of the data: peak memory and wall time of one checkpoint's analysis.

Writes image folders of N small PNG images (8x8 RGB, 10 classes) and runs ``hessspec analyze`` of one checkpoint of
the zoo ``cnn`` (two 3x3 convolutions, ~10k parameters, float32) on each, in a fresh process per run, with
``--data-placement host`` and ``stream`` (2 workers), and, for the throughput comparison, ``device``. Few Lanczos
steps (``--lanczos-steps 4 --probes 1``): the point is the data path, not the spectrum. Peak RSS is the analysing
process's (``ru_maxrss``) and, for ``stream``, the largest of its loader workers' (they hold the file list and
decode one batch at a time).

    python benchmarks/placement.py --sizes 2000 8000 32000 [--repeats 2]

The machine is shared: every configuration of one size runs side by side, in turns, ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from hessspec.cli import cli
t0 = time.perf_counter()
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    wall = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("RESULT " + json.dumps({"wall_s": wall, "rss": own, "worker_rss": workers}), flush=True)
"""


def write_folder(root: Path, size: int, side: int = 8) -> None:
    """``size`` random RGB PNG images of ``side`` x ``side`` pixels in 10 class folders under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(size)
    for index in range(size):
        folder = root / f"c{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")


def write_checkpoint(path: Path) -> None:
    import torch

    from hessspec.models import build_model

    torch.manual_seed(0)
    torch.save({"model": build_model("cnn", in_channels=3, num_classes=10).state_dict(), "step": 0}, path)


def run(folder: Path, checkpoint: Path, placement: str, out: Path) -> dict:
    args = [
        "analyze", str(checkpoint), "--model", "cnn", "--model-arg", "in_channels=3", "--data", f"imagefolder:{folder}",
        "--data-arg", "image_size=8", "--batch-size", "256", "--lanczos-steps", "4", "--probes", "1", "--top-k", "2",
        "--no-crosscheck", "--data-placement", placement, "--workers", "2", "--device", "cpu", "-q", "--force",
        "--out", str(out),
    ]  # fmt: skip
    return run_child(CHILD, args)


def run_child(code: str, args: list[str]) -> dict:
    """Run ``python -c code *args`` in a fresh process (one thread) and return the JSON of its ``RESULT`` line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--placements", nargs="+", default=["device", "host", "stream"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "ckpt.pt"
        write_checkpoint(checkpoint)
        for size in args.sizes:
            folder = work / f"images{size}"
            t0 = time.perf_counter()
            write_folder(folder, size)
            print(f"wrote {size} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            results: dict[str, list[dict]] = {p: [] for p in args.placements}
            for _ in range(args.repeats):
                for placement in args.placements:
                    results[placement].append(run(folder, checkpoint, placement, work / f"{placement}.h5"))
            for placement, runs in results.items():
                wall = min(r["wall_s"] for r in runs)
                rss = max(r["rss"] for r in runs) / 2**20
                workers = max(r["worker_rss"] for r in runs) / 2**20
                rows.append((size, placement, wall, rss, workers, [round(r["wall_s"], 1) for r in runs]))
                print(rows[-1], file=sys.stderr)
    print("| images | placement | wall time, best of runs (s) | all runs (s) | peak RSS (MiB) | largest child (MiB) |")
    print("|---|---|---|---|---|---|")
    for size, placement, wall, rss, workers, walls in rows:
        print(f"| {size:,} | {placement} | {wall:.1f} | {walls} | {rss:.0f} | {workers:.0f} |")


if __name__ == "__main__":
    main()
