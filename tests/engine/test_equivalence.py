"""Our engine against HF transformers on the real default model (fp32)."""

from collections.abc import Iterator

import pytest
import torch

from optiserve.engine.config import SamplingParams
from optiserve.engine.llm_engine import run_to_completion

NEW_TOKENS = 64
LOGIT_TOL = 1e-3


def test_greedy_tokens_match_hf(engine, hf_model, chat_prompt_ids):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    for ids in chat_prompt_ids:  # one at a time: batching is covered by its own test
        ours = run_to_completion(engine, [ids], params)[0]
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
        assert ours == ref.tolist()[: len(ours)], engine.tokenizer.decode(ours)
        assert len(ours) == len(ref) or ours[-1] in engine.eos_ids


@pytest.fixture
def slot_0(engine) -> Iterator[int]:
    """Slot 0 of the session engine, driven through its runner; its blocks go back after the test."""
    yield 0
    engine.runner.cache.tables.free(0)


def test_last_position_logits_match_hf(engine, hf_model, chat_prompt_ids, slot_0):
    for ids in chat_prompt_ids:
        ours = engine.runner.prefill(slot_0, ids)  # [V]
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0, -1]
        assert (ours - ref).abs().max().item() < LOGIT_TOL


def test_decode_logits_match_hf_after_generation(engine, hf_model, chat_prompt_ids, slot_0):
    """Logits of a decode step (KV cache path) agree with a full HF forward over the same tokens."""
    ids = chat_prompt_ids[0]
    out = run_to_completion(engine, [ids], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    full = ids + out
    engine.runner.prefill(slot_0, full[:-1])
    ours = engine.runner.decode([full[-1]], [len(full) - 1])[0]
    with torch.inference_mode():
        ref = hf_model(torch.tensor([full])).logits[0, -1]
    assert (ours - ref).abs().max().item() < LOGIT_TOL
