"""Incremental detokenization gives, token by token, exactly the text a full decode of the generated ids gives."""

import random

import pytest

from optiserve.engine.config import SamplingParams
from optiserve.engine.detokenize import REPLACEMENT_CHAR, text_delta, update_text
from optiserve.engine.sequence import Request, Sequence


def generate_text(tokenizer, ids: list[int], finish_on_last: str | None = None, stop: list[str] | None = None):
    """Feed `ids` one at a time as the engine does; returns (seq.text, the streamed deltas joined)."""
    req = Request("r", [], SamplingParams(stop=stop or []), emit=lambda out: None)
    seq = Sequence(req, 0, [], max_tokens=len(ids))
    streamed = ""
    for i, tok in enumerate(ids):
        seq.token_ids.append(tok)
        update_text(seq, tokenizer, finish_on_last if i == len(ids) - 1 else None)
        streamed += text_delta(seq)
        if seq.finish_reason is not None:
            break
    return seq.text, streamed


def test_random_token_streams_match_full_decode(engine):
    """Random vocabulary ids split UTF-8 characters across tokens at every possible place."""
    tok = engine.tokenizer
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        text, streamed = generate_text(tok, ids, finish_on_last="length")
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert streamed == text


def test_multibyte_characters_are_held_back_until_complete(engine):
    tok = engine.tokenizer
    ids = tok("Café ☕ 日本語 🎉 done", add_special_tokens=False).input_ids
    req = Request("r", [], SamplingParams(), emit=lambda out: None)
    seq = Sequence(req, 0, [], max_tokens=len(ids))
    for tok_id in ids:
        seq.token_ids.append(tok_id)
        update_text(seq, tok, None)
        assert REPLACEMENT_CHAR not in seq.text
    assert seq.text == tok.decode(ids)


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_finish_drops_only_the_stop_token(engine, finish):
    tok = engine.tokenizer
    ids = [*tok("Hello there, friend", add_special_tokens=False).input_ids, tok.eos_token_id]
    text, _ = generate_text(tok, ids, finish_on_last=finish)
    expected_ids = ids[:-1] if finish == "stop" else ids
    assert text == tok.decode(expected_ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text(engine):
    tok = engine.tokenizer
    ids = tok("one two three four five", add_special_tokens=False).input_ids
    text, streamed = generate_text(tok, ids, stop=["three"])
    assert text == "one two " and streamed == text
