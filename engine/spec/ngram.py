"""Prompt lookup: a training-free drafter for outputs that repeat their context (code edits, quotes, extraction).

Find the most recent earlier occurrence of the sequence's last n tokens (longest n first) and propose the tokens
that followed it. Drafts are deterministic, so under sampling they count as a one-hot q in rejection sampling.
"""

from __future__ import annotations


def propose_ngram(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1, lookback: int = 2048) -> list[int]:
    """Up to `k` tokens that followed the latest earlier match of the last n tokens, n from `max_n` down."""
    history = tokens[-lookback:]
    for n in range(min(max_n, len(history) - 1), min_n - 1, -1):
        suffix = history[-n:]
        # Scan right to left: the latest match is the likeliest to continue the same way.
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                follow = history[start + n : start + n + k]
                if follow:
                    return follow
    return []
