"""`optiserve eval | quantize`: a format's perplexity and KL, and a ModelOpt-layout checkpoint (logic in
optiserve.optimize)."""

from __future__ import annotations

import argparse

from optiserve.engine.config import check_device

from .args import add_device_arg, add_lm_head_arg, add_model_args, add_quant_args, quant_request


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the eval and quantize subcommands to the `optiserve` parser."""
    ev = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the unquantized model")
    add_model_args(ev)
    add_lm_head_arg(ev)
    add_device_arg(ev)
    add_quant_args(ev)
    ev.add_argument("--data", required=True, help="text or jsonl file, e.g. ../shared/data/wikitext-2/test.txt")
    ev.add_argument("--window", type=int, default=512, help="tokens per window")
    ev.add_argument("--max-windows", type=int, default=40)
    ev.add_argument("--reference", default=None,
                    help="unquantized model to compare a quantized/pruned checkpoint dir against (KL, top-1)")
    ev.add_argument("--json", default=None, help="write the results to this file")
    ev.add_argument("--compare-modelopt", action="store_true",
                    help="also quantize with NVIDIA ModelOpt (same windows, same calibration data); print both")
    ev.set_defaults(run=run_eval)

    qz = sub.add_parser("quantize", help="calibrate, quantize and write a ModelOpt-layout Hugging Face checkpoint")
    add_model_args(qz)
    add_device_arg(qz)
    add_quant_args(qz)
    qz.add_argument("--output", required=True, help="directory to write the checkpoint to")
    qz.set_defaults(run=run_quantize)


def run_eval(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from optiserve.engine.lm_head import with_lm_head
    from optiserve.engine.quantized_checkpoint import is_modelopt_checkpoint
    from optiserve.engine.weights import load_model, resolve_model_dir
    from optiserve.optimize.data import read_texts, token_windows
    from optiserve.optimize.evaluate import evaluate, evaluate_checkpoint, write_result

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tokenizer, read_texts(args.data, tokenizer), args.window, args.max_windows)
    req, device = quant_request(args), check_device(args.device)
    checkpoint = is_modelopt_checkpoint(model_dir) or args.reference
    if args.compare_modelopt:
        from optiserve.optimize.modelopt_compare import require_modelopt

        require_modelopt(req.quant, bool(checkpoint), args.dtype)
    if checkpoint:  # a produced checkpoint, served as the server would
        if req.quant != "none" or req.kv_cache != "none":
            raise ValueError("--quant/--kv-cache apply to an unquantized model, not to a checkpoint dir")
        ref = args.reference and load_model(resolve_model_dir(args.reference), args.window, torch.float32, device)
        result = evaluate_checkpoint(model_dir, windows, reference=ref or None, device=device)
        write_result(result, {"model": args.model, "data": args.data, "reference": args.reference}, args.json)
        return
    model = load_model(model_dir, args.window, getattr(torch, args.dtype), device)
    head = args.lm_head_dtype
    if req.quant == "none" and req.kv_cache == "none":
        result = evaluate(with_lm_head(model, head), windows, reference=None if head == "float32" else model)
    else:
        from optiserve.optimize.ptq_pipeline import prepare_quantized

        q = prepare_quantized(model_dir, model, tokenizer, req)
        result = evaluate(with_lm_head(q.model, head), windows, reference=model, kv=q.kv)
    extra = {"model": args.model, "data": args.data, "quant": req.quant, "kv_cache": req.kv_cache,
             "lm_head_dtype": head}
    if args.compare_modelopt:
        from optiserve.optimize.modelopt_compare import compare_with_modelopt, print_comparison

        extra["modelopt"] = compare_with_modelopt(model_dir, tokenizer, req, windows)
    write_result(result, extra, args.json)
    if args.compare_modelopt:
        print_comparison(req.quant, result, extra["modelopt"])


def run_quantize(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from optiserve.engine.quantized_checkpoint import is_modelopt_checkpoint
    from optiserve.engine.weights import load_model, resolve_model_dir
    from optiserve.optimize.export import export_checkpoint
    from optiserve.optimize.ptq_pipeline import prepare_quantized

    req = quant_request(args)
    if req.quant == "none" and req.kv_cache == "none":
        raise ValueError("nothing to quantize: give --quant and/or --kv-cache")
    model_dir = resolve_model_dir(args.model)
    if is_modelopt_checkpoint(model_dir):
        raise ValueError(f"{model_dir} is already a quantized (ModelOpt) checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, max(req.calib_seq_len, 16), getattr(torch, args.dtype), check_device(args.device))
    q = prepare_quantized(model_dir, model, tokenizer, req)
    out = export_checkpoint(model_dir, q, args.output)
    print(f"wrote {out}")
