"""What evaluating the model in float32 or bfloat16 costs in accuracy, against exact float64 truths.

Two problems small enough to diagonalise: the 3,466-parameter tanh MLP trained 200 SGD steps on digits
(tests/test_analysis.py) and a two-convolution CNN with BatchNorm in train mode (1,986 parameters) at its
initialisation, on 512 digits images in batches of 128. For each dtype the model is evaluated in (products
accumulated in float64, Lanczos in float64, 90 steps, 3 probes, seed 0), the table gives the largest relative
error of the top-10 eigenvalues, the largest absolute error of the gradient overlap r_k (k = 1..10, against the
exact eigenvectors) and the 1-Wasserstein distance of the SLQ density to the exact spectrum, relative to the
spectral width (float64's own W1 is the quadrature's: the other rows should be compared with it).

    python benchmarks/precision.py            # prints a markdown table
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from hessspec.analysis import AnalysisSettings, analyze
from hessspec.curvature.hessian import HessianOperator
from tests import reference as ref


def digits_mlp():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return "digits MLP (3,466 params)", model, ref.make_batches(x, y, 500), "train"


def digits_cnn_bn():
    from hessspec.data.datasets import digits_arrays

    images, labels = digits_arrays()
    x, y = torch.from_numpy(images).double()[:512], torch.from_numpy(labels)[:512]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    ).double()  # fmt: skip
    return "digits CNN + BN, train mode (1,986 params)", model, ref.make_batches(x, y, 128), "train"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, model, batches, bn_mode in (digits_mlp(), digits_cnn_bn()):
        exact_op = HessianOperator(model, batches, bn_mode=bn_mode, block_strategy="reverse")
        H = exact_op.to_dense()
        evals, evecs = torch.linalg.eigh(H)
        evals, evecs = evals.flip(0), evecs.flip(1)
        g = exact_op.loss_and_gradient().gradient
        exact_ratio = torch.cumsum((evecs[:, :10].T @ g) ** 2, 0) / (g @ g)
        width = float(evals[0] - evals[-1])
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            op = HessianOperator(model, batches, bn_mode=bn_mode, dtype=dtype, block_strategy="reverse")
            t0 = time.perf_counter()
            r = analyze(op, AnalysisSettings(lanczos_steps=90, probes=3, top_k=10, seed=0, determinism_check=False))
            seconds = time.perf_counter() - t0
            top = np.abs(r.top_eigenvalues[:10] - evals[:10].numpy()) / np.abs(evals[:10].numpy())
            overlap = np.abs(r.overlap_ratio[:10] - exact_ratio.numpy()).max()
            w1 = ref.wasserstein1(r.nodes, r.weights, evals.numpy(), np.ones(op.n)) / width
            label = str(dtype).removeprefix("torch.")
            rows.append(f"| {name} | {label} | {top.max():.1e} | {overlap:.1e} | {w1:.1e} | {seconds:.1f} |")
    print("| problem | model dtype | top-10 eigenvalues, max rel. error | r_1..r_10, max abs. error | "
          "W1 / spectral width | seconds (1 thread) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
