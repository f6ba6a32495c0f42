"""`optiserve` command line: serve, eval, quantize, bench; qat, qad, prune, distill (cli_optimize.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from optiserve.engine.config import EngineConfig, ModelLoadError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: weights stay packed and run through the Triton / FP8 GEMM kernels")


def add_spec_args(p: argparse.ArgumentParser, default: str = "none") -> None:
    p.add_argument("--speculative", default=default,
                   help="none | auto (the shipped draft head for the default model, or DIR/draft_head) | ngram | "
                        "a draft head dir from `optiserve train-draft`")
    p.add_argument("--num-speculative-tokens", type=int, default=5, help="draft chain length")


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    fields = {"model": args.model, "dtype": args.dtype, "device": getattr(args, "device", EngineConfig.device),
              "speculative": getattr(args, "speculative", "none"),
              "num_speculative_tokens": getattr(args, "num_speculative_tokens", EngineConfig.num_speculative_tokens)}
    return EngineConfig(**{**fields, **overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optiserve", description="LLM inference server with model optimization")
    sub = parser.add_subparsers(dest="command", required=True)

    from .cli_quant import add_quant_args, add_quant_commands

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_model_args(serve)
    add_device_arg(serve)
    add_quant_args(serve)
    add_spec_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV slots)")
    serve.add_argument("--max-model-len", type=int, default=2048, help="context length per sequence")
    serve.add_argument("--served-model-name", default=None, help="model id clients use (default: the dir name)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--api-key", default=os.environ.get("OPTISERVE_API_KEY"),
                       help="require this Bearer token on /v1/* (env OPTISERVE_API_KEY)")
    serve.add_argument("--admin-token", default=os.environ.get("OPTISERVE_ADMIN_TOKEN"),
                       help="Bearer token for /admin/* (env OPTISERVE_ADMIN_TOKEN); without it /admin answers 403")
    serve.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut short")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length")
    serve.add_argument("--disable-docs", action="store_true",
                       help="do not serve /docs, /redoc, /openapi.json (with --api-key they need the key anyway)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests")

    add_quant_commands(sub)  # eval, quantize
    bench = sub.add_parser("bench", help="benchmarks that print and write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    decode = bench_sub.add_parser("decode", help="decode tok/s: our engine vs HF transformers generate")
    add_model_args(decode)
    decode.add_argument("--batch", type=int, default=1)
    decode.add_argument("--tokens", type=int, default=128)
    decode.add_argument("--against", default=None, help="also time our engine on this model, same run")
    decode.add_argument("--json", default=None, help="write the results to this file")
    spec = bench_sub.add_parser("spec", help="decode tok/s with and without speculation, τ and acceptance rate")
    add_model_args(spec)
    add_quant_args(spec)
    add_spec_args(spec, default="auto")
    spec.add_argument("--prompts", required=True, help="jsonl with `instruction` per row, or one prompt per line")
    spec.add_argument("--offset", type=int, default=0, help="first prompt row (e.g. past those used in training)")
    spec.add_argument("--num-prompts", type=int, default=16)
    spec.add_argument("--max-tokens", type=int, default=128)
    spec.add_argument("--json", default=None, help="write the results to this file")
    load = bench_sub.add_parser("load", help="drive a running server's HTTP API with concurrent clients")
    load.add_argument("--url", default="http://127.0.0.1:8000")
    load.add_argument("--model", default=None, help="model id (default: the server's)")
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--duration", type=float, default=30.0, help="seconds")
    load.add_argument("--max-tokens", type=int, default=32)
    load.add_argument("--prompts", default=None, help="jsonl with `instruction`, or one prompt per line")
    load.add_argument("--api-key", default=os.environ.get("OPTISERVE_API_KEY"))
    load.add_argument("--swaps", default="", help="comma-separated quant[:kv] formats to swap to during the run")
    load.add_argument("--admin-token", default=os.environ.get("OPTISERVE_ADMIN_TOKEN"))
    load.add_argument("--bad-fraction", type=float, default=0.0, help="share of invalid requests (each must get 4xx)")
    load.add_argument("--disconnect-fraction", type=float, default=0.0, help="share of streams dropped mid-way")
    load.add_argument("--seed", type=int, default=0, help="seeds the mix of good, bad and dropped requests")
    load.add_argument("--json", default=None, help="write the results to this file")
    sb = bench_sub.add_parser("serve", help="start a server, stream greedy chats at each concurrency (TTFT, ITL, "
                              "tok/s), then the engine alone on the same requests")
    sb.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    sb.add_argument("--requests", type=int, default=0, help="requests per level (default: 2x concurrency, >= 4)")
    sb.add_argument("--max-tokens", type=int, default=64)
    sb.add_argument("--prompt-tokens", type=int, default=0, help="pad each prompt to about N tokens (0: as is)")
    sb.add_argument("--shared-prefix-tokens", type=int, default=0, help="a system prompt shared by every request")
    sb.add_argument("--no-engine", action="store_true", help="skip the in-process engine comparison")
    sb.add_argument("--json", default=None, help="write the results to this file")
    sb.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: arguments for `optiserve serve`")
    from .cli_optimize import add_optimize_commands  # qat, qad, prune, distill

    add_optimize_commands(sub)
    td = sub.add_parser("train-draft", help="train an EAGLE-3 draft head on the target's own outputs")
    add_model_args(td)
    td.add_argument("--data", nargs="+", required=True,
                    help="chat jsonl (the target answers its instructions) and/or text files (labelled in a prefill)")
    td.add_argument("--output", required=True, help="directory for the head, its model card and checkpoints")
    td.add_argument("--max-prompts", type=int, default=None, help="use the first N rows of each jsonl")
    td.add_argument("--max-answer-tokens", type=int, default=256)
    td.add_argument("--text-tokens", type=int, default=100_000, help="tokens used from each text file")
    td.add_argument("--draft-vocab-size", type=int, default=4096)
    td.add_argument("--ttt-steps", type=int, default=3, help="training-time-test depth")
    td.add_argument("--epochs", type=float, default=2.0)
    td.add_argument("--lr", type=float, default=1e-3)
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: refuse new requests (503) while uvicorn drains the running ones, then exit."""

        def __init__(self, config: uvicorn.Config, app):
            super().__init__(config)
            self.app = app

        def handle_exit(self, sig, frame) -> None:
            self.app.state.draining = True
            super().handle_exit(sig, frame)

    from optiserve.engine.llm_engine import LLMEngine

    from .app import create_app
    from .cli_quant import apply_quant, quant_request
    from .security import ServerOptions

    cfg = engine_config(args, max_batch=args.max_batch, max_model_len=args.max_model_len)
    options = ServerOptions(api_key=args.api_key, admin_token=args.admin_token, max_waiting=args.max_waiting,
                            request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                            max_prompt_tokens=args.max_prompt_tokens, docs=not args.disable_docs)
    req = quant_request(args)
    engine = LLMEngine(cfg)
    apply_quant(engine, req)
    app = create_app(engine, args.served_model_name, options, req)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.drain_timeout))
    DrainingServer(config, app).run()


def run_bench_spec(args: argparse.Namespace) -> None:
    from optiserve.engine.bench import chat_prompt_ids
    from optiserve.engine.llm_engine import LLMEngine
    from optiserve.engine.spec.bench import bench_spec, load_prompt_file

    from .cli_quant import apply_quant, quant_request

    if args.speculative == "none":
        raise ValueError("bench spec compares against speculation: give --speculative auto|ngram|DIR")
    req = quant_request(args)
    engines = [LLMEngine(engine_config(args, max_batch=1, speculative=s)) for s in ("none", args.speculative)]
    for engine in engines:
        apply_quant(engine, req)
    prompts = chat_prompt_ids(engines[0].tokenizer, load_prompt_file(args.prompts, args.offset, args.num_prompts))
    label = {"model": args.model, "quant": req.quant, "kv_cache": req.kv_cache, "speculative": args.speculative,
             "num_speculative_tokens": args.num_speculative_tokens, "prompts_file": args.prompts,
             "offset": args.offset}
    bench_spec(engines[0], engines[1], prompts, args.max_tokens, label, args.json)


def run_bench_serve(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from optiserve.engine.bench import load_instructions
    from optiserve.engine.llm_engine import LLMEngine
    from optiserve.engine.weights import resolve_model_dir

    from .cli_quant import apply_quant, quant_request
    from .serve_bench import ServeBenchConfig, bench_serve

    serve_cli = [a for a in args.serve_args if a != "--"]
    serve_args = build_parser().parse_args(["serve", *serve_cli])
    levels = [int(c) for c in args.concurrency.split(",") if c]
    cfg = ServeBenchConfig(levels, args.requests, args.max_tokens, args.prompt_tokens, args.shared_prefix_tokens,
                           serve_cli)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(serve_args.model))

    def make_engine() -> LLMEngine:
        engine = LLMEngine(engine_config(serve_args, max_batch=1, max_model_len=serve_args.max_model_len))
        apply_quant(engine, quant_request(serve_args))
        return engine

    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    bench_serve(cfg, load_instructions(max(cfg.requests_at(c) for c in levels)), count,
                None if args.no_engine else make_engine, args.json)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            serve(args)
        elif args.command in ("eval", "quantize"):
            from .cli_quant import run_eval, run_quantize

            (run_eval if args.command == "eval" else run_quantize)(args)
        elif args.command == "bench" and args.bench_command == "decode":
            from optiserve.engine.bench import bench_decode

            bench_decode(args.model, args.batch, args.tokens, args.dtype, args.json, args.against)
        elif args.command == "bench" and args.bench_command == "spec":
            run_bench_spec(args)
        elif args.command == "train-draft":
            from optiserve.optimize.draft_train import DraftTrainConfig, train_draft

            cfg = DraftTrainConfig(args.draft_vocab_size, args.ttt_steps, epochs=args.epochs, lr=args.lr,
                                   max_answer_tokens=args.max_answer_tokens, max_prompts=args.max_prompts,
                                   text_tokens=args.text_tokens)
            train_draft(args.model, args.data, args.output, cfg)
        elif args.command == "bench" and args.bench_command == "serve":
            run_bench_serve(args)
        elif args.command == "bench" and args.bench_command == "load":
            from .load_bench import LoadConfig, bench_load, load_prompts

            cfg = LoadConfig(args.url, args.model, args.concurrency, args.duration, args.max_tokens, args.api_key,
                             load_prompts(args.prompts), [s for s in args.swaps.split(",") if s], args.admin_token,
                             args.bad_fraction, args.disconnect_fraction, args.seed)
            bench_load(cfg, args.json)
        else:
            from .cli_optimize import run_optimize_command

            run_optimize_command(args)
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"optiserve: error: {e}")


if __name__ == "__main__":
    main()
