"""The `optiserve` parser: each command group adds its subcommands and the function that runs them."""

from __future__ import annotations

import argparse
import logging
import sys

from optiserve.engine.config import ModelLoadError

from . import bench, optimize, quant, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optiserve", description="LLM inference server with model optimization")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, quant, bench, optimize):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.run(args)
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"optiserve: error: {e}")
