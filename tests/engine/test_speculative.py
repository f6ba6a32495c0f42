"""Speculative decoding on the real model: lossless greedy output, exact rollback, counts.

With the CPU kernels, a verify row is computed exactly as a decode step computes it, so greedy output must be
identical token for token, on every format. Without them (no compiler: PyTorch's SDPA and matmuls round
differently for 6 rows than for one), a divergence is accepted only where plain decoding's top-2 logprobs are
within TIE_GAP (a near-tie, the same rule as the batching test).
"""

import pytest
import torch

from optiserve.engine import ops
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, WeightSet
from optiserve.engine.sequence import Request, RequestOutput, SpecStats
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized

TIE_GAP = 1e-4
EXACT = ops.decode_attention_available(torch.float32, torch.device("cpu"))
NEW_TOKENS = 64
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=2, ignore_eos=True)


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, at_once: bool):
    """Token ids, top-2 logprobs and speculation counts per prompt; all prompts queued together if `at_once`."""
    outs: dict[str, list[RequestOutput]] = {str(i): [] for i in range(len(prompts))}
    batches = [list(range(len(prompts)))] if at_once else [[i] for i in range(len(prompts))]
    for batch in batches:
        for i in batch:
            engine.add_request(Request(str(i), prompts[i], params, outs[str(i)].append))
        while engine.scheduler.has_work() or not engine._new.empty():
            engine.step()
    results = []
    for i in range(len(prompts)):
        parts = [o for out in outs[str(i)] for o in out.outputs]
        results.append(([t for o in parts for t in o.token_ids], [lp for o in parts for lp in o.logprobs],
                        outs[str(i)][-1].spec))
    return results


def assert_same_greedy(ref, got) -> None:
    for (ref_ids, ref_lps, _), (ids, _, _) in zip(ref, got, strict=True):
        if EXACT:
            assert ids == ref_ids
            continue
        diverged = next((i for i, (a, b) in enumerate(zip(ref_ids, ids, strict=False)) if a != b), None)
        if diverged is None:
            assert len(ids) == len(ref_ids)
            continue
        top = sorted(ref_lps[diverged].top.values(), reverse=True)
        assert top[0] - top[1] < TIE_GAP, f"diverged at token {diverged}, top-2 gap {top[0] - top[1]:.2e}"


@pytest.fixture(scope="module")
def base():
    return LLMEngine(EngineConfig(max_batch=4, max_model_len=1024))


@pytest.fixture(scope="module", params=["auto", "chain", "ngram"])
def speculative(request):
    # The full draft every step (no adaptive policy): what these tests check is drafting and verifying. "auto":
    # the head's default tree; "chain": the head's 5-token chain.
    shape = {"speculative": "auto", "num_speculative_tokens": 5} if request.param == "chain" else {}
    return LLMEngine(EngineConfig(max_batch=4, max_model_len=1024, **{"speculative": request.param, **shape},
                                  speculative_adaptive=False))


def test_greedy_identical_at_batch_1_and_4(base, speculative, chat_prompt_ids):
    ref = generate(base, chat_prompt_ids, GREEDY, at_once=False)
    for at_once in (False, True):
        got = generate(speculative, chat_prompt_ids, GREEDY, at_once)
        assert_same_greedy(ref, got)
        total = SpecStats()
        for *_, spec in got:
            total.add(spec)
        assert total.drafts > 0 and total.draft_tokens >= total.drafts
        assert sum(total.accepted_per_pos) == total.accepted_tokens
        if speculative.cfg.speculative == "auto":  # the head drafts every step (n-gram lookup may find nothing)
            # Every verification emits its accepted drafts plus one target token.
            assert total.drafts + total.accepted_tokens >= len(chat_prompt_ids) * (NEW_TOKENS - 1)


def test_greedy_identical_on_a_quantized_model(base, chat_prompt_ids):
    """NVFP4 W4A4 with an NVFP4 KV cache: activations and K/V are rounded to 4 bits, so any difference between
    the verify rows and the decode steps would flip roundings and show. (Without the CPU kernels, last-bit
    differences flipped that way move logits by ~0.3, past what the tie rule can judge: weight-only NVFP4 there.)"""
    spec = LLMEngine(EngineConfig(max_batch=4, max_model_len=1024, speculative="auto"))
    quant, kv = ("nvfp4", "nvfp4") if EXACT else ("nvfp4-w4a16", "none")
    req = QuantRequest(quant, kv, calib_samples=4, calib_seq_len=128)
    for engine in (base, spec):
        engine.use_weights(prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req))
    try:
        ref = generate(base, chat_prompt_ids[:4], GREEDY, at_once=False)
        assert_same_greedy(ref, generate(spec, chat_prompt_ids[:4], GREEDY, at_once=True))
    finally:
        base.use_weights(WeightSet(base.master, "none"))


@pytest.mark.skipif(not EXACT, reason="a claim about the CPU kernels (PyTorch rounds 6 rows unlike 1)")
def test_verify_rows_equal_decode_steps_bit_for_bit(base, chat_prompt_ids):
    """One forward over [last, 5 drafts] gives each row's logits exactly as 6 one-token decode steps do."""
    assert_verify_equals_decode_steps(base.runner, chat_prompt_ids[1])


def assert_verify_equals_decode_steps(runner, prompt: list[int]) -> None:
    """Verify [last prompt token, 5 random drafts] in one forward, then decode the same 6 tokens one at a time
    from the same prefilled cache: the logits must be equal bit for bit."""
    start = len(prompt) - 1
    rows = [prompt[-1], *torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(1)).tolist()]
    runner.prefill(0, prompt[:-1])
    verified, _ = runner.verify([rows], [start])
    runner.prefill(0, prompt[:-1])
    decoded = torch.stack([runner.decode([t], [start + i])[0] for i, t in enumerate(rows)])  # [6, V]
    runner.cache.truncate(0, 0)
    assert torch.equal(verified[0], decoded)


def test_rollback_leaves_cache_as_if_rejected_tokens_were_never_written(base, chat_prompt_ids):
    """Verify 5 drafts, keep 2 positions, roll back; the cache equals one that only ever saw the kept tokens."""
    runner, prompt = base.runner, chat_prompt_ids[0]
    start = len(prompt) - 1  # the prefill covers positions [0, start); verification feeds the last prompt token
    rows = [prompt[-1], *torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(0)).tolist()]
    kept = 2

    def cache_after(tokens: list[int], rollback: bool) -> tuple[torch.Tensor, torch.Tensor]:
        runner.cache.truncate(0, 0)
        runner.prefill(0, prompt[:-1])
        runner.verify([tokens], [start])
        if rollback:
            runner.cache.truncate(0, start + kept, start + len(tokens))
        assert len(runner.cache.tables.tables[0].blocks) == runner.cache.tables.pool.blocks_for(start + kept)
        return runner.cache.read(0, start + kept)

    k_rolled, v_rolled = cache_after(rows, rollback=True)
    k_clean, v_clean = cache_after(rows[:kept], rollback=False)
    runner.cache.truncate(0, 0)
    assert torch.equal(k_rolled, k_clean) and torch.equal(v_rolled, v_clean)


def test_sampling_with_speculation_runs_seeded(speculative, chat_prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    first = generate(speculative, chat_prompt_ids[:2], params, at_once=True)
    again = generate(speculative, chat_prompt_ids[:2], params, at_once=True)
    assert [ids for ids, *_ in first] == [ids for ids, *_ in again]
    assert all(len(ids) > 0 for ids, *_ in first)


def test_a_step_that_fails_part_way_leaves_each_drafts_backlog_as_before(chat_prompt_ids):
    """A batched speculative step that raises after some sequences took their verified features is undone and each
    sequence is decoded alone: every head's state must again hold exactly the positions the target verified (the
    engine's pre-step copy must not share what the failed step appended). The policy drafts nothing here: the
    steps where features pile up between proposals."""
    engine = LLMEngine(EngineConfig(max_batch=2, max_model_len=1024, speculative="auto"))
    engine.spec.policy.budget = lambda seqs: 0
    on_verify, second_rows = engine.spec.drafter.on_verify, []

    def fails_once(seq, features):
        second_rows.append(seq.slot) if seq.slot == 1 else None
        if seq.slot == 1 and len(second_rows) == 3:  # after the first sequence of the third step took its features
            raise RuntimeError("injected failure")
        return on_verify(seq, features)

    engine.spec.drafter.on_verify = fails_once
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(chat_prompt_ids[:2]):
        engine.add_request(Request(str(i), prompt, params, lambda out: None))
    engine.step()
    while engine.scheduler.has_work():
        engine.step()
        for seq in engine.scheduler.running:
            state = seq.draft_state
            assert state.draft_len + sum(len(f) for f in state.pending) == len(seq.token_ids) - 1
    assert len(second_rows) > 3  # the failure happened, and decoding went on
