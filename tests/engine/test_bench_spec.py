"""`bench spec`: what it times and what it divides by."""

from __future__ import annotations

from optiserve.engine.spec.bench import timed_decode


def test_bench_spec_counts_the_steps_it_times(engine, chat_prompt_ids):
    """`bench spec` states draft and verify costs against a measured plain step (seconds / steps), not against
    seconds per token x the batch: sequences that stop early leave a smaller batch."""
    tokens, seconds, steps, _ = timed_decode(engine, chat_prompt_ids[:2], 6)
    assert seconds > 0 and steps == 5 and tokens == 2 * steps  # the first step (a token each) is not timed
    tokens, _, steps, _ = timed_decode(engine, [chat_prompt_ids[0]], 1)
    assert tokens == steps == 0  # one token: the untimed first step made it
