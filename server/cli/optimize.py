"""`optiserve qat | qad | prune | distill | train-draft`: the model-optimization commands (logic in optiserve.optimize).

The training commands run unchanged under `torchrun --nproc_per_node N -m optiserve.server.cli ...` (data
parallel over torch.distributed; see optimize/train.py). Heavy imports stay inside the functions.
"""

from __future__ import annotations

import argparse
import contextlib

from .args import add_model_args, add_quant_args, quant_request


def add_train_args(p: argparse.ArgumentParser, lr: float, seq_len: int) -> None:
    p.add_argument("--data", nargs="+", required=True, help="text or jsonl files (chat jsonl: chat template)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (global batches)")
    p.add_argument("--output", required=True, help="checkpoint dir; a rerun with the same dir resumes")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step per process")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training sequence")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (then cosine decay)")
    p.add_argument("--save-every", type=int, default=50, help="steps between resume states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore a resume state in --output")
    p.add_argument("--resume", action="store_true", help="require a resume state in --output")
    p.add_argument("--eval-data", default=None, help="evaluate the written checkpoint on this file (ppl, KL)")
    p.add_argument("--eval-windows", type=int, default=40, help="512-token windows of --eval-data")
    p.add_argument("--json", default=None, help="write the summary to this file")


def add_distill_loss_args(p: argparse.ArgumentParser, kl_help: str) -> None:
    p.add_argument("--data-loss", type=float, default=0.0, help=f"weight of the data cross entropy added to {kl_help}")
    p.add_argument("--hidden-loss", type=float, default=0.0,
                   help="weight of the intermediate-state (normalised MSE) loss; needs equal hidden sizes")


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (("qat", "quantization-aware training: fake quant + STE from PTQ, ModelOpt export"),
                            ("qad", "quantization-aware distillation from the unquantized model")):
        p = sub.add_parser(name, help=help_text)
        add_model_args(p)
        add_quant_args(p)
        add_train_args(p, lr=1e-5, seq_len=256)
        if name == "qad":
            add_distill_loss_args(p, "the KL to the unquantized model")
        p.set_defaults(run=run_qat)
    pr = sub.add_parser("prune", help="Minitron-style width or depth pruning to a parameter budget")
    add_model_args(pr)
    pr.add_argument("--target-params", type=float, required=True, help="parameter budget (embeddings count)")
    pr.add_argument("--axis", default="depth", choices=["width", "depth"])
    pr.add_argument("--output", required=True)
    pr.add_argument("--data", nargs="*", default=None, help="calibration text/jsonl (default: the shipped slice)")
    pr.add_argument("--calib-samples", type=int, default=8)
    pr.add_argument("--calib-seq-len", type=int, default=256)
    pr.add_argument("--json", default=None, help="write the summary to this file")
    pr.set_defaults(run=run_prune)
    ds = sub.add_parser("distill", help="distil a teacher into a (pruned) checkpoint: logit KL (+ hidden states)")
    ds.add_argument("--model", required=True, help="the student checkpoint dir (e.g. from `optiserve prune`)")
    ds.add_argument("--teacher", default="default", help="'default' or a checkpoint dir")
    add_train_args(ds, lr=2e-5, seq_len=256)
    add_distill_loss_args(ds, "the KL to the teacher")
    ds.set_defaults(run=run_distill)
    td = sub.add_parser("train-draft", help="train an EAGLE-3 draft head on the target's own outputs")
    add_model_args(td)
    td.add_argument("--data", nargs="+", required=True,
                    help="chat jsonl (the target answers its instructions) and/or text files (labelled in a prefill)")
    td.add_argument("--output", required=True, help="directory for the head, its model card and checkpoints")
    td.add_argument("--max-prompts", type=int, default=None, help="use the first N rows of each jsonl")
    td.add_argument("--max-answer-tokens", type=int, default=256)
    td.add_argument("--text-tokens", type=int, default=100_000, help="tokens used from each text file")
    add_draft_vocab_arg(td)
    td.add_argument("--ttt-steps", type=int, default=3, help="training-time-test depth")
    td.add_argument("--epochs", type=float, default=2.0)
    td.add_argument("--lr", type=float, default=1e-3)
    td.set_defaults(run=run_train_draft)
    tl = sub.add_parser("train-draft-large", help="train a draft head on ~10x the data: an on-disk feature store, "
                        "sampled answers, early stopping on held-out tau (resumable stages)")
    add_model_args(tl)
    tl.add_argument("--instructions", required=True, help="AlpacaEval-style jsonl (instruction, output)")
    tl.add_argument("--texts", nargs="*", default=[], help="text files labelled in a prefill (never a test split)")
    tl.add_argument("--output", required=True, help="stores, answers, checkpoints and the head; rerun to resume")
    tl.add_argument("--train-rows", type=int, nargs=2, default=(0, 650), metavar=("START", "STOP"))
    tl.add_argument("--heldout-rows", type=int, nargs=2, default=(650, 700), metavar=("START", "STOP"))
    tl.add_argument("--temperatures", type=float, nargs="+", default=(0.7, 1.0), help="sampled-answer temperatures")
    tl.add_argument("--max-samples", type=int, default=16, help="sampled answers per prompt and temperature")
    tl.add_argument("--target-tokens", type=int, default=3_200_000, help="stop adding data past this many tokens")
    tl.add_argument("--max-batch", type=int, default=16)
    tl.add_argument("--generate-quant", default="none",
                    help="PTQ format the training answers are generated in (faster); the unquantized target labels")
    tl.add_argument("--teacher-top-k", type=int, default=8,
                    help="the target's top-k next tokens and probabilities stored per training token (0: none)")
    tl.add_argument("--teacher-probs", action="store_true",
                    help="train on the stored top-k distribution (cross-entropy against it) instead of the argmax")
    tl.add_argument("--max-answer-tokens", type=int, default=256)
    add_draft_vocab_arg(tl)
    tl.add_argument("--epochs", type=float, default=4.0)
    tl.add_argument("--max-steps", type=int, default=None)
    tl.add_argument("--lr", type=float, default=5e-4)
    tl.add_argument("--eval-every", type=int, default=250, help="steps between held-out tau evaluations")
    tl.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    tl.add_argument("--compare-steps", type=int, default=300, help="steps per LM-head init in the comparison")
    tl.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="training matmuls in bf16 with fp32 master weights (default: where the CPU has AMX or "
                    "AVX512-BF16; elsewhere bf16 is emulated, far slower than fp32)")
    tl.add_argument("--init-head", default=None,
                    help="fine-tune this saved head (its weights and vocabulary, widened to --draft-vocab-size "
                    "if that is larger) instead of training a new one")
    tl.set_defaults(run=run_train_draft_large)


def train_config(args: argparse.Namespace):
    from pathlib import Path

    from optiserve.optimize.train import STATE_FILE, TrainConfig

    if args.resume and args.fresh:
        raise ValueError("--resume and --fresh contradict each other")
    if args.resume and not (Path(args.output) / STATE_FILE).is_file():
        raise ValueError(f"--resume: no training state in {args.output}")
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                       warmup=args.warmup, save_every=args.save_every, seed=args.seed, fresh=args.fresh)


def run_prune(args: argparse.Namespace) -> None:
    from optiserve.optimize.prune import PruneRequest, run_prune

    run_prune(args.model, PruneRequest(int(args.target_params), args.axis), args.output, args.data,
              args.calib_samples, args.calib_seq_len, args.json)


def run_qat(args: argparse.Namespace) -> None:
    """qat, and qad (QAT whose loss is the distillation loss from the unquantized model)."""
    from optiserve.optimize.distill import DistillLoss
    from optiserve.optimize.qat import run_qat

    loss = DistillLoss(args.data_loss, args.hidden_loss) if args.command == "qad" else None
    with process_group_cleanup():
        run_qat(args.model, quant_request(args), args.data, args.output, train_config(args), loss, **eval_args(args))


def add_draft_vocab_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-vocab-size", type=int, default=4096,
                        help="target tokens the head predicts, the most frequent in the data")


def run_distill(args: argparse.Namespace) -> None:
    from optiserve.optimize.distill import DistillLoss, run_distill

    with process_group_cleanup():
        run_distill(args.model, args.teacher, args.data, args.output, train_config(args),
                    DistillLoss(args.data_loss, args.hidden_loss), **eval_args(args))


def run_train_draft(args: argparse.Namespace) -> None:
    from optiserve.optimize.draft_train import DraftTrainConfig, train_draft

    cfg = DraftTrainConfig(args.draft_vocab_size, args.ttt_steps, epochs=args.epochs, lr=args.lr,
                           max_answer_tokens=args.max_answer_tokens, max_prompts=args.max_prompts,
                           text_tokens=args.text_tokens)
    train_draft(args.model, args.data, args.output, cfg)


def run_train_draft_large(args: argparse.Namespace) -> None:
    from optiserve.optimize.draft_fit import DraftTrainConfig, native_bf16_matmul
    from optiserve.optimize.draft_large import LargeDataConfig, train_large

    data = LargeDataConfig(args.instructions, args.texts, args.train_rows, args.heldout_rows, args.temperatures,
                           args.max_samples, args.target_tokens, args.max_batch, args.generate_quant,
                           args.teacher_top_k)
    cfg = DraftTrainConfig(args.draft_vocab_size, epochs=args.epochs, lr=args.lr,
                           max_answer_tokens=args.max_answer_tokens,
                           max_steps=args.max_steps, eval_every=args.eval_every, patience=args.patience,
                           bf16_autocast=native_bf16_matmul() if args.bf16_autocast is None else args.bf16_autocast,
                           teacher_probs=args.teacher_probs)
    train_large(args.model, data, args.output, cfg, args.compare_steps, args.init_head)


def eval_args(args: argparse.Namespace) -> dict:
    return {"eval_data": args.eval_data, "eval_windows": args.eval_windows, "json_path": args.json}


@contextlib.contextmanager
def process_group_cleanup():
    """Under torchrun, leave torch.distributed's process group cleanly whether training ends or fails."""
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
