"""The draft-head feature store: shards round-trip (with the target's top-k), a killed writer leaves a readable
prefix that a rerun continues, the stored top-k is the target's own distribution, training streams rows from the
store equal to rows packed in memory (and resumes from its checkpoint, or goes on training a saved head), learning
from the top-k is learning from the argmax when the target is sure, and answers generated in a PTQ format carry
the unquantized target's labels."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from optiserve.engine.config import EngineConfig
from optiserve.engine.llm_engine import LLMEngine
from optiserve.engine.runner import attention_mask
from optiserve.engine.spec.draft_head import DraftConfig
from optiserve.optimize.draft_corpus import AnswerJob, load_prompts, store_answers
from optiserve.optimize.draft_data import DraftSample, label_sequence, text_chunks
from optiserve.optimize.draft_fit import DraftTrainConfig, StoreRows, fit, pack
from optiserve.optimize.draft_large import serve_generator, warm_start
from optiserve.optimize.draft_store import MANIFEST, StoreReader, StoreWriter
from optiserve.optimize.draft_train import draft_vocabulary, init_head, inverse_vocab
from optiserve.optimize.draft_ttt import PackedBatch, step_labels, ttt_losses

WIDTH = 12
GENERATOR = "nvfp4"  # the format whose greedy answers stray furthest from the unquantized target's
QUESTIONS = ["Write a short poem about the sea.", "List three uses of a paperclip and explain each one."]


def unit_sample(unit: int, top_k: int = 0) -> DraftSample:
    """A deterministic sample per unit, of varying length, so any unit can be checked after a resume."""
    g = torch.Generator().manual_seed(unit)
    n = 3 + unit % 5
    top = (torch.randint(0, 49152, (n, top_k), generator=g), torch.rand(n, top_k, generator=g).half().float())
    return DraftSample(torch.randint(0, 49152, (n,), generator=g), torch.randint(-100, 49152, (n,), generator=g),
                       torch.randn(n, WIDTH, generator=g).to(torch.bfloat16), *(top if top_k else ()))


def assert_units(reader: StoreReader, units: range, top_k: int = 0) -> None:
    assert len(reader) == len(units)
    for i, unit in enumerate(units):
        want, got = unit_sample(unit, top_k), reader.sample(i)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.features, want.features)
        if top_k:
            assert torch.equal(got.top_ids, want.top_ids) and torch.equal(got.top_probs, want.top_probs)
        else:
            assert got.top_ids is None and got.top_probs is None


@pytest.mark.parametrize("top_k", [0, 4])
def test_store_round_trips_across_shards(tmp_path, top_k):
    writer = StoreWriter(tmp_path, WIDTH, shard_tokens=20, top_k=top_k)
    for unit in range(30):
        writer.add("job", unit + 1, [unit_sample(unit, top_k)])
    writer.flush()
    reader = StoreReader(tmp_path)
    assert len(reader.manifest["shards"]) > 3
    assert_units(reader, range(30), top_k)
    assert StoreWriter(tmp_path, WIDTH, top_k=top_k).done("job") == 30
    with pytest.raises(ValueError, match="width"):
        StoreWriter(tmp_path, WIDTH + 1, top_k=top_k)
    with pytest.raises(ValueError, match="top_k"):  # a rerun must store what the shards already hold
        StoreWriter(tmp_path, WIDTH, top_k=top_k + 2)


WRITER = """
import sys, time
from tests.optimize.test_draft_store import WIDTH, unit_sample
from optiserve.optimize.draft_store import StoreWriter
w = StoreWriter(sys.argv[1], WIDTH, shard_tokens=15)
for unit in range(w.done("job"), 10_000):
    w.add("job", unit + 1, [unit_sample(unit)])
    time.sleep(0.01)
"""


def test_killed_writer_leaves_a_readable_prefix_that_a_rerun_continues(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = tmp_path / MANIFEST
            if path.is_file() and len(json.loads(path.read_text())["shards"]) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer wrote no shards")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    prefix = StoreReader(tmp_path)
    stored = StoreWriter(tmp_path, WIDTH).done("job")
    assert stored > 0
    assert_units(prefix, range(stored))  # every stored unit exactly once, none half-written
    writer = StoreWriter(tmp_path, WIDTH, shard_tokens=15)
    for unit in range(writer.done("job"), stored + 7):
        writer.add("job", unit + 1, [unit_sample(unit)])
    writer.flush()
    assert_units(StoreReader(tmp_path), range(stored + 7))


TOP_K = 4


@pytest.fixture(scope="module")
def labelled(engine, train_text) -> list[DraftSample]:
    """Real target features, labels and top-k for a few 96-token chunks of training text."""
    layers = DraftConfig.for_target(engine.model_config, 512).target_layers
    chunks = text_chunks(engine.tokenizer, train_text.read_text(), 96)[:6]
    return [label_sequence(engine.runner.model, t, layers, 0, own_tokens=False, top_k=TOP_K) for t, _ in chunks]


def test_the_stored_top_k_is_the_targets_next_token_distribution(engine, labelled):
    target = engine.runner.model
    layers = DraftConfig.for_target(engine.model_config, 512).target_layers
    tokens, start = labelled[0].tokens.tolist(), 30
    sample = label_sequence(target, tokens, layers, start, own_tokens=False, top_k=TOP_K)
    plain = label_sequence(target, tokens, layers, start, own_tokens=False)
    assert plain.top_ids is None and torch.equal(sample.labels, plain.labels)
    assert torch.equal(sample.features, plain.features)
    positions = torch.arange(len(tokens))[None]
    mask = attention_mask(positions, len(tokens), target.cfg.group_size, target.cfg.sliding_window)
    with torch.inference_mode():
        probs = target(torch.tensor([tokens]), positions, None, mask, all_logits=True)[0].softmax(-1)  # [T, V]
    want, want_ids = probs.topk(TOP_K, dim=-1)
    assert torch.equal(sample.top_ids[start:], want_ids[start:].int())
    torch.testing.assert_close(sample.top_probs[start:].float(), want[start:], atol=1e-3, rtol=1e-3)  # fp16
    assert (sample.top_probs[:start] == 0).all()  # inside the prompt: nothing to learn
    assert torch.equal(sample.top_ids[start:, 0].long(), sample.labels[start:])  # the argmax leads
    own = label_sequence(target, tokens, layers, start, own_tokens=True, top_k=TOP_K)  # labels = next tokens
    assert torch.equal(own.top_ids, sample.top_ids)  # the last position has no next token, so no probabilities
    assert torch.equal(own.top_probs[:-1], sample.top_probs[:-1]) and (own.top_probs[-1] == 0).all()


def test_learning_the_top_k_of_a_sure_target_is_learning_its_argmax(engine, labelled):
    """With all of the target's probability on its argmax, the top-k loss is the argmax's cross-entropy at every
    TTT step (and the real, spread top-k gives another loss)."""
    t2d = torch.full((49152,), -100)
    d2t = draft_vocabulary([s.labels for s in labelled], 512)
    t2d[d2t] = torch.arange(len(d2t))
    row = pack(labelled[:2], t2d, 200)[0]
    head = init_head(engine.runner.model, DraftConfig.for_target(engine.model_config, 512), d2t)
    sure = PackedBatch(**{**row.__dict__, "top_ids": row.top_ids.clone(), "top_probs": torch.zeros_like(row.top_probs)})
    sure.top_probs[..., 0] = 1.0
    sure.top_ids[..., 0] = row.labels.clamp(min=0)
    with torch.no_grad():
        hard, hits, counted = ttt_losses(head, row, 3)
        soft_sure, hits_sure, _ = ttt_losses(head, sure, 3, teacher_probs=True)
        soft, _, _ = ttt_losses(head, row, 3, teacher_probs=True)
    assert hits == hits_sure and min(counted) > 50
    for h, s, spread in zip(hard, soft_sure, soft, strict=True):
        torch.testing.assert_close(s, h)
        assert abs(float(spread - h)) > 1e-3


def test_a_token_outside_the_draft_vocabulary_is_scored_as_a_miss(engine, labelled):
    """Held-out scoring counts every position with a target token, drafted-able or not (as serving meets them), so
    a smaller vocabulary does not score higher by leaving its hardest positions out; the loss skips those."""
    scored = {}
    for size in (32, 512):
        d2t = draft_vocabulary([s.labels for s in labelled], size)
        row = pack(labelled[:2], inverse_vocab(d2t, 49152), 200)[0]
        head = init_head(engine.runner.model, DraftConfig.for_target(engine.model_config, size), d2t)
        with torch.no_grad():
            losses, hits, counted = ttt_losses(head, row, 2)
        in_vocab = [int((step_labels(row, k) >= 0).sum()) for k in range(2)]
        assert all(torch.isfinite(x) for x in losses) and hits[0] <= in_vocab[0]
        scored[size] = counted, in_vocab
    assert scored[32][0] == scored[512][0]  # the same positions scored
    assert all(a < b for a, b in zip(scored[32][1], scored[512][1], strict=True))  # fewer of them in vocabulary


def test_training_streams_from_the_store_resumes_and_goes_on_from_a_saved_head(engine, labelled, tmp_path):
    writer = StoreWriter(tmp_path / "store", labelled[0].features.shape[1], shard_tokens=200, top_k=TOP_K)
    for i, s in enumerate(labelled):
        writer.add("text", i + 1, [s])
    writer.flush()
    reader = StoreReader(tmp_path / "store")
    cfg = DraftTrainConfig(draft_vocab_size=512, row_len=200, rows_per_step=2, max_steps=2, warmup_steps=1,
                           eval_every=1, ttt_steps=2, teacher_probs=True)
    d2t = draft_vocabulary(reader.all_labels(), cfg.draft_vocab_size)
    t2d = torch.full((49152,), -100)
    t2d[d2t] = torch.arange(len(d2t))
    rows = StoreRows(reader, t2d, cfg.row_len)
    in_memory = pack(labelled, t2d, cfg.row_len)
    assert len(rows) == len(in_memory) == 3
    for a, b in zip(rows, in_memory, strict=True):  # streamed rows are the rows packed from memory
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    head_cfg = DraftConfig.for_target(engine.model_config, cfg.draft_vocab_size)
    held = in_memory[-1:]
    first = fit(init_head(engine.runner.model, head_cfg, d2t), rows, cfg, tmp_path / "run", held)
    assert first["steps"] == 2 and len(first["history"]) == 2
    assert (tmp_path / "run" / "best" / "best.pt").is_file()
    cfg.max_steps = 3
    head = init_head(engine.runner.model, head_cfg, d2t, fresh_lm_head=True)
    resumed = fit(head, rows, cfg, tmp_path / "run", held)
    assert resumed["steps"] == 3 and [h["step"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["best_tau"] >= first["best_tau"] > 1.0
    head.save(tmp_path / "saved")  # `--init-head`: fine-tuning starts from the saved head, as saved (bf16)
    warm = warm_start(engine.runner.model, tmp_path / "saved", reader, 512, tmp_path / "d2t.pt")
    saved = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in head.state_dict().items()}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in warm.parameters())
    assert saved.keys() == warm.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in warm.state_dict().items())
    cfg.max_steps = 1
    fit(warm, rows, cfg, tmp_path / "warm", held)
    assert torch.equal(warm.d2t, d2t) and not torch.equal(warm.fc.weight_t, saved["fc.weight_t"])


def test_training_stops_after_patience_evaluations_without_a_better_tau(engine, labelled, tmp_path):
    """A learning rate too small to move any weight: the first evaluation stays the best, and `patience` (2) more
    evaluations without a better held-out τ end the run at step 3 of 10."""
    cfg = DraftTrainConfig(draft_vocab_size=512, row_len=200, rows_per_step=2, max_steps=10, warmup_steps=1,
                           eval_every=1, ttt_steps=2, patience=2, lr=1e-30)
    d2t = draft_vocabulary(torch.cat([s.labels for s in labelled]), cfg.draft_vocab_size)
    rows = pack(labelled, inverse_vocab(d2t, 49152), cfg.row_len)
    head = init_head(engine.runner.model, DraftConfig.for_target(engine.model_config, cfg.draft_vocab_size), d2t)
    run = fit(head, rows, cfg, tmp_path / "run", rows[-1:])
    assert run["steps"] == 3 and [h["tau"] for h in run["history"]] == [round(run["best_tau"], 4)] * 3


def test_a_saved_head_widened_to_a_larger_vocabulary_keeps_its_predictions(engine, labelled, tmp_path):
    """`--init-head` with a larger `--draft-vocab-size`: the head's tokens come first with their rows as saved (its
    logits over them unchanged), then the data's most frequent others, whose rows are the target's mapped into the
    head's output space: a head whose rows are the target's own (an identity map, fit over more tokens than the
    hidden size) gets the target's rows for them."""
    writer = StoreWriter(tmp_path / "store", labelled[0].features.shape[1], top_k=TOP_K)
    for i, s in enumerate(labelled):
        writer.add("text", i + 1, [s])
    writer.flush()
    reader, target = StoreReader(tmp_path / "store"), engine.runner.model
    d2t = draft_vocabulary(reader.all_labels(), 640)
    head = init_head(target, DraftConfig.for_target(engine.model_config, 640), d2t)
    head.save(tmp_path / "saved")
    warm = warm_start(target, tmp_path / "saved", reader, 768, tmp_path / "d2t.pt")
    assert warm.cfg.draft_vocab_size == 768 and torch.equal(warm.d2t[:640], d2t)
    assert torch.equal(warm.d2t[640:], draft_vocabulary(reader.all_labels(), 768)[640:])  # the next most frequent
    assert all(p.requires_grad and p.dtype == torch.float32 for p in warm.parameters())
    saved = warm_start(target, tmp_path / "saved", reader, 640, tmp_path / "unused.pt")
    h = torch.randn(5, engine.model_config.hidden_size)
    torch.testing.assert_close(warm.logits(h)[:, :640], saved.logits(h), rtol=1e-6, atol=1e-5)
    want = target.lm_head.weight_t[:, warm.d2t[640:]]
    error = (warm.lm_head.weight_t[:, 640:] - want).norm() / want.norm()
    assert error < 0.01  # the saved rows are bf16 (relative rounding up to 0.4%): the map fit to them is near I
    again = warm_start(target, tmp_path / "saved", reader, 768, tmp_path / "d2t.pt")  # a resumed run
    assert torch.equal(again.d2t, warm.d2t)


def test_answers_of_a_quantized_generator_are_labelled_by_the_unquantized_target(tmp_path):
    """`--generate-quant`: the engine answers in a PTQ format (faster), and every stored label is the unquantized
    target's argmax from a prefill — not the generator's next token, which differs from it somewhere."""
    engine = LLMEngine(EngineConfig(max_batch=2, max_model_len=1024))  # calibration reads 512
    target, layers = engine.runner.model, DraftConfig.for_target(engine.model_config, 512).target_layers
    serve_generator(engine, target, GENERATOR)
    assert engine.runner.model is not target
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in QUESTIONS))
    store = StoreWriter(tmp_path / "store", 3 * engine.model_config.hidden_size)
    job = AnswerJob(range(len(QUESTIONS)), 0.0, 0, GENERATOR)
    store_answers(engine, target, store, jsonl, job, 48, layers)
    reader, prompts = StoreReader(tmp_path / "store"), load_prompts(engine.tokenizer, jsonl, job.rows)
    differs = False
    for i, prompt in enumerate(prompts):
        got, start = reader.sample(i), len(prompt) - 1
        want = label_sequence(target, got.tokens.tolist(), layers, start, own_tokens=False)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.features, want.features)
        differs |= bool((got.labels[start:-1] != got.tokens[start + 1 :]).any())
    assert differs
