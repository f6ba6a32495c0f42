"""The draft head's training loop: AdamW on the training-time-test loss over packed rows, resumable, with
early stopping on held-out τ. Rows come from memory (`pack`) or stream from a `draft_store` (`StoreRows`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from optiserve.engine.spec.draft_head import DraftHead

from .draft_data import DraftSample
from .draft_store import StoreReader
from .draft_ttt import IGNORE, OUT_OF_VOCAB, PackedBatch, expected_accept_length, ttt_losses

CHECKPOINT_FILE = "checkpoint.pt"
BEST_DIR = "best"
SAVE_EVERY = 50


@dataclass
class DraftTrainConfig:
    draft_vocab_size: int = 4096
    ttt_steps: int = 3
    row_len: int = 512  # packed tokens per training row
    rows_per_step: int = 4
    epochs: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 30
    step_decay: float = 0.8  # loss weight of TTT step k is decay^k, as in EAGLE-3
    max_answer_tokens: int = 256
    max_prompts: int | None = None
    text_tokens: int = 100_000  # labelled plain-text tokens (per text file)
    holdout: float = 0.05
    draft_len: int = 5  # chain length the τ estimate is for
    seed: int = 0
    max_steps: int | None = None  # None: `epochs` passes over the rows
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    patience: int = 4  # evaluations without a better held-out τ before stopping
    fresh_lm_head: bool = False  # LM head randomly initialised instead of the target's rows for the draft vocab
    bf16_autocast: bool = False  # training steps' matmuls in bf16 (fp32 master weights; held-out scoring in fp32)
    teacher_probs: bool = False  # learn the target's stored top-k distribution, not only its argmax

    def __post_init__(self) -> None:
        if self.ttt_steps < 1 or self.rows_per_step < 1 or self.epochs <= 0:
            raise ValueError("ttt_steps, rows_per_step and epochs must be positive")
        if not 0 < self.holdout < 1:
            raise ValueError("holdout must be in (0, 1)")
        if self.eval_every < 0 or self.patience < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("eval_every must be >= 0, patience and max_steps >= 1")


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16). Elsewhere autocast converts every
    operand and runs slower than fp32: a training step 47 s against 2.6 s on an AVX2-only CPU."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def pack_index(lengths: list[int], row_len: int) -> list[list[int]]:
    """Greedy packing of sequences (truncated to `row_len`) into rows: the sequence indices of each row."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        n = min(n, row_len)
        if used + n > row_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return rows + [cur] if cur else rows


def make_row(samples: list[DraftSample], t2d: torch.Tensor, row_len: int) -> PackedBatch:
    """Sequences (each cut to `row_len`) packed into one row of `row_len`: a batch of 1."""
    samples = [s.head(row_len) for s in samples]
    pad = row_len - sum(len(s.tokens) for s in samples)
    tokens = torch.cat([s.tokens for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    labels = torch.cat([s.labels for s in samples] + [torch.full((pad,), IGNORE)])
    drafted = t2d[labels.clamp(min=0)]  # target -> draft ids
    labels = torch.where(labels < 0, IGNORE, torch.where(drafted >= 0, drafted, OUT_OF_VOCAB))
    width = samples[0].features.shape[1]
    feats = torch.cat([s.features for s in samples] + [samples[0].features.new_zeros(pad, width)])
    segs = torch.cat([torch.full((len(s.tokens),), i) for i, s in enumerate(samples)] + [torch.full((pad,), -1)])
    pos = torch.cat([torch.arange(len(s.tokens)) for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    row = PackedBatch(tokens[None], labels[None], feats[None], segs[None], pos[None])
    if samples[0].top_ids is not None:
        k = samples[0].top_ids.shape[1]
        ids = t2d[torch.cat([s.top_ids for s in samples] + [torch.zeros(pad, k, dtype=torch.long)])]  # [T, K]
        probs = torch.cat([s.top_probs for s in samples] + [torch.zeros(pad, k)]).masked_fill(ids < 0, 0)
        row.top_ids, row.top_probs = ids.clamp(min=0)[None], probs[None]
    return row


def pack(samples: list[DraftSample], t2d: torch.Tensor, row_len: int) -> list[PackedBatch]:
    return [make_row([samples[i] for i in r], t2d, row_len)
            for r in pack_index([len(s.tokens) for s in samples], row_len)]


class StoreRows(Sequence):
    """Packed rows over a store's sequences, each read from disk when a batch asks for it."""

    def __init__(self, reader: StoreReader, t2d: torch.Tensor, row_len: int):
        self.reader, self.t2d, self.row_len = reader, t2d, row_len
        self.index = pack_index(reader.lengths(), row_len)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> PackedBatch:
        return make_row([self.reader.sample(j, self.row_len) for j in self.index[i]], self.t2d, self.row_len)


def stack(rows: list[PackedBatch]) -> PackedBatch:
    return PackedBatch(*(None if getattr(rows[0], f) is None else torch.cat([getattr(r, f) for r in rows])
                         for f in PackedBatch.__dataclass_fields__))


def evaluate_head(head: DraftHead, rows: Sequence[PackedBatch], steps: int) -> list[float]:
    """Top-1 agreement with the target at each TTT step on held-out rows."""
    correct, total = [0] * steps, [0] * steps
    with torch.no_grad():
        for row in rows:
            _, hits, valid = ttt_losses(head, row, steps)
            for k in range(steps):
                correct[k] += hits[k]
                total[k] += valid[k]
    return [c / max(t, 1) for c, t in zip(correct, total, strict=True)]


def lr_at(step: int, total: int, cfg: DraftTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))


def row_order(step: int, n: int, cfg: DraftTrainConfig) -> list[int]:
    """The rows of training step `step`: each epoch is a fresh permutation, so any step is known on resume."""
    picks = []
    for pos in range(step * cfg.rows_per_step, (step + 1) * cfg.rows_per_step):
        epoch = pos // n
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        picks.append(int(perm[pos % n]))
    return picks


def fit(head: DraftHead, rows: Sequence[PackedBatch], cfg: DraftTrainConfig, out: Path,
        held: Sequence[PackedBatch] = ()) -> dict:
    """Train `head` on `rows`; every `eval_every` steps score held-out τ, keep the best head in `out/best`, stop
    after `patience` evaluations without improvement. Checkpoints to `out` (a rerun resumes; a different row
    count refuses). Returns the history; `head` ends as the best evaluated head (the last one if none)."""
    out.mkdir(parents=True, exist_ok=True)
    device = head.fc.weight.device.type
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = cfg.max_steps or max(1, int(len(rows) * cfg.epochs) // cfg.rows_per_step)
    state = {"step": 0, "rows": len(rows), "best_tau": -1.0, "bad_evals": 0, "history": []}
    ckpt = out / CHECKPOINT_FILE
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved.get("rows", len(rows)) != len(rows):
            raise ValueError(f"{ckpt}: trained on {saved['rows']} rows, the data now has {len(rows)}; "
                             "use a new output directory")
        head.load_state_dict(saved.pop("head"))
        opt.load_state_dict(saved.pop("opt"))
        state.update(saved)
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc="training draft head",
               unit="step", mininterval=30)
    for step in bar:
        if state["bad_evals"] >= cfg.patience:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        batch = stack([rows[i] for i in row_order(step, len(rows), cfg)])
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            losses, _, _ = ttt_losses(head, batch, cfg.ttt_steps, cfg.teacher_probs)
            loss = sum(cfg.step_decay**k * l for k, l in enumerate(losses))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", step0=f"{losses[0].item():.3f}")
        state["step"] = step + 1
        evaluate = held and cfg.eval_every and state["step"] % cfg.eval_every == 0
        if evaluate:
            held_out_score(head, held, cfg, out, state)
        if evaluate or state["step"] % SAVE_EVERY == 0:
            torch.save({**state, "head": head.state_dict(), "opt": opt.state_dict()}, ckpt)
    if held and (not state["history"] or state["history"][-1]["step"] != state["step"]):
        held_out_score(head, held, cfg, out, state)
        torch.save({**state, "head": head.state_dict(), "opt": opt.state_dict()}, ckpt)
    if (out / BEST_DIR / "best.pt").is_file():
        head.load_state_dict(torch.load(out / BEST_DIR / "best.pt", weights_only=False))
    return {"steps": state["step"], "rows": len(rows), "history": state["history"], "best_tau": state["best_tau"]}


def held_out_score(head: DraftHead, held: Sequence[PackedBatch], cfg: DraftTrainConfig, out: Path,
                   state: dict) -> None:
    """Score held-out τ, log it (one JSON line in out/eval.jsonl), keep the best head's weights."""
    acc = evaluate_head(head, held, cfg.ttt_steps)
    tau = expected_accept_length(acc, cfg.draft_len)
    entry = {"step": state["step"], "step_accuracy": [round(a, 4) for a in acc], "tau": round(tau, 4)}
    state["history"].append(entry)
    with (out / "eval.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"held-out at step {state['step']}: {entry}", flush=True)
    if tau > state["best_tau"]:
        state["best_tau"], state["bad_evals"] = tau, 0
        (out / BEST_DIR).mkdir(exist_ok=True)
        torch.save(head.state_dict(), out / BEST_DIR / "best.pt")
    else:
        state["bad_evals"] += 1
