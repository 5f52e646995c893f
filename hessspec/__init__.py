"""hessspec: the whole Hessian eigenvalue spectrum of a neural network, across training."""

from hessspec.results import CheckpointResult
from hessspec.spectrum import Density, Quadrature, density, quadrature, trace_estimate

__version__ = "0.1.0"

__all__ = [
    "CheckpointResult",
    "Density",
    "Quadrature",
    "density",
    "quadrature",
    "trace_estimate",
    "__version__",
]
