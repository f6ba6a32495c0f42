"""Acceptance rules on synthetic distributions: greedy picks the target's argmax chain; rejection sampling
reproduces the target's distribution exactly (chi-square over many draws), whatever the draft distribution."""

import math

import torch
from scipy.stats import chisquare

from optiserve.engine.sequence import SpecStats
from optiserve.engine.spec.bench import conditional_acceptance
from optiserve.engine.spec.ngram import LookupAccuracy, lookup_ngram, propose_ngram
from optiserve.engine.spec.verify import accept_greedy, accept_sampled, accept_tree_greedy

VOCAB = 6
DRAWS = 20_000


def test_greedy_accepts_the_matching_prefix_plus_the_target_token():
    logits = torch.full((4, VOCAB), -1.0)
    for pos, best in enumerate([2, 5, 1, 3]):
        logits[pos, best] = 1.0
    assert accept_greedy([2, 5, 0], logits) == [2, 5, 1]  # third draft rejected: the target's 1 instead
    assert accept_greedy([2, 5, 1], logits) == [2, 5, 1, 3]  # all accepted: plus the bonus token
    assert accept_greedy([4, 5, 1], logits) == [2]


def test_greedy_follows_the_tree_branch_the_target_agrees_with():
    """Root 0 with children 1 (token 4) and 2 (token 2); 2 has children 3 (token 0) and 4 (token 5); 5 (token 5)
    hangs under 1. The target's argmax per row: 2 at the root, 5 under row 2, 3 under row 4: the path root, 2, 4
    is kept and 3 follows as the bonus; a sibling holding the right token deeper elsewhere (row 5) is not."""
    tokens, parents = [9, 4, 2, 0, 5, 5], [-1, 0, 0, 2, 2, 1]
    logits = torch.full((6, VOCAB), -1.0)
    for row, best in enumerate([2, 1, 5, 0, 3, 1]):
        logits[row, best] = 1.0
    assert accept_tree_greedy(tokens, parents, logits) == ([2, 5, 3], [0, 2, 4])
    logits[0] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # no child of the root holds 3: the root's token only
    assert accept_tree_greedy(tokens, parents, logits) == ([3], [0])


def emitted_pairs(p: torch.Tensor, q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generate 2 tokens per trial by drafting 2 from q and verifying against p (rows = positions), re-drafting
    after a rejection like the engine does; returns counts over the VOCAB x VOCAB pairs."""
    counts = torch.zeros(VOCAB * VOCAB)
    for _ in range(DRAWS):
        out: list[int] = []
        while len(out) < 2:
            pos = len(out)
            drafts = [int(torch.multinomial(q[pos + i], 1, generator=gen)) for i in range(2 - pos)]
            out += accept_sampled(drafts, q[pos : pos + len(drafts)], p[pos : pos + len(drafts) + 1], gen)
        counts[out[0] * VOCAB + out[1]] += 1
    return counts


def test_rejection_sampling_reproduces_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, VOCAB, generator=gen) * 1.5, -1)  # target at positions 0, 1, 2
    q = torch.softmax(torch.randn(3, VOCAB, generator=gen) * 1.5, -1)  # a different draft distribution
    q[:, 0] = 0  # the draft never proposes token 0: only the residual can emit it
    q = q / q.sum(-1, keepdim=True)
    counts = emitted_pairs(p, q, gen)
    expected = (p[0][:, None] * p[1][None, :]).flatten() * DRAWS  # independent positions: p0(x) * p1(y)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    # The same test can fail: emitting the draft's own samples would not match p.
    assert chisquare((q[0][:, None] * q[1][None, :]).flatten().numpy() * DRAWS, expected.numpy()).pvalue < 1e-6


def test_ngram_proposes_what_followed_the_latest_match():
    history = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3]
    assert propose_ngram(history, 2) == [5, 7]  # the latest earlier "1 2 3" was followed by 5 7
    assert propose_ngram([1, 2, 3], 4) == []
    assert lookup_ngram(history, 2, max_n=5) == (3, [5, 7])  # no earlier "7 1 2 3": the longest match is 3 tokens
    assert lookup_ngram([4, 1, 2, 6, 1, 2], 3) == (2, [6, 1, 2])


def test_lookup_accuracy_learns_per_match_length_from_what_followed():
    acc = LookupAccuracy(ema=0.5, prior_first=0.5, prior_then=0.5)
    acc.observe(3, [7, 8, 9, 4], [7, 8, 5])  # first right, second right, third wrong, fourth not known
    assert (acc.first, acc.then) == ({3: 0.75}, {3: 0.375})  # then: 0.5 -> 0.75 (8 right) -> 0.375 (9 wrong)
    acc.observe(1, [7, 8], [6])  # wrong at once: nothing said of later positions
    assert acc.first[1] == 0.25 and 1 not in acc.then
    acc.observe(2, [7, 8], [7])  # right so far, the rest not known yet
    assert acc.first[2] == 0.75 and 2 not in acc.then
    acc.observe(2, [7, 8], [])  # nothing followed yet: nothing learned
    assert acc.first[2] == 0.75
    logp = acc.log_probs(3, 3)
    assert logp == sorted(logp, reverse=True) and math.isclose(math.exp(logp[1]), 0.75 * 0.375)


def test_conditional_acceptance_divides_each_position_by_the_one_before():
    stats = SpecStats()
    for proposed, accepted in [(3, 0), (3, 1), (3, 2), (3, 3), (3, 1)]:
        stats.record(proposed, accepted)
    assert conditional_acceptance(stats) == [0.8, 0.5, 0.5]  # 4/5 drafts, then 2 of those 4, then 1 of those 2
