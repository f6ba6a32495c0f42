"""A request whose processing raises inside an engine step fails alone; a failed weight swap rolls back.

Driven in-process on the shared engine (no thread): the failures are real exceptions on real code paths.
"""

import copy
from dataclasses import replace

import pytest

from optiserve.engine.config import SamplingParams
from optiserve.engine.llm_engine import LLMEngine, SwapError, WeightSet, run_to_completion
from optiserve.engine.sequence import Request, RequestOutput

NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(engine, chat_prompt_ids) -> list[list[int]]:
    return run_to_completion(engine, chat_prompt_ids, GREEDY)


class Collector:
    """Per request id: the generated tokens and the error, if the engine reported one."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}

    def __call__(self, out: RequestOutput) -> None:
        self.tokens.setdefault(out.request_id, [])
        for o in out.outputs:
            self.tokens[out.request_id] += o.token_ids
        if out.error:
            self.errors[out.request_id] = out.error


def add_all(engine: LLMEngine, prompts: list[list[int]], params: dict[int, SamplingParams]) -> Collector:
    got = Collector()
    for i, ids in enumerate(prompts):
        engine.add_request(Request(str(i), ids, params.get(i, GREEDY), got))
    return got


def run(engine: LLMEngine) -> None:
    engine.step()
    while engine.scheduler.has_work():
        engine.step()


def test_request_failing_in_a_step_fails_alone(engine, chat_prompt_ids, baseline):
    """More top logprobs than the vocabulary has: torch.topk raises while that request's tokens are appended."""
    bad = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=engine.model_config.vocab_size + 1)
    got = add_all(engine, chat_prompt_ids, {3: bad})
    run(engine)
    assert set(got.errors) == {"3"} and "engine failed" in got.errors["3"]
    for i in range(len(chat_prompt_ids)):
        if i != 3:
            assert got.tokens[str(i)] == baseline[i], i


def test_failing_batched_forward_is_retried_one_by_one(engine, chat_prompt_ids, baseline):
    """A token id past the embedding table makes the whole batched decode raise; retried one sequence at a
    time, only that sequence's request fails and the others go on with the same tokens."""
    got = add_all(engine, chat_prompt_ids, {})
    engine.step()  # prefills, then one batched decode
    victim = next(s for s in engine.scheduler.running if s.request.request_id == "5")
    victim.token_ids[-1] = engine.model_config.vocab_size + 7  # its next decode input is out of range
    run(engine)
    assert set(got.errors) == {"5"}
    for i in range(len(chat_prompt_ids)):
        if i != 5:
            assert got.tokens[str(i)] == baseline[i], i
    assert not engine.scheduler.has_work()


def test_failed_swap_rolls_back_and_fails_no_request(engine, chat_prompt_ids, baseline):
    """The new weights raise in the re-prefill (as out of memory would): the swap raises SwapError, the old
    weights keep serving, and the running requests finish with the tokens they would have had."""
    broken = copy.deepcopy(engine.master)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated: out of memory")

    broken.hidden_states = out_of_memory
    before = engine.weights
    got = add_all(engine, chat_prompt_ids[:4], {})
    engine.step()
    engine.step()
    with pytest.raises(SwapError, match="rolled back"):
        engine.use_weights(WeightSet(broken, "int8"))
    assert engine.weights is before and engine.runner.model is before.model
    run(engine)
    assert not got.errors
    assert [got.tokens[str(i)] for i in range(4)] == baseline[:4]


def test_swap_to_another_shape_is_refused_before_switching(engine):
    other = copy.deepcopy(engine.master)
    other.cfg = replace(other.cfg, num_layers=other.cfg.num_layers - 1)
    before = engine.weights
    with pytest.raises(SwapError, match="shape"):
        engine.use_weights(WeightSet(other, "none"))
    assert engine.weights is before


def test_seed_at_the_edges_of_64_bits(engine, chat_prompt_ids):
    """Per-choice seeds wrap instead of overflowing: the top seed with n=2 samples both choices."""
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    params = SamplingParams(max_tokens=2, seed=2**63 - 1, n=2, ignore_eos=True)
    got = add_all(engine, chat_prompt_ids[:1], {0: params})
    run(engine)
    assert not got.errors and len(got.tokens["0"]) == 4
