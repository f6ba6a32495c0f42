"""The paged KV cache on the real model: greedy outputs are identical with 16-token blocks and with one block per
sequence (the unpaged layout), one prompt at a time and 8 at once, on every KV format; every block goes back."""

import pytest

from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, WeightSet, run_to_completion
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def unpaged(engine) -> LLMEngine:
    return LLMEngine(EngineConfig(max_batch=engine.cfg.max_batch, max_model_len=engine.cfg.max_model_len,
                                  kv_block_size=0))


def assert_every_block_free(engine: LLMEngine) -> None:
    tables = engine.runner.cache.tables
    assert tables.pool.num_free == tables.pool.num_blocks
    assert not any(t.blocks for t in tables.tables) and engine.stats().kv_cache_usage == 0


def generate(engine: LLMEngine, prompts: list[list[int]], at_once: bool) -> list[list[int]]:
    outs = run_to_completion(engine, prompts, GREEDY) if at_once else \
        [run_to_completion(engine, [p], GREEDY)[0] for p in prompts]
    assert_every_block_free(engine)
    return outs


@pytest.mark.parametrize("kv", ["none", "fp8", "nvfp4"])
def test_greedy_identical_paged_and_unpaged(engine, unpaged, chat_prompt_ids, kv):
    assert engine.runner.cache.shape.block_size == 16
    assert unpaged.runner.cache.shape.block_size == unpaged.runner.max_len  # one block per sequence
    req = QuantRequest("none", kv, calib_samples=4, calib_seq_len=128)
    for e in (engine, unpaged):
        e.use_weights(prepare_quantized(e.model_dir, e.master, e.tokenizer, req))
    try:
        for at_once in (False, True):
            assert generate(engine, chat_prompt_ids, at_once) == generate(unpaged, chat_prompt_ids, at_once)
    finally:
        for e in (engine, unpaged):
            e.use_weights(WeightSet(e.master))
