"""Which part of the Hessian carries the outliers and the negative eigenvalues: H = G + R on the demo's networks.

Trains the demo's two networks (the 6-layer width-64 ReLU MLP on digits, with and without BatchNorm; the demo's
SGD recipe and checkpoint steps), then analyses chosen checkpoints for the Hessian H, the generalised Gauss-Newton
matrix G and the residual R = H - G in the same data passes (``analyze_many``), in
float64, BN in train mode with the training batch size, on all 1,797 examples. Prints one Markdown row per
(network, step, curvature): the top eigenvalue, the outliers above the bulk edge (among the top 20), the smallest
Ritz value, the quadrature mass below -1e-3 * lambda_1(H) and the trace.

    PYTHONPATH=. python benchmarks/curvature_split.py [OUT_DIR] [--steps 0,100,3000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from hessspec.analysis import AnalysisSettings, analyze_many
from hessspec.checkpoints import apply_state_dict, load_checkpoint
from hessspec.curvature.gauss_newton import CurvatureOperator
from hessspec.data.datasets import digits_arrays
from hessspec.demo import DemoConfig, _train_run
from hessspec.models import build_model

CURVATURES = ("hessian", "ggn", "residual")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="results/curvature_split")
    parser.add_argument("--steps", default="0,100,3000")
    parser.add_argument("--lanczos-steps", type=int, default=60)
    parser.add_argument("--probes", type=int, default=3)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    config = DemoConfig()
    images, labels = digits_arrays()
    x, y = torch.from_numpy(images).double(), torch.from_numpy(labels)
    batches = [(x[i : i + config.batch_size], y[i : i + config.batch_size]) for i in range(0, len(x), 128)]
    settings = AnalysisSettings(
        lanczos_steps=args.lanczos_steps, probes=args.probes, top_k=20, seed=0, curvatures=CURVATURES
    )
    print("| network | step | matrix | λ1 | outliers | smallest Ritz value | mass < -1e-3 λ1(H) | trace ± s.e. |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model_name, label) in config.runs.items():
        ckpt_dir = Path(args.out) / "checkpoints" / name
        _train_run(name, model_name, config, ckpt_dir, lambda line: None)
        model = build_model(model_name, num_classes=10).double()
        for step in steps:
            path = next(p for p in ckpt_dir.iterdir() if p.suffix == ".pt" and int(p.stem.split("_")[-1]) == step)
            apply_state_dict(model, load_checkpoint(path).state_dict)
            op = CurvatureOperator(model, batches, bn_mode="train")
            t0 = time.perf_counter()
            results = analyze_many(op, settings, step=step)
            seconds = time.perf_counter() - t0
            threshold = 1e-3 * results[0].lambda_max
            for r in results:
                print(
                    f"| {label} | {step} | {r.curvature} | {r.lambda_max:.4g} | {r.num_outliers()} | "
                    f"{float(np.min(r.nodes)):.4g} | {r.negative_mass(threshold):.4f} | "
                    f"{r.trace:.4g} ± {r.trace_stderr:.2g} |",
                    flush=True,
                )
            hvp = results[0].timings["hvp"]
            print(f"<!-- {label} step {step}: {seconds:.0f} s, of which products {hvp:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
