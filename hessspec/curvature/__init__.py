"""Linear operators of curvature (Hessian, ...) and what they differentiate: models, batches and losses.

Imports torch; never h5py, click or matplotlib.
"""
