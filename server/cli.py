"""`optiserve` command line: serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from optiserve.engine.config import EngineConfig, ModelLoadError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optiserve", description="LLM inference server with model optimization")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV slots)")
    serve.add_argument("--max-model-len", type=int, default=2048, help="context length per sequence")
    serve.add_argument("--served-model-name", default=None, help="model id clients use (default: the dir name)")
    serve.add_argument("--log-level", default="info")

    bench = sub.add_parser("bench", help="benchmarks that print and write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    decode = bench_sub.add_parser("decode", help="decode tok/s: our engine vs HF transformers generate")
    add_model_args(decode)
    decode.add_argument("--batch", type=int, default=1)
    decode.add_argument("--tokens", type=int, default=128)
    decode.add_argument("--json", default=None, help="write the results to this file")
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from optiserve.engine.llm_engine import LLMEngine

    from .app import create_app

    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_batch=args.max_batch, max_model_len=args.max_model_len)
    engine = LLMEngine(cfg)
    app = create_app(engine, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            serve(args)
        elif args.command == "bench" and args.bench_command == "decode":
            from optiserve.engine.bench import bench_decode

            bench_decode(args.model, args.batch, args.tokens, args.dtype, args.json)
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"optiserve: error: {e}")


if __name__ == "__main__":
    main()
