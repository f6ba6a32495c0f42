"""`optiserve train-draft`: build the target-labelled data set, train an EAGLE-3 head with training-time test,
report held-out acceptance, save the head with a model card. Resumable: answers and checkpoints live in --output.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from optiserve.engine.chat import chat_prompt_ids
from optiserve.engine.model import Transformer
from optiserve.engine.spec.draft_head import DraftConfig, DraftHead

from .data import read_texts
from .draft_card import write_model_card
from .draft_data import DraftSample, generate_answers, label_all, text_chunks
from .draft_ttt import IGNORE, PackedBatch, expected_accept_length, ttt_losses

CHECKPOINT_FILE = "checkpoint.pt"


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

    def __post_init__(self) -> None:
        if self.ttt_steps < 1 or self.rows_per_step < 1 or self.epochs <= 0:
            raise ValueError("ttt_steps, rows_per_step and epochs must be positive")
        if not 0 < self.holdout < 1:
            raise ValueError("holdout must be in (0, 1)")


def build_samples(engine, files: list[str], cfg: DraftTrainConfig, out: Path, layers) -> list[DraftSample]:
    """Chat jsonl → the target's own answers (generated, resumable); other files → text labelled in a prefill."""
    target, tok = engine.runner.model, engine.tokenizer
    sequences: list[tuple[list[int], int]] = []
    for path in files:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            rows = rows[: cfg.max_prompts]
            prompts = chat_prompt_ids(tok, [r.get("instruction") or r["text"] for r in rows])
            answers_file = out / f"answers-{Path(path).stem}.jsonl"
            for row in generate_answers(engine, prompts, cfg.max_answer_tokens, answers_file):
                sequences.append((row["prompt_ids"] + row["answer_ids"], len(row["prompt_ids"]) - 1))
        else:
            text = "\n".join(read_texts(path, tok))
            chunks = text_chunks(tok, text, cfg.row_len)
            sequences += chunks[: max(1, cfg.text_tokens // cfg.row_len)]
    return label_all(target, sequences, layers)


def cached_samples(engine, files: list[str], cfg: DraftTrainConfig, out: Path, layers) -> list[DraftSample]:
    """`build_samples`, saved in `out/samples.pt` so a resumed run skips the labelling (minutes of target forwards)."""
    key = {"files": files, "layers": list(layers), "max_prompts": cfg.max_prompts, "text_tokens": cfg.text_tokens,
           "row_len": cfg.row_len, "max_answer_tokens": cfg.max_answer_tokens}
    path = out / "samples.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved["key"] == key:
            return saved["samples"]
    samples = build_samples(engine, files, cfg, out, layers)
    torch.save({"key": key, "samples": samples}, path)
    return samples


def draft_vocabulary(samples: list[DraftSample], size: int) -> torch.Tensor:
    """The `size` target tokens the target emits most often in the data (d2t), most frequent first."""
    counts = Counter()
    for s in samples:
        counts.update(s.labels[s.labels != IGNORE].tolist())
    ids = [t for t, _ in counts.most_common(size)]
    seen = set(ids)
    rest = [t for t in range(size * 2) if t not in seen]  # pad a small data set up to `size`
    return torch.tensor((ids + rest)[:size])


def pack(samples: list[DraftSample], t2d: torch.Tensor, row_len: int) -> list[PackedBatch]:
    """Pack sequences into rows of `row_len` (one row each as a batch of 1; `batches` stacks them)."""
    rows, cur, used = [], [], 0
    for s in samples:
        s = DraftSample(s.tokens[:row_len], s.labels[:row_len], s.features[:row_len])
        if used + len(s.tokens) > row_len:
            rows.append(_row(cur, t2d, row_len))
            cur, used = [], 0
        cur.append(s)
        used += len(s.tokens)
    if cur:
        rows.append(_row(cur, t2d, row_len))
    return rows


def _row(samples: list[DraftSample], t2d: torch.Tensor, row_len: int) -> PackedBatch:
    n = sum(len(s.tokens) for s in samples)
    pad = row_len - n
    tokens = torch.cat([s.tokens for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    labels = torch.cat([s.labels for s in samples] + [torch.full((pad,), IGNORE)])
    labels = torch.where(labels >= 0, t2d[labels.clamp(min=0)], IGNORE)  # target -> draft ids, IGNORE if absent
    width = samples[0].features.shape[1]
    feats = torch.cat([s.features for s in samples] + [samples[0].features.new_zeros(pad, width)])
    segs = torch.cat([torch.full((len(s.tokens),), i) for i, s in enumerate(samples)] + [torch.full((pad,), -1)])
    pos = torch.cat([torch.arange(len(s.tokens)) for s in samples] + [torch.zeros(pad, dtype=torch.long)])
    return PackedBatch(tokens[None], labels[None], feats[None], segs[None], pos[None])


def stack(rows: list[PackedBatch]) -> PackedBatch:
    return PackedBatch(*(torch.cat([getattr(r, f) for r in rows]) for f in PackedBatch.__dataclass_fields__))


def init_head(target: Transformer, cfg: DraftConfig, d2t: torch.Tensor) -> DraftHead:
    """Small random layer whose attention/MLP outputs start at zero; `fc` passes the high layer through, and the
    LM head starts as the target's own rows for the draft vocabulary: training begins from a sensible predictor."""
    head = DraftHead(cfg).attach(target)
    with torch.no_grad():
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else p.fill_(1.0)
        H = cfg.hidden_size
        head.fc.weight_t.zero_()
        head.fc.weight_t[2 * H :].copy_(torch.eye(H))
        head.attn.o.weight_t.zero_()
        head.mlp.down.weight_t.zero_()
        head.lm_head.weight_t.copy_(target.lm_head.weight_t[:, d2t])
        head.norm.weight.copy_(target.norm.weight)
        head.d2t.copy_(d2t)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def evaluate_head(head: DraftHead, rows: list[PackedBatch], steps: int) -> list[float]:
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


def train_loop(head: DraftHead, rows: list[PackedBatch], cfg: DraftTrainConfig, out: Path) -> dict:
    """AdamW over shuffled packed rows with the TTT loss; checkpoints every 50 steps and at the end."""
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = max(1, int(len(rows) * cfg.epochs) // cfg.rows_per_step)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    order = (order * math.ceil(cfg.epochs + 1))[: total * cfg.rows_per_step]
    start = 0
    ckpt = out / CHECKPOINT_FILE
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    bar = tqdm(range(start, total), initial=start, total=total, desc="training draft head", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        batch = stack([rows[i] for i in order[step * cfg.rows_per_step : (step + 1) * cfg.rows_per_step]])
        losses, _, _ = ttt_losses(head, batch, cfg.ttt_steps)
        loss = sum(cfg.step_decay**k * l for k, l in enumerate(losses))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", step0=f"{losses[0].item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == total:
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    return {"steps": total, "rows": len(rows)}


def train_draft(model: str, files: list[str], output: str, cfg: DraftTrainConfig) -> dict:
    """The whole `train-draft` command; returns (and writes to `output/train_summary.json`) the summary."""
    from optiserve.engine.config import EngineConfig
    from optiserve.engine.llm_engine import LLMEngine

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    torch.manual_seed(cfg.seed)
    engine = LLMEngine(EngineConfig(model=model, max_batch=16, max_model_len=cfg.row_len + cfg.max_answer_tokens + 64))
    target = engine.runner.model
    head_cfg = DraftConfig.for_target(engine.model_config, cfg.draft_vocab_size)
    samples = cached_samples(engine, files, cfg, out, head_cfg.target_layers)
    d2t = draft_vocabulary(samples, cfg.draft_vocab_size)
    t2d = torch.full((head_cfg.target_vocab_size,), IGNORE)
    t2d[d2t] = torch.arange(len(d2t))
    chat = [s for s in samples if s.labels[0] == IGNORE]  # answers (their prompts carry no labels)
    n_hold = max(1, int(len(chat) * cfg.holdout))
    held = chat[-n_hold:]
    train = [s for s in samples if not any(s is h for h in held)]
    coverage = float(sum(int((t2d[s.labels[s.labels >= 0]] >= 0).sum()) for s in held) /
                     max(1, sum(int((s.labels >= 0).sum()) for s in held)))
    head = init_head(target, head_cfg, d2t)
    train_rows, held_rows = pack(train, t2d, cfg.row_len), pack(held, t2d, cfg.row_len)
    fit = train_loop(head, train_rows, cfg, out)
    step_acc = evaluate_head(head, held_rows, cfg.ttt_steps)
    summary = {
        "model": model, "data": files, "config": asdict(cfg),
        "train_tokens": sum(len(s.tokens) for s in train),
        "train_labelled_tokens": sum(int((s.labels >= 0).sum()) for s in train),
        "target_layers": list(head_cfg.target_layers), "heldout_sequences": len(held),
        "heldout_draft_vocab_coverage": round(coverage, 4),
        "heldout_step_accuracy": [round(a, 4) for a in step_acc],
        f"heldout_expected_tau_chain{cfg.draft_len}": round(expected_accept_length(step_acc, cfg.draft_len), 3),
        "minutes": round((time.monotonic() - began) / 60, 1), **fit,
    }
    head.save(out, {"training": summary})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, summary)
    print(json.dumps(summary, indent=2))
    return summary

