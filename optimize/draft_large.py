"""`optiserve train-draft-large`: a draft head trained on ~10x the data, built and trained in resumable stages.

1. held-out store: the target's greedy answers to AlpacaEval rows `heldout_rows` (never trained on);
2. training store, job by job until `target_tokens` are stored: greedy answers to `train_rows`, the reference
   answers labelled in a prefill, text files labelled in a prefill, then sampled answers (each temperature > 0,
   sample 1, 2, ...) labelled with the target's argmax;
3. the LM-head initialisation compared (target rows vs fresh) over `compare_steps` each, on held-out τ;
4. training with the better one, streamed from the store, early-stopped on held-out τ.
Every stage resumes where it stopped: rerun the same command with the same --output.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from optiserve.engine.spec.draft_head import DraftConfig

from .draft_card import write_model_card
from .draft_corpus import AnswerJob, store_answers, store_references, store_text
from .draft_fit import DraftTrainConfig, StoreRows, evaluate_head, fit, pack
from .draft_store import StoreReader, StoreWriter, bytes_per_token
from .draft_train import draft_vocabulary, init_head, inverse_vocab, vocab_coverage
from .draft_ttt import expected_accept_length

INITS = {"target_rows": False, "fresh": True}  # name -> fresh_lm_head


@dataclass
class LargeDataConfig:
    instructions: str
    texts: list[str] = field(default_factory=list)
    train_rows: tuple[int, int] = (0, 650)
    heldout_rows: tuple[int, int] = (650, 700)
    temperatures: tuple[float, ...] = (0.7, 1.0)  # sampled answers, after the greedy ones
    max_samples: int = 16  # samples per prompt at each temperature > 0
    target_tokens: int = 3_200_000
    max_batch: int = 16

    def __post_init__(self) -> None:
        self.train_rows, self.heldout_rows = tuple(self.train_rows), tuple(self.heldout_rows)
        a, b = self.train_rows
        c, d = self.heldout_rows
        if max(b, d) > 700 or b > c and d > a:
            raise ValueError("train and held-out rows must be disjoint and below 700 (700+ are for bench spec)")
        if any(not 0 < t <= 2 for t in self.temperatures) or self.max_batch < 16:
            raise ValueError("temperatures must be in (0, 2], max_batch >= 16 (continuous batching)")


def answer_jobs(data: LargeDataConfig) -> list[AnswerJob]:
    rows = range(*data.train_rows)
    return [AnswerJob(rows, t, s) for s in range(1, data.max_samples + 1) for t in data.temperatures]


def build_stores(engine, data: LargeDataConfig, cfg: DraftTrainConfig, out: Path, layers) -> None:
    width = 3 * engine.model_config.hidden_size
    jsonl = Path(data.instructions)
    held = StoreWriter(out / "store-heldout", width)
    store_answers(engine, held, jsonl, AnswerJob(range(*data.heldout_rows), 0.0), cfg.max_answer_tokens, layers)
    train = StoreWriter(out / "store-train", width)
    store_answers(engine, train, jsonl, AnswerJob(range(*data.train_rows), 0.0), cfg.max_answer_tokens, layers)
    store_references(engine, train, jsonl, range(*data.train_rows), cfg.row_len, layers)
    for text in data.texts:
        store_text(engine, train, Path(text), cfg.row_len, layers)
    for job in answer_jobs(data):
        if train.tokens >= data.target_tokens:
            break
        store_answers(engine, train, jsonl, job, cfg.max_answer_tokens, layers)
        print(f"stored {train.tokens} training tokens ({train.tokens * bytes_per_token(width) / 1e9:.1f} GB)",
              flush=True)


def vocabulary(reader: StoreReader, size: int, path: Path) -> torch.Tensor:
    """d2t from the training store's labels, computed once and kept (a resumed run must not change it)."""
    if not path.is_file():
        torch.save(draft_vocabulary(reader.all_labels(), size), path)
    return torch.load(path)


def train_large(model: str, data: LargeDataConfig, output: str, cfg: DraftTrainConfig, compare_steps: int) -> dict:
    from optiserve.engine.config import EngineConfig
    from optiserve.engine.llm_engine import LLMEngine

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    torch.manual_seed(cfg.seed)
    engine = LLMEngine(EngineConfig(model=model, max_batch=data.max_batch,
                                    max_model_len=cfg.row_len + cfg.max_answer_tokens + 64))
    target = engine.runner.model
    head_cfg = DraftConfig.for_target(engine.model_config, cfg.draft_vocab_size)
    build_stores(engine, data, cfg, out, head_cfg.target_layers)
    train_store, held_store = StoreReader(out / "store-train"), StoreReader(out / "store-heldout")
    d2t = vocabulary(train_store, cfg.draft_vocab_size, out / "d2t.pt")
    t2d = inverse_vocab(d2t, head_cfg.target_vocab_size)
    rows = StoreRows(train_store, t2d, cfg.row_len)
    held = pack([held_store.sample(i) for i in range(len(held_store))], t2d, cfg.row_len)
    print(f"training on {train_store.tokens} tokens ({len(rows)} rows), held-out {held_store.tokens}", flush=True)
    baseline = shipped_baseline(target, held_store, cfg)
    print(f"shipped head on the held-out answers: {baseline}", flush=True)
    comparison = compare_inits(target, head_cfg, d2t, rows, held, cfg, out, compare_steps)
    best_init = max(comparison, key=lambda k: comparison[k]["tau"])
    cfg.fresh_lm_head = INITS[best_init]
    head = init_head(target, head_cfg, d2t, cfg.fresh_lm_head)
    fit_info = fit(head, rows, cfg, out / "train", held)
    step_acc = evaluate_head(head, held, cfg.ttt_steps)
    summary = {
        "model": model, "data": [data.instructions, *data.texts], "config": asdict(cfg), "data_config": asdict(data),
        "train_tokens": train_store.tokens, "train_labelled_tokens": int(sum((lab >= 0).sum() for lab in
                                                                             train_store.all_labels())),
        "target_layers": list(head_cfg.target_layers), "heldout_sequences": len(held_store),
        "heldout_step_accuracy": [round(a, 4) for a in step_acc],
        f"heldout_expected_tau_chain{cfg.draft_len}": round(expected_accept_length(step_acc, cfg.draft_len), 3),
        "init_comparison": comparison, "shipped_head_heldout": baseline, "steps": fit_info["steps"], "rows": len(rows),
        "minutes": round((time.monotonic() - began) / 60, 1),
        "heldout_draft_vocab_coverage": vocab_coverage(held_store.all_labels(), t2d),
        "bytes_per_token": bytes_per_token(3 * head_cfg.hidden_size),
    }
    final = out / "head"
    head.save(final, {"training": summary})
    write_model_card(final, summary)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def shipped_baseline(target, held_store: StoreReader, cfg: DraftTrainConfig) -> dict:
    """The shipped head's held-out step accuracy and τ on the same held-out answers (what a new head must beat)."""
    from optiserve.engine.spec.decoder import shipped_head_dir
    from optiserve.engine.spec.draft_head import load_draft_head

    head = load_draft_head(shipped_head_dir()).attach(target)
    t2d = inverse_vocab(head.d2t, head.cfg.target_vocab_size)
    held = pack([held_store.sample(i) for i in range(len(held_store))], t2d, cfg.row_len)
    acc = evaluate_head(head, held, cfg.ttt_steps)
    return {"step_accuracy": [round(a, 4) for a in acc], "tau": round(expected_accept_length(acc, cfg.draft_len), 4)}


def compare_inits(target, head_cfg, d2t, rows, held, cfg: DraftTrainConfig, out: Path, steps: int) -> dict:
    """Held-out step accuracy and τ of each LM-head initialisation after `steps` steps (same data and order)."""
    path = out / "init_comparison.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name, fresh in INITS.items():
        if name in results or steps == 0:
            continue
        short = DraftTrainConfig(**{**asdict(cfg), "max_steps": steps, "eval_every": 0, "fresh_lm_head": fresh})
        head = init_head(target, head_cfg, d2t, fresh)
        info = fit(head, rows, short, out / f"compare-{name}", held)
        results[name] = info["history"][-1]
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results or {"target_rows": {"tau": 0.0}}
