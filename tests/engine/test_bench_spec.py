"""`bench spec`: what it times and what it divides by."""

from __future__ import annotations

import json

from optiserve.engine.config import EngineConfig
from optiserve.engine.llm_engine import LLMEngine
from optiserve.engine.spec.bench import bench_spec, timed_decode


def test_bench_spec_counts_the_steps_it_times(engine, chat_prompt_ids):
    """`bench spec` states draft and verify costs against a measured plain step (seconds / steps), not against
    seconds per token x the batch: sequences that stop early leave a smaller batch."""
    tokens, seconds, steps, _ = timed_decode(engine, chat_prompt_ids[:2], 6)
    assert seconds > 0 and steps == 5 and tokens == 2 * steps  # the first step (a token each) is not timed
    tokens, _, steps, _ = timed_decode(engine, [chat_prompt_ids[0]], 1)
    assert tokens == steps == 0  # one token: the untimed first step made it


def test_bench_spec_decodes_every_mode_on_one_engine(chat_prompt_ids, tmp_path):
    """Plain, full-draft and adaptive decoding share one engine's weights and KV cache (engines built one after
    another decoded 6-13% apart at batch 8), and the engine is left speculating as it came."""
    engine = LLMEngine(EngineConfig(max_batch=2, max_model_len=1024, speculative="ngram", max_num_batched_tokens=0))
    adaptive = engine.spec
    result = bench_spec(engine, chat_prompt_ids[:4], 12, {"label": "x"}, str(tmp_path / "spec.json"), batch=2)
    assert engine.spec is adaptive and json.loads((tmp_path / "spec.json").read_text()) == result
    assert result["steps_drafted"] > 0  # the full draft, wherever the lookup finds a match
    assert result["base_tok_s"] > 0 and result["adaptive"]["spec_tok_s"] > 0 and result["label"] == "x"
