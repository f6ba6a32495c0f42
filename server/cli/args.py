"""Argument helpers shared by the command groups: the model, device, speculation and PTQ options, and the engine
they describe."""

from __future__ import annotations

import argparse

from optiserve.engine.config import LM_HEAD_DTYPES, EngineConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_lm_head_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-head-dtype", default="float32", choices=LM_HEAD_DTYPES,
                   help="the LM head's weights (computed from them by the CPU kernel; the embedding stays fp32)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: weights stay packed and run through the Triton / FP8 GEMM kernels")


def add_spec_args(p: argparse.ArgumentParser, default: str = "none") -> None:
    p.add_argument("--speculative", default=default,
                   help="none | auto (the shipped draft head for the default model, or DIR/draft_head) | ngram | "
                        "a draft head dir from `optiserve train-draft`")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="draft chain length (the default of --speculative-num-steps; 5)")
    p.add_argument("--speculative-num-steps", type=int, default=None, help="draft depth (chain or tree)")
    p.add_argument("--speculative-eagle-topk", type=int, default=None,
                   help="children expanded per frontier node of the draft tree; 1: a chain")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tree nodes verified per step (at most 15; default min(15, steps x topk))")
    p.add_argument("--speculative-min-prob", type=float, default=EngineConfig.speculative_min_prob,
                   help="a draft tree keeps only nodes at least this likely (the head's cumulative probability; "
                        "the n-gram branch's learned accuracy), up to --speculative-num-draft-tokens, and stops "
                        "expanding below it; 0 verifies the budget's best nodes however unlikely (EAGLE-2)")
    p.add_argument("--speculative-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="each step, draft as many tokens as the measured acceptance and step costs say pay (0: a "
                        "plain decode step); --no-speculative-adaptive always drafts the full chain or tree")
    p.add_argument("--speculative-draft-dtype", default=EngineConfig.speculative_draft_dtype, choices=LM_HEAD_DTYPES,
                   help="the draft head's weights (bfloat16: as it is saved; int8: per-channel, half the bytes a "
                        "draft step reads)")
    p.add_argument("--speculative-ngram-branch", action=argparse.BooleanOptionalAction, default=None,
                   help="n-gram lookup candidates join the head's draft tree as an extra branch, competing for "
                        "its nodes by their accuracy learned online. With a draft head and none of the five "
                        "draft-shape options given: --speculative-num-steps 4 --speculative-eagle-topk 3 "
                        "--speculative-num-draft-tokens 5 --speculative-ngram-branch (a chain where the model has "
                        "a sliding window); given any: a chain of 5 unless they say otherwise")


SPEC_FIELDS = ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens",
               "speculative_ngram_branch", "speculative_min_prob", "speculative_draft_dtype")


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    fields = {"model": args.model, "dtype": args.dtype, "device": getattr(args, "device", EngineConfig.device),
              "lm_head_dtype": getattr(args, "lm_head_dtype", EngineConfig.lm_head_dtype),
              "speculative": getattr(args, "speculative", "none"),
              "num_speculative_tokens": getattr(args, "num_speculative_tokens", EngineConfig.num_speculative_tokens),
              "speculative_adaptive": getattr(args, "speculative_adaptive", EngineConfig.speculative_adaptive),
              "kv_block_size": getattr(args, "kv_block_size", EngineConfig.kv_block_size),
              "kv_cache_memory": getattr(args, "kv_cache_memory", EngineConfig.kv_cache_memory),
              "kv_cache_format": getattr(args, "kv_cache", EngineConfig.kv_cache_format),
              "enable_prefix_caching": getattr(args, "enable_prefix_caching", EngineConfig.enable_prefix_caching),
              "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", EngineConfig.max_num_batched_tokens),
              "max_prefill_tokens": getattr(args, "max_prefill_tokens", EngineConfig.max_prefill_tokens),
              **{name: getattr(args, name) for name in SPEC_FIELDS if hasattr(args, name)}}
    return EngineConfig(**{**fields, **overrides})


def add_quant_args(p: argparse.ArgumentParser) -> None:
    from optiserve.engine.kv_quant import KV_FORMATS
    from optiserve.engine.weight_formats import WEIGHT_FORMATS
    from optiserve.optimize.ptq_pipeline import QuantRequest

    p.add_argument("--quant", default="none", choices=WEIGHT_FORMATS, help="weight (and activation) format")
    p.add_argument("--kv-cache", default="none", choices=KV_FORMATS, help="KV cache format")
    p.add_argument("--calib-data", default=None, help="text or jsonl (default: the slice shipped with optiserve)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--smoothquant-alpha", type=float, default=QuantRequest.smoothquant_alpha,
                   help="SmoothQuant migration strength (int8; default ModelOpt's)")


def quant_request(args: argparse.Namespace):
    from optiserve.optimize.ptq_pipeline import QuantRequest

    return QuantRequest(args.quant, args.kv_cache, args.calib_data, args.calib_samples, args.calib_seq_len,
                        args.smoothquant_alpha)


def apply_quant(engine, req) -> None:
    """Quantize a loaded engine's weights/KV cache as `req` asks (start-up PTQ, cached)."""
    if req.quant == "none" and req.kv_cache == "none":
        return
    from optiserve.optimize.ptq_pipeline import prepare_quantized

    engine.use_weights(prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req))
