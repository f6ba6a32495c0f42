"""`optiserve train-draft`: build the target-labelled data set, train an EAGLE-3 head with training-time test,
report held-out acceptance, save the head with a model card. Resumable: answers and checkpoints live in --output.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from optiserve.engine.chat import chat_prompt_ids
from optiserve.engine.model import Transformer
from optiserve.engine.spec.draft_head import DraftConfig, DraftHead

from .data import read_texts
from .draft_card import write_model_card
from .draft_data import DraftSample, generate_answers, label_all, text_chunks
from .draft_fit import DraftTrainConfig, evaluate_head, fit, pack
from .draft_ttt import IGNORE, expected_accept_length

__all__ = ["DraftTrainConfig", "train_draft"]


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


def draft_vocabulary(labels: Iterable[torch.Tensor], size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """d2t of `size` target tokens: `keep`'s (in its order) first, then the others the target emits most often in
    the data, most frequent first."""
    ids = [] if keep is None else keep.tolist()
    counts = Counter()
    for lab in labels:
        counts.update(lab[lab != IGNORE].tolist())
    seen = set(ids)
    ids += [t for t, _ in counts.most_common(size + len(ids)) if t not in seen][: size - len(ids)]
    seen = set(ids)
    rest = [t for t in range(size * 2) if t not in seen]  # pad a small data set up to `size`
    return torch.tensor((ids + rest)[:size])


def inverse_vocab(d2t: torch.Tensor, target_vocab: int) -> torch.Tensor:
    """t2d [target_vocab]: each target id's index in the draft vocabulary, IGNORE where it has none."""
    t2d = torch.full((target_vocab,), IGNORE)
    t2d[d2t] = torch.arange(len(d2t))
    return t2d


def vocab_coverage(labels: Iterable[torch.Tensor], t2d: torch.Tensor) -> float:
    """Share of the labelled tokens that the draft vocabulary can predict at all."""
    hit = total = 0
    for lab in labels:
        lab = lab[lab >= 0]
        hit, total = hit + int((t2d[lab] >= 0).sum()), total + len(lab)
    return round(hit / max(1, total), 4)


def widen_vocab(head: DraftHead, d2t: torch.Tensor) -> DraftHead:
    """A copy of `head` over the larger vocabulary `d2t`, which starts with the head's own. Its LM-head rows are
    kept; a new token's row starts as the target's row for it mapped into the head's output space by the linear
    map that best takes the target's rows of the head's tokens to the head's rows (least squares)."""
    old = head.cfg.draft_vocab_size
    if len(d2t) < old or not torch.equal(d2t[:old], head.d2t):
        raise ValueError("the wider vocabulary must start with the head's own")
    wide = DraftHead(replace(head.cfg, draft_vocab_size=len(d2t)))
    state = {k: v for k, v in head.state_dict().items() if k not in ("lm_head.weight_t", "d2t")}
    assert set(wide.load_state_dict(state, strict=False).missing_keys) == {"lm_head.weight_t", "d2t"}
    with torch.no_grad():
        target_rows = head.target.lm_head.weight_t.float()  # [H, V_target]
        fit = torch.linalg.lstsq(target_rows[:, head.d2t].T, head.lm_head.weight_t.float().T).solution  # [H, H]
        new_rows = target_rows[:, d2t[old:]].T @ fit  # [V_new, H]
        wide.lm_head.weight_t.copy_(torch.cat([head.lm_head.weight_t.float(), new_rows.T], dim=1))
        wide.d2t.copy_(d2t)
    return wide.attach(head.target)


def init_head(target: Transformer, cfg: DraftConfig, d2t: torch.Tensor, fresh_lm_head: bool = False) -> DraftHead:
    """Small random layer whose attention/MLP outputs start at zero; `fc` passes the high layer through, and the
    LM head starts as the target's own rows for the draft vocabulary (training begins from a sensible predictor)
    unless `fresh_lm_head` (then it stays random, std 0.02, and the final norm weight 1)."""
    head = DraftHead(cfg).attach(target)
    with torch.no_grad():
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else p.fill_(1.0)
        H = cfg.hidden_size
        head.fc.weight_t.zero_()
        head.fc.weight_t[2 * H :].copy_(torch.eye(H))
        head.attn.o.weight_t.zero_()
        head.mlp.down.weight_t.zero_()
        if not fresh_lm_head:
            head.lm_head.weight_t.copy_(target.lm_head.weight_t[:, d2t])
            head.norm.weight.copy_(target.norm.weight)
        head.d2t.copy_(d2t)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


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
    d2t = draft_vocabulary((s.labels for s in samples), cfg.draft_vocab_size)
    t2d = inverse_vocab(d2t, head_cfg.target_vocab_size)
    chat = [s for s in samples if s.labels[0] == IGNORE]  # answers (their prompts carry no labels)
    n_hold = max(1, int(len(chat) * cfg.holdout))
    held = chat[-n_hold:]
    train = [s for s in samples if not any(s is h for h in held)]
    coverage = vocab_coverage((s.labels for s in held), t2d)
    head = init_head(target, head_cfg, d2t, cfg.fresh_lm_head)
    train_rows, held_rows = pack(train, t2d, cfg.row_len), pack(held, t2d, cfg.row_len)
    fit_info = fit(head, train_rows, cfg, out)
    fit_info.pop("history")
    step_acc = evaluate_head(head, held_rows, cfg.ttt_steps)
    summary = {
        "model": model, "data": files, "config": asdict(cfg),
        "train_tokens": sum(len(s.tokens) for s in train),
        "train_labelled_tokens": sum(int((s.labels >= 0).sum()) for s in train),
        "target_layers": list(head_cfg.target_layers), "heldout_sequences": len(held),
        "heldout_draft_vocab_coverage": coverage,
        "heldout_step_accuracy": [round(a, 4) for a in step_acc],
        f"heldout_expected_tau_chain{cfg.draft_len}": round(expected_accept_length(step_acc, cfg.draft_len), 3),
        "minutes": round((time.monotonic() - began) / 60, 1), **fit_info,
    }
    head.save(out, {"training": summary})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, summary)
    print(json.dumps(summary, indent=2))
    return summary

