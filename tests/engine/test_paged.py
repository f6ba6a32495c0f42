"""The paged KV cache on the real model: greedy outputs are identical with 16-token blocks (and the default chunked
prefill and prefix caching) and with one block per sequence (the unpaged layout, whole prompts), one prompt at a
time and 8 at once, on every KV format and in bf16; admission waits for free
blocks; prefix caching reuses a shared system prompt without changing outputs; every block goes back."""

import os

import pytest
from prometheus_client import generate_latest

from optiserve.engine.chat import CHAT_INSTRUCTIONS
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, RequestError, WeightSet, run_to_completion
from optiserve.engine.sequence import Request, TokenLogprob
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized
from optiserve.server.cli.args import engine_config
from optiserve.server.cli.main import build_parser
from optiserve.server.metrics import ServerMetrics

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def unpaged(engine) -> LLMEngine:
    """The old layout: one block of the whole context per sequence, whole prompts, nothing reused (the session
    engine pages, chunks prompts and caches prefixes, as `serve` does by default)."""
    return LLMEngine(EngineConfig(max_batch=engine.cfg.max_batch, max_model_len=engine.cfg.max_model_len,
                                  kv_block_size=0, max_num_batched_tokens=0, enable_prefix_caching=False))


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
    assert_same_greedy_outputs(engine, unpaged, chat_prompt_ids, kv)


def assert_same_greedy_outputs(a: LLMEngine, b: LLMEngine, prompts: list[list[int]], kv: str) -> None:
    """Both engines with KV format `kv` give the same greedy tokens, one prompt at a time and all at once."""
    req = QuantRequest("none", kv, calib_samples=4, calib_seq_len=128)
    for e in (a, b):
        e.use_weights(prepare_quantized(e.model_dir, e.master, e.tokenizer, req))
    try:
        for at_once in (False, True):
            assert generate(a, prompts, at_once) == generate(b, prompts, at_once)
    finally:
        for e in (a, b):
            e.use_weights(WeightSet(e.master))


def test_admission_by_free_blocks_runs_every_request_and_refuses_what_never_fits(engine, chat_prompt_ids):
    """A pool of twice the largest request's blocks: requests wait for blocks rather than slots, all finish with
    the outputs a roomy cache gives, and one needing more blocks than the pool is refused up front."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = run_to_completion(engine, chat_prompt_ids, params)
    needs = [engine.scheduler.blocks_needed(len(p) + 16) for p in chat_prompt_ids]
    block_bytes = 16 * engine.runner.cache.bytes_per_token
    small = LLMEngine(EngineConfig(max_batch=8, max_model_len=1024, kv_cache_memory=2 * max(needs) * block_bytes,
                                   max_num_batched_tokens=0))  # whole prompts: admission by worst-case blocks
    pool = small.runner.cache.tables.pool
    assert pool.num_blocks == 2 * max(needs) < sum(needs)
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(chat_prompt_ids))}
    for i, ids in enumerate(chat_prompt_ids):
        small.add_request(Request(str(i), ids, params, lambda o: outs[o.request_id].extend(o.outputs[0].token_ids)))
    peak_running, peak_usage = 0, 0.0
    while small.scheduler.has_work() or not small._new.empty():
        small.step()
        peak_running = max(peak_running, len(small.scheduler.running))
        peak_usage = max(peak_usage, small.stats().kv_cache_usage)
        assert small.scheduler.reserved_blocks <= pool.num_blocks
    assert 2 <= peak_running < len(chat_prompt_ids) and 0 < peak_usage <= 1
    assert [outs[str(i)] for i in range(len(chat_prompt_ids))] == ref
    assert_every_block_free(small)
    assert small.scheduler.reserved_blocks == 0
    too_long = pool.num_blocks * pool.block_size + 1  # within the context, beyond the pool
    with pytest.raises(RequestError, match="KV-cache blocks") as refused:
        small.check_request(too_long - 20, 20)
    assert refused.value.param == "max_tokens"


def test_prefix_caching_prefills_a_shared_system_prompt_once_with_identical_outputs(engine, plain_engine):
    """Four chats behind one ~500-token system prompt: with prefix caching the later three reuse its blocks (the
    pool's hit count says so) and every output equals the uncached engine's."""
    prompts, shared = chats_behind_one_system_prompt(engine.tokenizer, repeats=6)
    assert shared > 400
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cached = LLMEngine(EngineConfig(max_batch=4, max_model_len=1024, enable_prefix_caching=True,
                                    max_num_batched_tokens=0))
    got = run_to_completion(cached, prompts, params)  # queued together: each is admitted after the one before
    stats = cached.stats()
    assert stats.prefix_cache_hits == 3 * (shared // 16 * 16)  # the first computes the prefix, the rest reuse it
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert got == run_to_completion(plain_engine, prompts, params)
    assert_every_block_free(cached)
    metrics = generate_latest(ServerMetrics("m", cached.stats).registry).decode()
    assert f'optiserve:prefix_cache_hits_total{{model_name="m"}} {float(stats.prefix_cache_hits)}' in metrics


def chats_behind_one_system_prompt(tokenizer, repeats: int) -> tuple[list[list[int]], int]:
    """Four chats whose system prompt is the chat instructions `repeats` times, and how many tokens they all start
    with."""
    system = " ".join(CHAT_INSTRUCTIONS * repeats)
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": s}],
                                           add_generation_prompt=True, tokenize=False) for s in CHAT_INSTRUCTIONS[:4]]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return prompts, next(i for i in range(len(prompts[0])) if len({p[i] for p in prompts}) > 1)


def test_the_memory_of_8_full_contexts_runs_32_short_chats_at_once(engine, chat_prompt_ids):
    """Blocks follow the tokens: the pool 8 sequences of max_model_len took as fixed rows admits 32 chats of at
    most a quarter of it together (admission counts each one's prompt + max_tokens)."""
    max_len = engine.cfg.max_model_len
    memory = 8 * max_len * engine.runner.cache.bytes_per_token
    chats = LLMEngine(EngineConfig(max_batch=32, max_model_len=max_len, kv_cache_memory=memory,
                                   max_num_batched_tokens=0))  # whole prompts: every block reserved up front
    for i in range(32):
        prompt = chat_prompt_ids[i % len(chat_prompt_ids)]
        params = SamplingParams(max_tokens=max_len // 4 - len(prompt), temperature=0, ignore_eos=True)
        chats.add_request(Request(str(i), prompt, params, lambda out: None))
    chats.step()
    assert len(chats.scheduler.running) == 32 and not chats.scheduler.waiting
    assert chats.scheduler.reserved_blocks == chats.runner.cache.tables.pool.num_blocks
    for i in range(32):
        chats.abort(str(i))
    chats.step()
    assert_every_block_free(chats)


def test_kv_cache_memory_may_be_a_fraction_of_the_device_memory(chat_prompt_ids):
    """`--kv-cache-memory` below 1: that fraction of the host's RAM (the CPU's device memory) in blocks, which serve;
    zero or less is refused."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fraction = 2**26 / ram  # 64 MiB on any machine
    small = LLMEngine(EngineConfig(max_batch=2, max_model_len=256, kv_cache_memory=fraction))
    cache = small.runner.cache
    assert cache.tables.pool.num_blocks == int(fraction * ram) // (16 * cache.bytes_per_token) > 0
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert [len(out) for out in run_to_completion(small, chat_prompt_ids[:2], params)] == [4, 4]
    assert_every_block_free(small)
    for flag, amount in (("0.01", 0.01), ("754974720", 754974720)):  # as `serve` parses it
        assert engine_config(build_parser().parse_args(["serve", "--kv-cache-memory", flag])).kv_cache_memory == amount
    for amount in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="fraction of the device's memory"):
            EngineConfig(kv_cache_memory=amount)


BF16_TIE = 0.25  # two bf16 steps of a logprob near 0 (its logits round to 1/16-1/8): a near-tie in bf16


def test_bf16_pages_exactly_and_chunks_and_caches_prefixes_up_to_its_rounding(chat_prompt_ids):
    """A bf16 model (SDPA over a window gathered from the blocks): 16-token blocks give the unpaged engine's tokens
    exactly, one prompt at a time and 8 at once. Chunked prefill and prefix caching compute a prompt in other row
    counts, which ATen's bf16 matmuls round differently (as batch 8 against batch 1 does), so with them (the
    defaults) tokens may part from the reference's only where its top two are within BF16_TIE, with logprobs that
    close before."""
    whole = {"max_batch": 8, "max_model_len": 1024, "dtype": "bfloat16", "max_num_batched_tokens": 0,
             "enable_prefix_caching": False}
    unpaged = LLMEngine(EngineConfig(**whole, kv_block_size=0))
    paged = LLMEngine(EngineConfig(**whole))
    chunked = LLMEngine(EngineConfig(max_batch=8, max_model_len=1024, dtype="bfloat16"))  # chunks, prefix caching
    assert chunked.cfg.max_num_batched_tokens > 0 and chunked.cfg.enable_prefix_caching
    assert paged.runner.cache.shape.block_size == 16
    for at_once in (False, True):
        ref = generate_logprobs(unpaged, chat_prompt_ids, at_once)
        assert [tokens(r) for r in generate_logprobs(paged, chat_prompt_ids, at_once)] == [tokens(r) for r in ref]
        for want, got in zip(ref, generate_logprobs(chunked, chat_prompt_ids, at_once), strict=True):
            assert_parts_only_at_a_near_tie(want, got)


def assert_parts_only_at_a_near_tie(want: list[TokenLogprob], got: list[TokenLogprob]) -> None:
    same = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a.token_id != b.token_id), len(want))
    assert all(abs(a.logprob - b.logprob) < BF16_TIE for a, b in zip(want[:same], got[:same], strict=True))
    if same < len(want):
        top = sorted(want[same].top.values(), reverse=True)
        assert top[0] - top[1] < BF16_TIE, f"parted at token {same} with top-2 gap {top[0] - top[1]}"


def generate_logprobs(engine: LLMEngine, prompts: list[list[int]], at_once: bool) -> list[list[TokenLogprob]]:
    """Each prompt's greedy tokens with their top-2 logprobs (all queued together, or one at a time)."""
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=2)
    batches = [list(enumerate(prompts))] if at_once else [[(i, p)] for i, p in enumerate(prompts)]
    out: dict[str, list[TokenLogprob]] = {str(i): [] for i in range(len(prompts))}
    for batch in batches:
        for i, ids in batch:
            engine.add_request(Request(str(i), ids, params, lambda o: out[o.request_id].extend(o.outputs[0].logprobs)))
        engine.step()
        while engine.scheduler.has_work():
            engine.step()
    assert_every_block_free(engine)
    return [out[str(i)] for i in range(len(prompts))]


def tokens(logprobs: list[TokenLogprob]) -> list[int]:
    return [lp.token_id for lp in logprobs]
