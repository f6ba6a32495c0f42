"""Incremental detokenization, stop conditions and the outputs reported for one sequence."""

from __future__ import annotations

import torch

from .sampler import token_logprobs
from .sequence import SeqOutput, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a token that ends mid-UTF-8 character decodes to


def finish_reason_for_token(seq: Sequence, token: int, eos_ids: set[int], max_len: int) -> str | None:
    """`stop` on EOS / stop_token_ids, `length` on max_tokens or a full context, else None."""
    p = seq.params
    if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
        return "stop"
    if seq.num_generated >= seq.max_tokens or len(seq.token_ids) >= max_len:
        return "length"
    return None


def update_text(seq: Sequence, tokenizer, token_finish: str | None) -> None:
    """Decode the newly generated tokens, apply stop strings, and set `seq.finish_reason` when done."""
    ids = seq.generated_ids
    if token_finish == "stop":
        ids = ids[:-1]  # the EOS / stop token itself is not part of the text
    text = seq.text + new_text(seq, ids, tokenizer, final=token_finish is not None)
    stops = seq.params.stop
    if stops:
        # Only the new tail can contain a new match; start a little before the text we had.
        start = max(0, len(seq.text) - max(len(s) for s in stops))
        hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        if hits:
            text, token_finish = text[: min(hits)], "stop"
    seq.text = text
    seq.finish_reason = token_finish


def new_text(seq: Sequence, ids: list[int], tokenizer, final: bool) -> str:
    """The text `ids` add after what `seq.text` holds, decoding only a short window (as vLLM does) instead of every
    generated token each step. The window starts a few tokens back, at a point where the text was complete, so
    context-dependent decoding (a SentencePiece leading space) comes out as a full decode would. While the window
    ends mid-character (U+FFFD) nothing is added, unless the sequence is finishing."""
    window = ids[seq.text_prefix_offset :]
    prefix = tokenizer.decode(ids[seq.text_prefix_offset : seq.text_read_offset], skip_special_tokens=True)
    full = tokenizer.decode(window, skip_special_tokens=True)
    if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
        return ""
    seq.text_prefix_offset, seq.text_read_offset = seq.text_read_offset, len(ids)
    return full[len(prefix) :]


def text_delta(seq: Sequence) -> str:
    """The text not yet sent; while running, hold back an incomplete character and a possible stop prefix."""
    end = len(seq.text)
    if seq.finish_reason is None:
        if seq.text.endswith(REPLACEMENT_CHAR):
            end -= 1
        if seq.params.stop:
            end -= max(len(s) for s in seq.params.stop) - 1
    end = max(end, seq.sent_text_len)
    delta = seq.text[seq.sent_text_len : end]
    seq.sent_text_len = end
    return delta


def append_tokens(seq: Sequence, tokens: list[int], logits: torch.Tensor, eos_ids: set[int], max_len: int,
                  tokenizer) -> None:
    """Append a step's new tokens (the target's logits for each [m, V]) up to the first stop; update the text."""
    for i, tok in enumerate(tokens):
        seq.token_ids.append(tok)
        if seq.params.logprobs is not None:
            seq.pending_logprobs += token_logprobs(logits[i : i + 1], [tok], seq.params.logprobs)
        update_text(seq, tokenizer, finish_reason_for_token(seq, tok, eos_ids, max_len))
        if seq.finish_reason is not None:
            break


def take_output(seq: Sequence) -> SeqOutput:
    """What the sequence produced since its last output (marked as sent)."""
    new_ids = seq.generated_ids[seq.sent_tokens :]
    seq.sent_tokens = seq.num_generated
    logprobs, seq.pending_logprobs = seq.pending_logprobs, []
    return SeqOutput(seq.index, new_ids, text_delta(seq), logprobs, seq.finish_reason)
