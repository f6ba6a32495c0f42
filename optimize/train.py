"""The one training loop behind QAT, QAD and distillation: data-parallel, resumable, with progress and a summary.

Run as is it trains on one process; under `torchrun` each process takes its own slice of every global batch and
gradients are averaged with `torch.distributed.all_reduce` (gloo on CPU, nccl on GPUs) before each optimizer step,
which is what DDP does, without wrapping the model (the losses call `hidden_states`, not `forward`).
Resume state (trainable tensors, optimizer, step, losses) lives in `<output>/optiserve-train-state.pt`; a rerun
with the same output continues from it, also to extend a finished run with a larger `--steps`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from optiserve.engine.model import Transformer
from optiserve.engine.runner import attention_mask

STATE_FILE = "optiserve-train-state.pt"
EVAL_WINDOW = 512  # tokens per evaluation window, as `optiserve eval` uses
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """Optimizer and batching settings shared by qat, qad and distill."""

    steps: int
    lr: float = 1e-5
    batch_size: int = 4  # sequences per step on each process
    seq_len: int = 256
    warmup: int = 0  # linear warm-up steps; then cosine decay to `min_lr_ratio` * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    save_every: int = 50
    seed: int = 0
    fresh: bool = False  # ignore a resume state in the output dir
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("--steps, --batch-size and --save-every must be >= 1")
        if self.seq_len < 8:
            raise ValueError("--seq-len must be >= 8")
        if not self.lr > 0 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--lr must be > 0, --warmup >= 0")


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    first_loss: float | None  # mean loss of the first step run in this process (None if nothing ran)
    final_loss: float | None  # mean loss of the last step
    tokens_seen: int  # over all processes and all steps, resumed ones included
    seconds: float
    world_size: int
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def main_first(d: Dist, fn: Callable[[], object]) -> object:
    """Run `fn` on rank 0 first, then on the others: one process fills a disk cache, the rest read it."""
    if d.main:
        out = fn()
        barrier(d)
        return out
    barrier(d)
    return fn()


def causal_inputs(tokens: torch.Tensor, model: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, S] and the causal mask [1, 1, G*S, S] (every row is a fresh sequence from position 0)."""
    B, S = tokens.shape
    positions = torch.arange(S, device=tokens.device).expand(B, S)
    mask = attention_mask(positions[:1], S, model.cfg.group_size, model.cfg.sliding_window)
    return positions, mask


def train_logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] from states [..., H] through `embed.weight` when tied: the LM head's copy is not trained
    and would drift from the embeddings (see `sync_tied_head`)."""
    head = model.embed.weight if model.cfg.tie_word_embeddings else model.lm_head.weight
    return F.linear(model.norm(x), head).float()


def sync_tied_head(model: Transformer) -> None:
    """Refresh the LM head's copy of the (trained) embeddings so inference and export agree."""
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight_t = torch.nn.Parameter(model.embed.weight.detach().clone().t(), requires_grad=False)


def data_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: logits [B, S, V] against tokens [B, S]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per next-token distribution; logits [B, S, V]."""
    s = F.log_softmax(student_logits.flatten(0, 1), dim=-1)
    t = F.log_softmax(teacher_logits.flatten(0, 1), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(windows: torch.Tensor, order: torch.Tensor, step: int, cfg: TrainConfig, d: Dist) -> torch.Tensor:
    """This process's windows [B, S] of global batch `step` (a fixed shuffle, cycled): a resumed run sees the
    same batches it would have seen."""
    start = (step * d.world + d.rank) * cfg.batch_size
    idx = order[torch.arange(start, start + cfg.batch_size) % len(order)]
    return windows[idx]


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """All-reduce the gradients of `params` as one flat buffer and divide by the world size (DDP's average)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = chunk.view_as(p)


def mean_over_ranks(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world


def save_state(path: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, step: int,
               losses: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "params": {n: p.detach() for n, p in params.items()}, "optimizer": opt.state_dict(),
                "losses": losses}, tmp)
    tmp.rename(path)  # atomic: an interrupted save leaves the previous state


def load_state(path: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, list]:
    state = torch.load(path, weights_only=False)  # our own file: tensors, ints, floats
    if set(state["params"]) != set(params):
        raise ValueError(f"{path} was written by a different run (other trainable tensors); pass --fresh")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["losses"]


def train(params: dict[str, torch.nn.Parameter], loss_fn: LossFn, windows: list[list[int]], cfg: TrainConfig,
          output: Path, d: Dist, desc: str) -> TrainSummary:
    """Minimise `loss_fn(batch [B, S])` over `params` for `cfg.steps` global steps; resumes from `output`."""
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, losses = 0, []
    if state_path.is_file() and not cfg.fresh:
        start, losses = load_state(state_path, params, opt)
    data = torch.tensor(windows)  # [N, S]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    plist = list(params.values())
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=desc, unit="step",
               disable=not (cfg.progress and d.main))
    t0, first = time.perf_counter(), None
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss, metrics = loss_fn(batch_at(data, order, step, cfg, d))
        loss.backward()
        average_gradients(plist, d)
        torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss.item(), d))
        first = losses[-1] if first is None else first
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **{k: f"{v:.4f}" for k, v in metrics.items()})
        bar.update(1)
        if d.main and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_state(state_path, params, opt, step + 1, losses)
        barrier(d)
    bar.close()
    done = max(start, cfg.steps)
    return TrainSummary(steps=done, resumed_from=start, first_loss=first, final_loss=losses[-1] if losses else None,
                        tokens_seen=done * d.world * cfg.batch_size * cfg.seq_len,
                        seconds=time.perf_counter() - t0, world_size=d.world, losses=losses)


def report(summary: TrainSummary, extra: dict, reference: Transformer, eval_data: str | None, eval_windows: int,
           tokenizer, json_path: str | None) -> dict:
    """Print a one-line summary (and, with `eval_data`, the written checkpoint's perplexity and KL against
    `reference`) and write it all as JSON to `json_path`."""
    out = {**extra, **asdict(summary)}
    line = f"{extra['command']}: {summary.steps} steps, loss {summary.first_loss} -> {summary.final_loss}"
    if eval_data:
        from .data import read_texts, token_windows
        from .evaluate import evaluate_checkpoint

        windows = token_windows(tokenizer, read_texts(eval_data, tokenizer), EVAL_WINDOW, eval_windows)
        result = evaluate_checkpoint(Path(extra["output"]), windows, reference)
        out["eval"] = {"data": eval_data, **asdict(result)}
        line += (f"; {eval_data}: perplexity {result.perplexity:.3f} (reference {result.reference_perplexity:.3f}),"
                 f" KL {result.kl_divergence:.4f}")
    print(f"{line}; wrote {extra['output']}")
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out
