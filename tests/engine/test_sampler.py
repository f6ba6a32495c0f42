"""Sampling: filters, seeds, and that sampled frequencies follow the filtered distribution."""

import pytest
import torch

from optiserve.engine.config import SamplingParams
from optiserve.engine.sampler import argmax, filter_logits, make_generator, sample, sample_rows, token_logprobs

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def test_top_k_keeps_k_best():
    out = filter_logits(LOGITS, SamplingParams(top_k=2))
    assert torch.isfinite(out).tolist() == [True, True, False, False, False]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = LOGITS.softmax(-1)
    p = float(probs[0] + probs[1]) - 1e-4  # needs exactly the two best tokens
    out = filter_logits(LOGITS, SamplingParams(top_p=p))
    assert torch.isfinite(out).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(LOGITS, SamplingParams(top_p=1e-6))).sum() == 1


def test_greedy_and_seeded_sampling():
    logits = LOGITS.repeat(2, 1)
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy, greedy], [None, None]) == [0, 0]
    p = SamplingParams(temperature=1.0, seed=3)
    a = [sample(LOGITS[None], [p], [g])[0] for g in [make_generator(3, 0)] * 20]
    b = [sample(LOGITS[None], [p], [g])[0] for g in [make_generator(3, 0)] * 20]
    assert a == b


def test_sampled_frequencies_match_softmax():
    gen = make_generator(0, 0)
    params = SamplingParams(temperature=0.7)
    draws = torch.tensor([sample(LOGITS[None], [params], [gen])[0] for _ in range(4000)])
    observed = torch.bincount(draws, minlength=5).float()
    expected = (LOGITS / 0.7).softmax(-1) * len(draws)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


def test_token_logprobs_are_log_softmax():
    (lp,) = token_logprobs(LOGITS[None], [1], top_n=2)
    ref = torch.log_softmax(LOGITS, -1)
    assert abs(lp.logprob - ref[1].item()) < 1e-6 and list(lp.top) == [0, 1]


def test_degenerate_parameters_still_sample_the_best_token():
    tiny_p = SamplingParams(top_p=5e-324)  # rounds to 0 in fp32
    assert torch.isfinite(filter_logits(LOGITS, tiny_p)).sum() == 1
    assert SamplingParams(temperature=1e-300).greedy
    assert sample(LOGITS[None], [tiny_p], [make_generator(0, 0)]) == [0]


def test_a_failing_row_fails_alone_and_others_draw_as_if_alone():
    logits = torch.stack([LOGITS, torch.full_like(LOGITS, float("nan")), LOGITS, LOGITS])  # row 1: NaN logits
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, seed=6),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=7)]
    failed = []
    out = sample_rows(logits, params, [make_generator(p.seed, 0) for p in params],
                      lambda row, e: failed.append(row))
    assert failed == [1] and out[1] is None
    alone = [sample(logits[r : r + 1], [params[r]], [make_generator(params[r].seed, 0)])[0] for r in (0, 2, 3)]
    assert [out[0], out[2], out[3]] == alone


@pytest.mark.parametrize("shape", [(49152,), (8, 49152), (2, 6, 3000)])
def test_argmax_is_torch_argmax(shape):
    """Ties to the first index, a NaN wins, infinities, strided views: the ids torch.argmax gives, int64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, shape, generator=g).float()  # many ties
    flat = x.view(-1, shape[-1])
    flat[0, 5], flat[-1, 7] = float("inf"), float("nan")
    flat[-1, 2] = float("nan")
    for t in (x, x[..., ::2], x.transpose(0, -1) if x.dim() > 1 else x):
        got = argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))
    assert torch.equal(argmax(x.double()), x.double().argmax(-1))  # other dtypes go through torch
