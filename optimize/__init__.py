"""optiserve.optimize."""
