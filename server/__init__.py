"""optiserve.server."""
