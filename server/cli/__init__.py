"""`optiserve` command line, one module per command group: `serve`; `eval`, `quantize` (quant.py); `bench decode |
spec | load | serve` (bench.py); `qat`, `qad`, `prune`, `distill`, `train-draft` (optimize.py). `args.py` holds the
options they share. The commands call into optiserve.engine / optiserve.optimize; heavy imports stay inside them."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
