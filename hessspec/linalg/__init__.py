"""Pure numerics on callables and arrays: Lanczos, Gauss quadrature and densities, Ritz pairs and overlaps."""
