"""`optiserve serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import gc
import os

from optiserve.engine.config import MAX_PREFILL_TOKENS, MIN_BATCHED_TOKENS, EngineConfig

from .args import (
    add_device_arg,
    add_lm_head_arg,
    add_model_args,
    add_quant_args,
    add_spec_args,
    apply_quant,
    engine_config,
    quant_request,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_serve_args(p)
    p.set_defaults(run=serve)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every `serve` option (also parsed by `bench serve` for the engine it compares against)."""
    add_model_args(p)
    add_lm_head_arg(p)
    add_device_arg(p)
    add_quant_args(p)
    add_spec_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV slots)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length per sequence")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="bytes of KV-cache blocks in the --kv-cache format, or a fraction (0-1) of the device's "
                        "memory (default: --max-batch sequences of --max-model-len)")
    p.add_argument("--kv-block-size", type=int, default=EngineConfig.kv_block_size,
                   help="tokens per KV-cache block (0: one block of the whole context per sequence, unpaged)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of full prompt blocks seen before (a shared system prompt is prefilled once); "
                        "default: on with --speculative none or ngram")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="chunked prefill: tokens per engine step, decode rows first, then chunks of waiting "
                        "prompts; KV blocks are then taken as tokens arrive and a sequence not yet scheduled in the "
                        "step is preempted (recomputed later) if they run out (0: whole prompts, blocks reserved up "
                        "front; default: "
                        f"max({MIN_BATCHED_TOKENS}, 2 x --max-batch) with --speculative none, else 0)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="chunked prefill: tokens a step computes while the requests waiting for their first token "
                        "outnumber those streaming (a wave of prompts is served in one step, not chunked over "
                        f"many; default: max({MAX_PREFILL_TOKENS}, --max-num-batched-tokens))")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the dir name)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--api-key", default=os.environ.get("OPTISERVE_API_KEY"),
                       help="require this Bearer token on /v1/* (env OPTISERVE_API_KEY)")
    p.add_argument("--admin-token", default=os.environ.get("OPTISERVE_ADMIN_TOKEN"),
                       help="Bearer token for /admin/* (env OPTISERVE_ADMIN_TOKEN); without it /admin answers 403")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut short")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length")
    p.add_argument("--disable-docs", action="store_true",
                   help="do not serve /docs, /redoc, /openapi.json (with --api-key they need the key anyway)")
    p.add_argument("--no-swap", action="store_true",
                   help="drop the unquantized weights after start-up quantization (live format swaps answer 409)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests")


def start_engine(cfg, req, no_swap: bool):
    """The engine with its start-up format applied (run `on_own_thread`: only the engine thread keeps a worker
    pool)."""
    from optiserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(cfg)
    apply_quant(engine, req)
    if no_swap:
        engine.drop_master()
    return engine


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

    from optiserve.engine.threads import on_own_thread
    from optiserve.server.app import create_app
    from optiserve.server.security import ServerOptions

    cfg = engine_config(args, max_batch=args.max_batch, max_model_len=args.max_model_len)
    options = ServerOptions(api_key=args.api_key, admin_token=args.admin_token, max_waiting=args.max_waiting,
                            request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                            max_prompt_tokens=args.max_prompt_tokens, docs=not args.disable_docs)
    req = quant_request(args)
    engine = on_own_thread(start_engine, cfg, req, args.no_swap)
    app = create_app(engine, args.served_model_name, options, req)
    # Start-up leaves ~390 k long-lived objects (torch, transformers, the model); frozen, a full collection no longer
    # walks them, so it holds the GIL the engine thread needs for ~0 ms instead of ~0.25 s (as vLLM and SGLang do)
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.drain_timeout))
    DrainingServer(config, app).run()
