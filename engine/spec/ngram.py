"""Prompt lookup: a training-free drafter for outputs that repeat their context (code edits, quotes, extraction).

Find the most recent earlier occurrence of the sequence's last n tokens (longest n first) and propose the tokens
that followed it. Drafts are deterministic, so under sampling they count as a one-hot q in rejection sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def propose_ngram(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1, lookback: int = 2048) -> list[int]:
    """Up to `k` tokens that followed the latest earlier match of the last n tokens, n from `max_n` down."""
    return lookup_ngram(tokens, k, max_n, min_n, lookback)[1]


def lookup_ngram(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1, lookback: int = 2048
                 ) -> tuple[int, list[int]]:
    """(n, up to `k` tokens that followed the latest earlier match of the last n tokens), n from `max_n` down;
    (0, []) when nothing matches. A longer match predicts its continuation better."""
    history = tokens[-lookback:]
    for n in range(min(max_n, len(history) - 1), min_n - 1, -1):
        suffix = history[-n:]
        # Scan right to left: the latest match is the likeliest to continue the same way.
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                follow = history[start + n : start + n + k]
                if follow:
                    return n, follow
    return 0, []


@dataclass
class LookupAccuracy:
    """Online estimates, by match length n, of how often a lookup is right: P(its first token) and P(each further
    token | the one before). Each lookup is scored against the tokens its sequence went on with, verified or not,
    so a lookup left out of the draft still teaches. They rank the lookup's tokens against a draft head's."""

    ema: float = 0.05
    prior_first: float = 0.5
    prior_then: float = 0.8
    first: dict[int, float] = field(default_factory=dict)
    then: dict[int, float] = field(default_factory=dict)

    def log_probs(self, n: int, length: int) -> list[float]:
        """log P(a lookup from a match of n tokens is right up to each of its first `length` tokens)."""
        first, then = self.first.get(n, self.prior_first), self.then.get(n, self.prior_then)
        return [math.log(max(first, 1e-6)) + j * math.log(max(then, 1e-6)) for j in range(length)]

    def observe(self, n: int, chain: list[int], went_on: list[int]) -> None:
        """Fold in a lookup `chain` (match length n) and the tokens that followed: positions past the first wrong
        one, or past the tokens known yet, tell nothing."""
        known = min(len(chain), len(went_on))
        if known == 0:
            return
        run = next((j for j in range(known) if chain[j] != went_on[j]), known)
        self.first[n] = self._ema(self.first.get(n, self.prior_first), float(run > 0))
        for j in range(1, min(run + 1, known)):
            self.then[n] = self._ema(self.then.get(n, self.prior_then), float(j < run))

    def _ema(self, old: float, new: float) -> float:
        return old + self.ema * (new - old)
