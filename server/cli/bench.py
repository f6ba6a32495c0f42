"""`optiserve bench decode | spec | load | serve`: benchmarks that print and write JSON."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

from .args import (
    SPEC_FIELDS,
    add_lm_head_arg,
    add_model_args,
    add_quant_args,
    add_spec_args,
    apply_quant,
    engine_config,
    quant_request,
)
from .serve import add_serve_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print and write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    decode = bench_sub.add_parser("decode", help="decode tok/s: our engine vs HF transformers generate "
                                  "(and llama.cpp with --compare llama-cpp)")
    add_model_args(decode)
    add_lm_head_arg(decode)
    add_quant_args(decode)
    decode.add_argument("--compare", default=None, choices=["llama-cpp"],
                        help="also time llama.cpp (llama-cpp-python, optional extra) on the default model's GGUF")
    decode.add_argument("--rounds", type=int, default=2, help="alternating rounds over every side")
    decode.add_argument("--batch", type=int, default=1)
    decode.add_argument("--tokens", type=int, default=128)
    decode.add_argument("--against", default=None, help="also time our engine on this model, same run")
    decode.add_argument("--also-quant", default="", help="comma-separated weight formats to also time our engine in "
                        "(same model, KV cache and calibration), same run, e.g. none,int4")
    decode.add_argument("--prompts", default=None, help="jsonl with `instruction` per row, or one prompt per line "
                        "(default: a built-in set of chat instructions)")
    decode.add_argument("--json", default=None, help="write the results to this file")
    spec = bench_sub.add_parser("spec", help="decode tok/s with and without speculation, τ and acceptance rate")
    add_model_args(spec)
    add_lm_head_arg(spec)
    add_quant_args(spec)
    add_spec_args(spec, default="auto")
    spec.add_argument("--prompts", required=True, help="jsonl with `instruction` per row, or one prompt per line")
    spec.add_argument("--offset", type=int, default=0, help="first prompt row (e.g. past those used in training)")
    spec.add_argument("--num-prompts", type=int, default=16)
    spec.add_argument("--max-tokens", type=int, default=128)
    spec.add_argument("--batch", type=int, default=1, help="prompts decoded together (continuous batching)")
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
    sb.add_argument("--prompts", default=None, help="jsonl with `instruction` per row, or one prompt per line "
                    "(default: a built-in set of chat instructions)")
    sb.add_argument("--json", default=None, help="write the results to this file")
    sb.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: arguments for `optiserve serve`")
    decode.set_defaults(run=run_bench_decode)
    spec.set_defaults(run=run_bench_spec)
    load.set_defaults(run=run_bench_load)
    sb.set_defaults(run=run_bench_serve)


def run_bench_decode(args: argparse.Namespace) -> None:
    from optiserve.engine.bench import DecodeBench, bench_decode
    from optiserve.engine.weight_formats import WEIGHT_FORMATS, check_format

    req = quant_request(args)
    also = {}
    for fmt in filter(None, args.also_quant.split(",")):
        check_format(fmt, WEIGHT_FORMATS, "--also-quant")
        also[fmt] = functools.partial(apply_quant, req=dataclasses.replace(req, quant=fmt))
    cfg = DecodeBench(args.model, args.batch, args.tokens, args.dtype, args.lm_head_dtype, args.against, args.compare,
                      args.prompts, args.rounds, {"quant": req.quant, "kv_cache": req.kv_cache})
    bench_decode(cfg, args.json, functools.partial(apply_quant, req=req), also)


def run_bench_spec(args: argparse.Namespace) -> None:
    from optiserve.engine.chat import chat_prompt_ids
    from optiserve.engine.llm_engine import LLMEngine
    from optiserve.engine.spec.bench import bench_spec, load_prompt_file

    if args.speculative == "none":
        raise ValueError("bench spec compares against speculation: give --speculative auto|ngram|DIR")
    req = quant_request(args)
    # One engine decodes plainly, with the full draft and with the adaptive budget (engine/spec/bench.py); every
    # mode prefills whole prompts (speculation cannot chunk), so only the decoding differs between them.
    engine = LLMEngine(engine_config(args, max_batch=args.batch, speculative_adaptive=True, max_num_batched_tokens=0))
    apply_quant(engine, req)
    prompts = chat_prompt_ids(engine.tokenizer, load_prompt_file(args.prompts, args.offset, args.num_prompts))
    label = {"model": args.model, "quant": req.quant, "kv_cache": req.kv_cache, "speculative": args.speculative,
             **{k: getattr(engine.cfg, k) for k in ("num_speculative_tokens", *SPEC_FIELDS)},
             "prompts_file": args.prompts, "offset": args.offset, "batch": args.batch}
    bench_spec(engine, prompts, args.max_tokens, label, args.json, args.batch)


def run_bench_load(args: argparse.Namespace) -> None:
    from optiserve.server.load_bench import LoadConfig, bench_load, load_prompts

    cfg = LoadConfig(args.url, args.model, args.concurrency, args.duration, args.max_tokens, args.api_key,
                     load_prompts(args.prompts), [s for s in args.swaps.split(",") if s], args.admin_token,
                     args.bad_fraction, args.disconnect_fraction, args.seed)
    bench_load(cfg, args.json)


def run_bench_serve(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from optiserve.engine.bench import load_instructions
    from optiserve.engine.llm_engine import LLMEngine
    from optiserve.engine.weights import resolve_model_dir
    from optiserve.server.serve_bench import ServeBenchConfig, bench_serve

    serve_cli = [a for a in args.serve_args if a != "--"]
    serve_parser = argparse.ArgumentParser(prog="optiserve serve")
    add_serve_args(serve_parser)
    serve_args = serve_parser.parse_args(serve_cli)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    cfg = ServeBenchConfig(levels, args.requests, args.max_tokens, args.prompt_tokens, args.shared_prefix_tokens,
                           serve_cli)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(serve_args.model))

    def make_engine(max_batch: int, **overrides) -> LLMEngine:
        engine = LLMEngine(engine_config(serve_args, max_batch=max_batch, max_model_len=serve_args.max_model_len,
                                         **overrides))
        apply_quant(engine, quant_request(serve_args))
        return engine

    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    bench_serve(cfg, load_instructions(max(cfg.requests_at(c) for c in levels), args.prompts), count,
                None if args.no_engine else make_engine, args.json)
