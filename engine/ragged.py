"""A chunked-prefill step's input as one ragged batch (a row per token), and the prompt logprobs it yields.

Prompt logprobs (echo) need logits at every prompt position: the chunks of a request's first sequence that cover
positions still missing them ask for all their rows; other chunks want only their last row, and only when it is
the sequence's last token (its logits sample the next one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampler import token_logprobs
from .scheduler import Chunk
from .sequence import Request, Sequence


@dataclass
class RaggedBatch:
    slots: list[int] = field(default_factory=list)  # [T] each row's KV slot
    tokens: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    logit_rows: list[int] = field(default_factory=list)  # [R] rows whose logits are computed
    spans: list[tuple[int, int]] = field(default_factory=list)  # each chunk's range in the R logits

    @classmethod
    def of(cls, chunks: list[Chunk]) -> RaggedBatch:
        batch = cls()
        for c in chunks:
            first = len(batch.tokens)
            batch.slots += [c.seq.slot] * c.num_tokens
            batch.tokens += c.seq.token_ids[c.start : c.end]
            batch.positions += range(c.start, c.end)
            last = len(batch.tokens)
            if wants_prompt_logprobs(c.seq, c.start):
                rows = range(first, last)
            else:
                rows = range(last - 1, last) if c.samples else range(0)
            batch.spans.append((len(batch.logit_rows), len(batch.logit_rows) + len(rows)))
            batch.logit_rows += rows
        return batch

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Logits [R, V] as each chunk's [r, V]."""
        return [logits[a:b] for a, b in self.spans]


def wants_prompt_logprobs(seq: Sequence, start: int) -> bool:
    """Whether computing positions from `start` yields prompt logprobs still missing (a request's first sequence
    computes them, once: a recompute after a preemption finds them there)."""
    lps = seq.request.prompt_logprobs
    return (seq.params.prompt_logprobs is not None and seq.index == 0 and start < seq.prompt_len - 1
            and start + 1 == (1 if lps is None else len(lps)))


def add_prompt_logprobs(req: Request, logits: torch.Tensor, start: int) -> None:
    """The logprobs of the prompt tokens that logits [S, V] of positions [start, start + S) predict."""
    targets = req.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
    lps = token_logprobs(logits[: len(targets)], targets, req.params.prompt_logprobs or 0)
    req.prompt_logprobs = [*(req.prompt_logprobs or [None]), *lps]
