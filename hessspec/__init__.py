"""hessspec: the whole Hessian eigenvalue spectrum of a neural network, across training.

The public Python API. Names are imported lazily, so ``import hessspec.store`` or ``hessspec.plots`` does not
load torch, and ``import hessspec`` is cheap::

    import hessspec
    op = hessspec.HessianOperator(model, batches, bn_mode="train")       # H of the mean loss over all batches
    op = hessspec.HessianOperator(lm, token_batches, loss="lm")          # batches of dicts; mean over all tokens
    result = hessspec.analyze(op, hessspec.AnalysisSettings(lanczos_steps=90, probes=10))
    result.top_eigenvalues, result.overlap_ratio, result.density().values
    run = hessspec.load_results("results/nobn.h5")                       # typed results from an HDF5 file
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # numerical core
    "HessianOperator": "hessspec.curvature.hessian",
    "DeterminismError": "hessspec.curvature.hessian",
    "CurvatureOperator": "hessspec.curvature.gauss_newton",
    "Loss": "hessspec.curvature.losses",
    "LossError": "hessspec.curvature.losses",
    "get_loss": "hessspec.curvature.losses",
    "lanczos": "hessspec.linalg.lanczos",
    "LanczosResult": "hessspec.linalg.lanczos",
    "quadrature": "hessspec.linalg.spectrum",
    "density": "hessspec.linalg.spectrum",
    "trace_estimate": "hessspec.linalg.spectrum",
    "negative_mass": "hessspec.linalg.spectrum",
    "bulk_edge": "hessspec.linalg.spectrum",
    "js_distance": "hessspec.linalg.spectrum",
    "Quadrature": "hessspec.linalg.spectrum",
    "Density": "hessspec.linalg.spectrum",
    "ritz_pairs": "hessspec.linalg.overlap",
    "gradient_overlap": "hessspec.linalg.overlap",
    # one checkpoint
    "analyze": "hessspec.analysis",
    "analyze_many": "hessspec.analysis",
    "AnalysisSettings": "hessspec.analysis",
    "CheckpointResult": "hessspec.results",
    # files, models, data, pipeline
    "load_results": "hessspec.store",
    "RunResults": "hessspec.store",
    "merge": "hessspec.store",
    "load_checkpoint": "hessspec.checkpoints",
    "build_model": "hessspec.models",
    "load_dataset": "hessspec.data.datasets",
    "materialize": "hessspec.data.datasets",
    "AnalysisJob": "hessspec.runner.job",
    "run": "hessspec.runner.pipeline",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'hessspec' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return __all__
