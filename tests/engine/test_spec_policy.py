"""The adaptive draft budget: decisions on recorded figures, and on the real model (lossless, off when drafts
are always wrong, on when they are mostly right)."""

import pytest

from optiserve.engine.chat import chat_prompt_ids
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine
from optiserve.engine.sequence import SpecStats
from optiserve.engine.spec.drafters import NgramDrafter, Proposal
from optiserve.engine.spec.policy import AdaptivePolicy, PolicyConfig, StepRecord

from .test_speculative import assert_same_greedy, generate

K = 5
PLAIN_S = 0.030  # a plain decode step's seconds (any value: the policy works with ratios to it)


def policy_after(batch: int, acceptance: list[float], step_cost: float, steps: int = 500,
                 ema: float = 0.01, whole: bool = False) -> AdaptivePolicy:
    """A policy fed `steps` full-chain steps whose drafts are accepted position by position with the given
    conditional rates (each row draws a quantile from a fixed scrambled cycle of 100) and that cost `step_cost`
    plain steps each; a slow EMA so the estimates settle on the recorded rates (`whole`: a tree's policy)."""
    policy = AdaptivePolicy(PolicyConfig(K, ema=ema, whole=whole))
    policy.observe(StepRecord(0, [0] * batch, [0] * batch, PLAIN_S))
    for step in range(steps):
        accepted = []
        for b in range(batch):
            n, reach = 0, 1.0
            for c in acceptance:  # row b accepts position i while its quantile stays under the running rate
                reach *= c
                if (37 * (b + step * batch)) % 100 / 100 >= reach:
                    break
                n += 1
            accepted.append(n)
        policy.observe(StepRecord(K, [K] * batch, accepted, step_cost * PLAIN_S))
    return policy


def test_recorded_head_at_batch_1_drafts_one_token():
    """The issue's figures for the shipped head: 26% / 20% / 1% conditional acceptance, 6-row step 1.58x a plain
    one (draft 0.043 per token, verify 1.36): only the first draft pays."""
    policy = policy_after(1, [0.26, 0.2, 0.01, 0.01, 0.01], 1.58)
    assert policy.best_budget(1) == 1


def test_recorded_head_at_batch_8_turns_off():
    """At batch 8 the verify rows cost compute (measured 3.4x a plain step for 6 rows): drafting does not pay."""
    policy = policy_after(8, [0.26, 0.2, 0.01, 0.01, 0.01], 3.4)
    assert policy.best_budget(8) == 0


def test_high_acceptance_keeps_the_full_chain():
    policy = policy_after(1, [0.8] * K, 1.58)
    assert policy.best_budget(1) == K


def test_recorded_head_at_batch_8_keeps_other_batch_sizes_off():
    """A batch size never measured borrows r from the nearest measured one: batch 7 (sequences finishing) and
    batch 16 stay off without paying for full-chain steps to learn it again."""
    policy = policy_after(8, [0.26, 0.2, 0.01, 0.01, 0.01], 3.4)
    assert policy.best_budget(7) == policy.best_budget(16) == 0
    assert policy_after(1, [0.26, 0.2, 0.01, 0.01, 0.01], 1.58).best_budget(2) == 1


def run_policy(policy: AdaptivePolicy, steps: int, accepts: bool) -> list[int]:
    """Ask `steps` budgets at batch 1; every draft accepted (or none); each draft token costs 0.116 plain steps."""
    budgets = []
    for _ in range(steps):
        k = policy.budget([None])
        budgets.append(k)
        policy.observe(StepRecord(k, [k], [k if accepts else 0], (1 + 0.116 * k) * PLAIN_S))
    return budgets


def test_off_policy_probes_one_token_and_comes_back_to_the_full_chain():
    """Off after poor steps; a one-token probe within `probe_every` steps; good probes turn drafting back on and
    the chain grows back to K (an accepted chain's next position drifts back to the prior)."""
    policy = policy_after(1, [0.0] * K, 1.58, steps=50, ema=0.1)  # the serving EMA
    budgets = run_policy(policy, policy.cfg.probe_every + 1, accepts=True)
    assert budgets[0] == 0 and budgets[-1] == 1
    assert run_policy(policy, 60, accepts=True)[-1] == K


def test_probes_are_rarer_where_they_cost_more():
    """While off, one-token probes: every `probe_every` steps where a draft row is cheap (batch 1), and where it
    costs compute (batch 8, r ~0.6) so rarely that their extra cost stays within `probe_overhead`."""
    policy = policy_after(1, [0.0] * K, 1.58, steps=50, ema=0.1)
    budgets = run_policy(policy, 200, accepts=False)
    assert set(budgets) == {0, 1} and 200 // (policy.cfg.probe_every + 1) <= sum(budgets) <= 200 // 16
    batch8 = policy_after(8, [0.26, 0.2, 0.01, 0.01, 0.01], 3.4)
    r = batch8.per_draft(8)
    assert batch8.probe_interval(8) * batch8.cfg.probe_overhead >= r > 0.3


def test_a_tree_that_keeps_its_whole_depth_is_not_a_rejection_past_it():
    """A tree of 8 nodes, 2 deep, accepted 2 deep: position 3 was never drafted, so it must not be learned as
    rejected (a chain of 8 accepting 2 was rejected at position 3)."""
    tree, chain = AdaptivePolicy(PolicyConfig(8)), AdaptivePolicy(PolicyConfig(8))
    for policy, depths in ((tree, [2]), (chain, None)):
        policy.observe(StepRecord(0, [0], [0], PLAIN_S))
        for _ in range(50):
            policy.observe(StepRecord(8, [8], [2], 1.5 * PLAIN_S, depths))
    assert tree.acceptance[:2] == chain.acceptance[:2] == pytest.approx([1.0, 1.0], abs=0.01)
    assert tree.acceptance[2] == pytest.approx(tree.cfg.prior_acceptance) and chain.acceptance[2] < 0.01
    assert tree.expected_tokens(8) > chain.expected_tokens(8)


def test_a_tree_is_drafted_whole_or_not_at_all():
    """A tree's acceptance was measured on the whole tree (a smaller budget is a narrower tree, which accepts less):
    the fp32 model's 5-node tree + n-gram (positions 1 / 2 accepted 69% / 33%, a step 1.25x a plain one) drafts all
    5 nodes, where the chain model of the same figures would shrink it; at batch 8 (3.4x) it is off, and its probe
    is the whole tree, as rare as the policy allows."""
    acceptance = [0.69, 0.48, 0.05, 0.05, 0.05]
    chain = policy_after(1, acceptance, 1.25)
    tree = policy_after(1, acceptance, 1.25, whole=True)
    assert 0 < chain.best_budget(1) < K and tree.best_budget(1) == K
    off = policy_after(8, acceptance, 3.4, whole=True)
    assert off.best_budget(8) == 0
    interval, budgets = off.probe_interval(8), []
    for _ in range(3 * interval):
        budgets.append(k := off.budget([None] * 8))
        off.observe(StepRecord(k, [k] * 8, [0] * 8, (3.4 if k else 1.0) * PLAIN_S))
    assert set(budgets) == {0, K} and 1 <= budgets.count(K) <= 3
    assert interval == off.cfg.max_probe_every  # a probe costs ~2.4 plain steps here: as rare as allowed


def test_a_pruned_tree_costs_the_nodes_it_drafts_and_nothing_drafted_is_a_rejection():
    """A tree pruned to its likely nodes (budget 12) drafts 3 on average, at r = 0.1 a node: its steps cost 1.3
    plain steps, not 1 + 12 r, so 1.8 tokens a step keep it on. A sequence pruned to nothing is a rejection at
    position 1, and such steps cost their drafting alone (not a plain step's time): the cost follows them."""
    policy = AdaptivePolicy(PolicyConfig(12, ema=0.05, whole=True))
    policy.observe(StepRecord(0, [0], [0], PLAIN_S))
    for step in range(200):
        accepted = [1] if step % 5 else [0]  # 80% of the steps accept their first node, none deeper
        policy.observe(StepRecord(12, [3], accepted, 1.3 * PLAIN_S, [1]))
    assert policy.tree_nodes == pytest.approx(3) and policy.per_draft(1) == pytest.approx(0.1)
    assert policy.relative_cost(1, 12) == pytest.approx(1.3) and policy.best_budget(1) == 12
    first, plain_s = policy.acceptance[0], policy.costs[1].plain_s
    for _ in range(200):
        policy.observe(StepRecord(12, [0], [0], 1.1 * PLAIN_S, [0]))
    assert policy.acceptance[0] < first / 100 and policy.tree_nodes < 0.01 and policy.costs[1].plain_s == plain_s
    assert policy.relative_cost(1, 12) == pytest.approx(1.1, abs=0.01) and policy.best_budget(1) == 0


def test_probes_are_as_rare_as_their_own_measured_cost_says():
    """A probe catches the head up on the skipped steps and, at batch > 1, pads every sequence's verify rows: costs
    that a steady draft's r_B does not show, and a probe's time is untimed for r_B, which stays at its prior. The
    interval follows the probes' own measured cost: here (3 plain steps a probe) as rare as allowed."""
    policy, budgets = AdaptivePolicy(PolicyConfig(K, whole=True)), []
    for _ in range(400):
        budgets.append(k := policy.budget([None] * 8))
        drafted = [k] * (1 if policy.probing else 8) + [0] * (7 if policy.probing else 0)
        policy.observe(StepRecord(k, drafted, [0] * 8, (3.0 if k else 1.0) * PLAIN_S, timed=False,
                                  probe=policy.probing))
    assert policy.per_draft(8) == 8 * policy.cfg.prior_cost_per_draft  # never timed
    assert policy.probe_interval(8) == policy.cfg.max_probe_every
    assert 2 <= sum(1 for k in budgets[-256:] if k) <= 256 // policy.cfg.max_probe_every + 1


def test_before_any_measurement_a_large_batch_does_not_draft():
    """The prior r grows with the batch: a fresh policy drafts its whole tree at batch 1 and nothing at batch 8,
    where the first full-batch tree (the head catching up on 8 prompts, 48 verify rows) cost 6-14 plain steps."""
    policy = AdaptivePolicy(PolicyConfig(K, whole=True))
    assert policy.best_budget(1) == K and policy.best_budget(8) == 0


def test_a_step_that_first_catches_up_on_a_backlog_teaches_acceptance_not_cost():
    """The head's first draft after a prompt, or after steps that drafted nothing (a probe), reads that whole
    backlog first: its time is not what a draft costs each step, and counting it kept `int8` trees off (10 of 678
    steps drafted where the full tree ran 1.30x plain)."""
    policy = policy_after(1, [0.7, 0.7, 0.7, 0.7, 0.7], 1.5, whole=True)
    r, c1 = policy.per_draft(1), policy.acceptance[0]
    policy.observe(StepRecord(K, [K], [K], 6.0 * PLAIN_S, [K], timed=False))
    assert policy.per_draft(1) == r and policy.acceptance[0] > c1
    policy.observe(StepRecord(K, [K], [K], 6.0 * PLAIN_S, [K], timed=False, verify_seconds=1.1 * PLAIN_S))
    assert policy.per_draft(1) == r  # its verify alone cost less than r says a draft does: no news
    policy.observe(StepRecord(K, [K], [K], 6.0 * PLAIN_S, [K], timed=False, verify_seconds=4.0 * PLAIN_S))
    assert policy.per_draft(1) > r  # ... more: a draft costs at least that
    r = policy.per_draft(1)
    policy.observe(StepRecord(K, [K], [K], 6.0 * PLAIN_S, [K]))
    assert policy.per_draft(1) > r


def test_a_probes_verify_floors_r_for_the_whole_batch():
    """At batch 8 a probe drafts for one sequence and its verify takes that sequence's rows alone: a 6-row tree
    beside 7 decode rows cost 1.6 plain steps, where the whole batch's 48 rows cost ~8 times the extra. Taken as
    r_8 as it was (0.12), it let the next full-batch tree run at 15-17 plain steps."""
    policy = AdaptivePolicy(PolicyConfig(K, whole=True))
    policy.observe(StepRecord(0, [0] * 8, [0] * 8, PLAIN_S))
    probe = StepRecord(K, [K] + [0] * 7, [3] + [0] * 7, 2.3 * PLAIN_S, [3] + [0] * 7, timed=False, probe=True,
                       verify_seconds=1.6 * PLAIN_S)
    policy.observe(probe)
    assert policy.per_draft(8) == pytest.approx(0.6 / K * 8)
    assert policy.best_budget(8) == 0


def test_a_batch_size_not_measured_scales_the_nearest_measured_r():
    """Sequences finishing leave batch 6, then 5, ...; batch 8 borrowing batch 6's r as it was let the first
    full-batch tree at 8 run at 15 plain steps."""
    policy = policy_after(6, [0.7] * K, 2.5, whole=True)
    r6 = policy.per_draft(6)
    assert policy.per_draft(8) == pytest.approx(r6 * 8 / 6) and policy.per_draft(3) == pytest.approx(r6 / 2)


class WrongTokenDrafter(NgramDrafter):
    """A drafter whose acceptance is ~0 by construction: it always proposes the last vocabulary id, a token
    the chat model never emits. It stands for a head that does not match its target."""

    def __init__(self, k: int, token: int, policy: AdaptivePolicy):
        super().__init__(k)
        self.token, self.policy = token, policy
        self.calls: list[tuple[int, bool]] = []  # per proposal: sequences drafting, whether the policy probes

    def propose(self, seqs, k=None):
        self.calls.append((len(seqs), self.policy.probing))
        return [Proposal([self.token] * (k or self.k), None) for _ in seqs]


GREEDY = SamplingParams(max_tokens=48, temperature=0, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def adaptive_ngram():
    return LLMEngine(EngineConfig(max_batch=8, max_model_len=1024, speculative="ngram"))


class ForwardClock:
    """A clock that the target's forwards advance, each by a fixed cost plus one per row (a CPU step reads the
    weights once, a row costs compute): in these tests the policy sees what a step would cost on a quiet machine,
    whatever else shares the cores (with wall or CPU time, OpenMP's spin-waiting under load made one step's time
    5-10x another's and a plain step timed low turned drafting off)."""

    def __init__(self, step_s: float = 0.020, row_s: float = 0.002):
        self.now, self.step_s, self.row_s = 0.0, step_s, row_s

    def __call__(self) -> float:
        return self.now

    def wrap(self, forward):
        def timed(tokens, *args, **kwargs):
            self.now += self.step_s + self.row_s * tokens.numel()
            return forward(tokens, *args, **kwargs)

        return timed


@pytest.fixture(autouse=True)
def fresh_policy(request, monkeypatch):
    """Each engine test starts from the priors (the policy learns across requests: one test's drafter must not
    leave its estimates to the next), timed by a `ForwardClock` over the engine's own forwards."""
    if "adaptive_ngram" in request.fixturenames:
        engine = request.getfixturevalue("adaptive_ngram")
        clock, model = ForwardClock(), engine.runner.model
        monkeypatch.setattr(model, "hidden_states", clock.wrap(model.hidden_states))
        engine.spec.policy, engine.spec.clock = AdaptivePolicy(PolicyConfig(K)), clock


def totals(results) -> SpecStats:
    total = SpecStats()
    for *_, spec in results:
        total.add(spec)
    return total


def test_wrong_drafts_turn_drafting_off_and_output_stays_identical(engine, adaptive_ngram, chat_prompt_ids):
    prompts = chat_prompt_ids[:4]
    ref = generate(engine, prompts, GREEDY, at_once=True)
    ngram = adaptive_ngram.spec.drafter
    wrong = WrongTokenDrafter(K, adaptive_ngram.model_config.vocab_size - 1, adaptive_ngram.spec.policy)
    adaptive_ngram.spec.drafter = wrong
    try:
        got = generate(adaptive_ngram, prompts, GREEDY, at_once=True)
    finally:
        adaptive_ngram.spec.drafter = ngram
    assert_same_greedy(ref, got)
    total = totals(got)
    assert total.accepted_tokens == 0
    assert total.skipped_steps > 3 * total.drafts  # probes only
    # The batch drafts until it learns; then each probe drafts for one sequence: a head would catch up on one.
    assert wrong.calls[0] == (4, False)
    assert {n for n, probing in wrong.calls if probing} == {1}


def test_repetitive_text_keeps_ngram_drafting_on(engine, adaptive_ngram):
    # The model answers with the digits cycling 1234567890...: lookup finds the continuation from the second cycle.
    ids = chat_prompt_ids(engine.tokenizer, ["Count from 1 to 40, separated by commas."])
    ref = generate(engine, ids, GREEDY, at_once=True)
    got = generate(adaptive_ngram, ids, GREEDY, at_once=True)
    assert_same_greedy(ref, got)
    total, policy = totals(got), adaptive_ngram.spec.policy
    # The policy's own choices: steps it drafted vs steps it chose to skip (lookups that found nothing are neither).
    assert policy.steps_drafted > policy.steps_skipped, (policy.steps_drafted, policy.steps_skipped, total, policy)
    assert total.acceptance_rate > 0.5


def test_seeded_sampled_requests_repeat_whatever_the_policy_learned(adaptive_ngram, chat_prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3)
    first = generate(adaptive_ngram, chat_prompt_ids[:2], params, at_once=True)
    # Estimates that would turn drafting off: the seeded batch must still draft as it did the first time.
    adaptive_ngram.spec.policy = AdaptivePolicy(PolicyConfig(K, prior_acceptance=0.01, prior_cost_per_draft=5.0))
    again = generate(adaptive_ngram, chat_prompt_ids[:2], params, at_once=True)
    assert [ids for ids, *_ in first] == [ids for ids, *_ in again] and all(ids for ids, *_ in first)


def test_a_step_after_skipped_steps_reads_the_backlog_apart_and_is_timed(engine, chat_prompt_ids, monkeypatch):
    """The head reads a backlog (the prompt, then steps that drafted nothing) before the step that drafts, timed
    apart: that step is a steady one, timed for r, so r can fall again after drafting went off (untimed, it could
    only rise while off). Steps that follow a drafting step have no backlog; the output is the plain one."""
    spec = LLMEngine(EngineConfig(max_batch=2, max_model_len=1024, speculative="auto"))
    policy, records, asked = spec.spec.policy, [], []

    def scripted(seqs):  # plain steps 1-5 and 9-12, the whole tree otherwise
        asked.append(len(seqs))
        return 0 if len(asked) <= 5 or 9 <= len(asked) <= 12 else policy.cfg.max_budget

    monkeypatch.setattr(policy, "budget", scripted)
    monkeypatch.setattr(policy, "observe", records.append)
    prompts = chat_prompt_ids[:2]
    got = generate(spec, prompts, GREEDY, at_once=True)
    assert [ids for ids, *_ in got] == [ids for ids, *_ in generate(engine, prompts, GREEDY, at_once=True)]
    drafting = [(i, r) for i, r in enumerate(records) if r.budget]
    after_skips = [r for i, r in drafting if records[i - 1].budget == 0]
    assert len(after_skips) == 2 and all(r.timed and r.backlog_seconds > 0 for r in after_skips)
    assert all(r.timed and r.backlog_seconds == 0 for i, r in drafting if records[i - 1].budget)
