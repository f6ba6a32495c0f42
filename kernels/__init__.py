"""optiserve.kernels."""
