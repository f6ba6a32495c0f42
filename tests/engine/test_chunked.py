"""Chunked prefill on the real model: a per-step token budget mixes decode rows with chunks of prompts in one
ragged forward. Greedy outputs equal whole-prompt prefill (batch 1 and 8, every KV format); a pool too small for
every request preempts and recomputes without changing any output; n > 1 shares its prompt's blocks; prompt
logprobs, weight swaps mid-prompt and a shared system prompt behave as without chunks; every block goes back."""

import pytest
from prometheus_client import generate_latest

from optiserve.engine.config import MAX_PREFILL_TOKENS, EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, WeightSet, run_to_completion
from optiserve.engine.sequence import Request, RequestOutput
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized
from optiserve.server.metrics import ServerMetrics

from .test_paged import (
    GREEDY,
    assert_every_block_free,
    assert_same_greedy_outputs,
    chats_behind_one_system_prompt,
    generate,
)

BUDGET = 16  # tokens per step: 8 decode rows leave chunks of 8-16 prompt tokens


def chunked_engine(engine: LLMEngine, **kw) -> LLMEngine:
    """An engine like `engine` (the whole-prompt reference) with a token budget, idle steps held to it too (so an
    idle engine's prompts are split as well) and, unless asked, no prefix cache (each test computes what it asks
    for; the defaults together are tested in test_paged.py)."""
    budget = kw.get("max_num_batched_tokens", BUDGET)
    cfg = {"max_batch": engine.cfg.max_batch, "max_model_len": engine.cfg.max_model_len,
           "max_num_batched_tokens": budget, "max_prefill_tokens": budget, "enable_prefix_caching": False, **kw}
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def chunked(plain_engine) -> LLMEngine:
    return chunked_engine(plain_engine)


def run_requests(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Every request's outputs, each sequence's tokens accumulated; the last output keeps the prompt logprobs."""
    tokens: dict[str, dict[int, list[int]]] = {}
    last: dict[str, RequestOutput] = {}

    def collect(out: RequestOutput) -> None:
        for o in out.outputs:
            tokens.setdefault(out.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
        last[out.request_id] = out

    for i, (ids, params) in enumerate(requests):
        engine.add_request(Request(str(i), ids, params, collect))
    engine.step()
    while engine.scheduler.has_work():
        engine.step()
    assert_every_block_free(engine)
    assert all(last[r].error is None and last[r].finished for r in last)
    return {r: (tokens.get(r, {}), last[r]) for r in last}


@pytest.mark.parametrize("kv", ["none", "fp8", "nvfp4"])
def test_greedy_identical_with_and_without_chunks(plain_engine, chunked, chat_prompt_ids, kv):
    assert_same_greedy_outputs(chunked, plain_engine, chat_prompt_ids, kv)


def test_a_pool_too_small_preempts_and_recomputes_with_identical_outputs(plain_engine, chat_prompt_ids):
    """A pool of 1.5x the largest request's blocks for 8 requests: blocks run out mid-decode, the newest sequences
    are preempted (counted, exported as vLLM's num_preemptions) and recomputed later, and every output equals the
    roomy engine's."""
    ref = generate(plain_engine, chat_prompt_ids, at_once=True)
    need = max(plain_engine.scheduler.blocks_needed(len(p) + GREEDY.max_tokens) for p in chat_prompt_ids)
    block_bytes = 16 * plain_engine.runner.cache.bytes_per_token
    small = chunked_engine(plain_engine, kv_cache_memory=need * 3 // 2 * block_bytes, enable_prefix_caching=True)
    assert generate(small, chat_prompt_ids, at_once=True) == ref
    stats = small.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_queries == sum(map(len, chat_prompt_ids))  # a recompute is not a new query
    metrics = generate_latest(ServerMetrics("m", small.stats).registry).decode()
    assert f'optiserve:num_preemptions_total{{model_name="m"}} {float(stats.num_preemptions)}' in metrics


def test_an_idle_engine_prefills_whole_prompts_then_chunks_beside_decode_rows(plain_engine, chat_prompt_ids):
    """While no request has a token, a step computes up to max_prefill_tokens (4 chats in one step); one prompt that
    arrives while they decode gets what the token budget leaves beside their 4 decode rows; outputs are unchanged."""
    engine = chunked_engine(plain_engine, max_prefill_tokens=None)
    assert engine.cfg.max_prefill_tokens == MAX_PREFILL_TOKENS
    got: dict[str, list[int]] = {}
    first, late = chat_prompt_ids[:4], chat_prompt_ids[4]
    for i, ids in enumerate([*first, late]):
        if i == len(first):
            engine.step()
            assert [s.num_generated for s in engine.scheduler.running] == [1] * len(first)
        engine.add_request(Request(str(i), ids, GREEDY, lambda out: got.setdefault(out.request_id, []).extend(
            out.outputs[0].token_ids)))
    engine.step()
    assert engine.scheduler.running[-1].num_computed == BUDGET - len(first)
    while engine.scheduler.has_work():
        engine.step()
    assert_every_block_free(engine)
    assert [got[str(i)] for i in range(len(first) + 1)] == run_to_completion(plain_engine, [*first, late], GREEDY)


def test_a_wave_of_prompts_that_outnumbers_the_streams_is_prefilled_in_one_step(plain_engine, chat_prompt_ids):
    """3 prompts arriving beside 2 streams are computed whole in one step (the budget of 16 would hold the last
    of them for many steps, each re-reading the weights for the 2 decode rows); outputs are unchanged."""
    engine = chunked_engine(plain_engine, max_prefill_tokens=None)
    got: dict[str, list[int]] = {}
    first, late = chat_prompt_ids[:2], chat_prompt_ids[2:5]
    for i, ids in enumerate([*first, *late]):
        if i == len(first):
            engine.step()
        engine.add_request(Request(str(i), ids, GREEDY, lambda out: got.setdefault(out.request_id, []).extend(
            out.outputs[0].token_ids)))
    engine.step()
    assert [s.num_generated for s in engine.scheduler.running] == [2] * len(first) + [1] * len(late)
    while engine.scheduler.has_work():
        engine.step()
    assert_every_block_free(engine)
    want = run_to_completion(plain_engine, [*first, *late], GREEDY)
    assert [got[str(i)] for i in range(len(first) + len(late))] == want


def test_n_sequences_share_the_prompt_and_sample_as_without_chunks(plain_engine, chunked, chat_prompt_ids):
    """n = 3 seeded samples: the siblings fork the first one's prompt blocks (the prompt is computed once) and
    draw exactly the tokens whole-prompt prefill gives."""
    params = SamplingParams(n=3, max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    requests = [(chat_prompt_ids[0], params), (chat_prompt_ids[1], params)]
    cached = chunked_engine(plain_engine, enable_prefix_caching=True)
    for engine in (chunked, cached):
        got = run_requests(engine, requests)
        want = run_requests(plain_engine, requests)
        assert {r: t for r, (t, _) in got.items()} == {r: t for r, (t, _) in want.items()}
        assert all(len(t) == 3 and len({tuple(s) for s in t.values()}) > 1 for t, _ in got.values())
    assert cached.stats().prefix_cache_queries == sum(len(ids) for ids, _ in requests)  # once a request, not a seq
    assert chunked.stats().prefix_cache_queries == 0  # caching off: nothing looked up, nothing counted (as vLLM)


def test_prompt_logprobs_over_chunks_equal_whole_prefill(plain_engine, chunked, chat_prompt_ids):
    """Echo scoring (max_tokens 0) and a generating request with prompt logprobs: a prompt split over several steps
    yields every position's logprob, as one prefill does."""
    prompt = [t for ids in chat_prompt_ids[:3] for t in ids]  # > 2 chunks
    requests = [(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2)),
                (prompt, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0))]
    got, want = run_requests(chunked, requests), run_requests(plain_engine, requests)
    for r in want:
        a, b = got[r][1].prompt_logprobs, want[r][1].prompt_logprobs
        assert len(a) == len(b) == len(prompt) and a[0] is None
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert list(x.top) == list(y.top)
        assert got[r][0] == want[r][0]


def test_a_weight_swap_mid_prompt_recomputes_what_was_computed(plain_engine, chunked, chat_prompt_ids):
    """A swap to FP8 KV while a long prompt is half computed: its computed positions are re-prefilled on the new
    weights and the answer equals the one the new weights give from the start."""
    prompt = [t for ids in chat_prompt_ids[:4] for t in ids]
    fp8 = QuantRequest("none", "fp8", calib_samples=4, calib_seq_len=128)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    try:
        chunked.add_request(Request("swap", prompt, params, lambda out: got.extend(out.outputs[0].token_ids)))
        got: list[int] = []
        chunked.step()
        chunked.step()
        (seq,) = chunked.scheduler.running
        assert 0 < seq.num_computed < len(prompt)
        chunked.use_weights(prepare_quantized(chunked.model_dir, chunked.master, chunked.tokenizer, fp8))
        while chunked.scheduler.has_work():
            chunked.step()
        assert_every_block_free(chunked)
        ref = plain_engine
        ref.use_weights(prepare_quantized(ref.model_dir, ref.master, ref.tokenizer, fp8))
        assert got == run_to_completion(plain_engine, [prompt], params)[0]
    finally:
        for e in (plain_engine, chunked):
            e.use_weights(WeightSet(e.master))


def test_a_shared_1000_token_system_prompt_is_prefilled_once_in_chunks(plain_engine):
    """Four chats behind one ~1,000-token system prompt, chunked and prefix-cached: the later three reuse its blocks
    (counted as hits) and every output equals the whole-prompt, uncached engine's."""
    prompts, shared = chats_behind_one_system_prompt(plain_engine.tokenizer, repeats=13)
    assert 900 < shared < 1000
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cached = chunked_engine(plain_engine, max_batch=4, max_num_batched_tokens=256, enable_prefix_caching=True)
    got = run_to_completion(cached, prompts, params)
    stats = cached.stats()
    assert stats.prefix_cache_hits == 3 * (shared // 16 * 16)
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert got == run_to_completion(plain_engine, prompts, params)
    assert_every_block_free(cached)


def test_an_abort_mid_prompt_frees_its_blocks(chunked, chat_prompt_ids):
    prompt = [t for ids in chat_prompt_ids for t in ids]
    chunked.add_request(Request("gone", prompt, GREEDY, lambda out: None))
    chunked.step()
    assert chunked.scheduler.running[0].num_computed == BUDGET
    chunked.abort("gone")
    chunked.step()
    assert_every_block_free(chunked)


@pytest.mark.parametrize(("kw", "match"), [({"max_batch": 8, "max_num_batched_tokens": 4}, ">= max_batch"),
                                           ({"max_num_batched_tokens": 64, "speculative": "ngram"}, "speculative")])
def test_budgets_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)
