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

from optiserve.engine.spec.draft_head import DraftConfig, DraftHead, load_draft_head

from .draft_card import write_model_card
from .draft_corpus import AnswerJob, store_answers, store_references, store_text
from .draft_fit import DraftTrainConfig, StoreRows, evaluate_head, fit, pack
from .draft_store import StoreReader, StoreWriter, bytes_per_token
from .draft_train import draft_vocabulary, init_head, inverse_vocab, vocab_coverage, widen_vocab
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
    generate_quant: str = "none"  # the training answers' generator: the target in this PTQ format (faster)
    teacher_top_k: int = 8  # the target's top-k next tokens stored per training token (6 bytes each)

    def __post_init__(self) -> None:
        self.train_rows, self.heldout_rows = tuple(self.train_rows), tuple(self.heldout_rows)
        a, b = self.train_rows
        c, d = self.heldout_rows
        if max(b, d) > 700 or b > c and d > a:
            raise ValueError("train and held-out rows must be disjoint and below 700 (700+ are for bench spec)")
        if any(not 0 < t <= 2 for t in self.temperatures) or self.max_batch < 16:
            raise ValueError("temperatures must be in (0, 2], max_batch >= 16 (continuous batching)")
        if not 0 <= self.teacher_top_k <= 64:
            raise ValueError("teacher_top_k must be in [0, 64]")


def answer_jobs(data: LargeDataConfig) -> list[AnswerJob]:
    """The training answers in the order they are stored: greedy, then each sample at every temperature."""
    rows, by = range(*data.train_rows), data.generate_quant
    return [AnswerJob(rows, 0.0, 0, by)] + [AnswerJob(rows, t, s, by) for s in range(1, data.max_samples + 1)
                                            for t in data.temperatures]


def serve_generator(engine, target, fmt: str) -> None:
    """The engine generates in `fmt` from here on; `target` (the unquantized model) still labels."""
    from .ptq_pipeline import QuantRequest, prepare_quantized

    if fmt != "none":
        engine.use_weights(prepare_quantized(engine.model_dir, target, engine.tokenizer, QuantRequest(fmt)))


def build_stores(engine, target, data: LargeDataConfig, cfg: DraftTrainConfig, out: Path, layers) -> None:
    """The held-out store (the target's own greedy answers, as `bench spec` meets them), then the training store
    job by job until `target_tokens`: prefill-labelled references and texts first (cheap), then answers."""
    width, tok = 3 * engine.model_config.hidden_size, engine.tokenizer
    jsonl = Path(data.instructions)
    held = StoreWriter(out / "store-heldout", width)
    store_answers(engine, target, held, jsonl, AnswerJob(range(*data.heldout_rows), 0.0), cfg.max_answer_tokens,
                  layers)
    train = StoreWriter(out / "store-train", width, top_k=data.teacher_top_k)
    store_references(tok, target, train, jsonl, range(*data.train_rows), cfg.row_len, layers)
    for text in data.texts:
        store_text(tok, target, train, Path(text), cfg.row_len, layers)
    serve_generator(engine, target, data.generate_quant)
    for job in answer_jobs(data):
        if train.tokens >= data.target_tokens:
            break
        store_answers(engine, target, train, jsonl, job, cfg.max_answer_tokens, layers)
        gb = train.tokens * bytes_per_token(width, train.top_k) / 1e9
        print(f"stored {train.tokens} training tokens ({gb:.1f} GB)", flush=True)


def vocabulary(reader: StoreReader, size: int, path: Path, keep: torch.Tensor | None = None) -> torch.Tensor:
    """d2t from the training store's labels (after `keep`'s tokens), computed once and kept (a resumed run must not
    change it)."""
    if not path.is_file():
        torch.save(draft_vocabulary(reader.all_labels(), size, keep), path)
    return torch.load(path)


def train_large(model: str, data: LargeDataConfig, output: str, cfg: DraftTrainConfig, compare_steps: int,
                init_from: str | None = None) -> dict:
    from optiserve.engine.config import EngineConfig
    from optiserve.engine.llm_engine import LLMEngine

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    torch.manual_seed(cfg.seed)
    engine = LLMEngine(EngineConfig(model=model, max_batch=data.max_batch,
                                    max_model_len=cfg.row_len + cfg.max_answer_tokens + 64))
    target = engine.runner.model  # unquantized: it labels and trains, whatever format generates
    head_cfg = DraftConfig.for_target(engine.model_config, cfg.draft_vocab_size)
    build_stores(engine, target, data, cfg, out, head_cfg.target_layers)
    train_store, held_store = StoreReader(out / "store-train"), StoreReader(out / "store-heldout")
    warm = warm_start(target, init_from, train_store, cfg.draft_vocab_size, out / "d2t.pt") if init_from else None
    d2t = warm.d2t.clone() if warm else vocabulary(train_store, cfg.draft_vocab_size, out / "d2t.pt")
    cfg.draft_vocab_size = len(d2t)  # a warm head's, as trained (the model card and command say it)
    t2d = inverse_vocab(d2t, head_cfg.target_vocab_size)
    rows = StoreRows(train_store, t2d, cfg.row_len)
    held = pack([held_store.sample(i) for i in range(len(held_store))], t2d, cfg.row_len)
    print(f"training on {train_store.tokens} tokens ({len(rows)} rows), held-out {held_store.tokens}", flush=True)
    baseline = shipped_baseline(target, held_store, cfg)
    print(f"shipped head on the held-out answers: {baseline}", flush=True)
    if warm:
        comparison, head = {}, warm
    else:
        comparison = compare_inits(target, head_cfg, d2t, rows, held, cfg, out, compare_steps)
        cfg.fresh_lm_head = INITS[max(comparison, key=lambda k: comparison[k]["tau"])]
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
        "init_comparison": comparison, "init_from": init_from and str(init_from), "shipped_head_heldout": baseline,
        "steps": fit_info["steps"], "rows": len(rows),
        "minutes": round((time.monotonic() - began) / 60, 1),
        "heldout_draft_vocab_coverage": vocab_coverage(held_store.all_labels(), t2d),
        "bytes_per_token": bytes_per_token(3 * head_cfg.hidden_size, data.teacher_top_k),
        "command": large_command(model, data, cfg, compare_steps, init_from),
    }
    final = out / "head"
    head.save(final, {"training": summary})
    write_model_card(final, summary)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def large_command(model: str, data: LargeDataConfig, cfg: DraftTrainConfig, compare_steps: int,
                  init_from: str | None = None) -> str:
    """The command line that reproduces a run (for its model card)."""
    def words(xs) -> str:
        return " ".join(map(str, xs))

    texts = f" --texts {words(data.texts)}" if data.texts else ""
    steps = f" --max-steps {cfg.max_steps}" if cfg.max_steps else f" --epochs {cfg.epochs}"
    return (f"optiserve train-draft-large --model {model} --instructions {data.instructions}{texts} --output DIR "
            f"--train-rows {words(data.train_rows)} --heldout-rows {words(data.heldout_rows)} "
            f"--temperatures {words(data.temperatures)} --max-samples {data.max_samples} --max-batch {data.max_batch} "
            f"--generate-quant {data.generate_quant} --teacher-top-k {data.teacher_top_k} "
            f"--draft-vocab-size {cfg.draft_vocab_size} "
            f"--target-tokens {data.target_tokens}{steps} --lr {cfg.lr} "
            f"--eval-every {cfg.eval_every} --patience {cfg.patience} --compare-steps {compare_steps}"
            + (" --bf16-autocast" if cfg.bf16_autocast else " --no-bf16-autocast")
            + (" --teacher-probs" if cfg.teacher_probs else "") + (f" --init-head {init_from}" if init_from else ""))


def warm_start(target, path: str, reader: StoreReader, size: int, vocab_path: Path) -> DraftHead:
    """A saved head to go on training (its weights; its vocabulary, widened to `size` tokens if that is larger),
    in fp32 and trainable."""
    head = load_draft_head(path).attach(target)
    if size > head.cfg.draft_vocab_size:
        head = widen_vocab(head, vocabulary(reader, size, vocab_path, keep=head.d2t))
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def shipped_baseline(target, held_store: StoreReader, cfg: DraftTrainConfig) -> dict:
    """The shipped head's held-out step accuracy and τ on the same held-out answers (what a new head must beat)."""
    from optiserve.engine.spec.decoder import shipped_head_dir

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
