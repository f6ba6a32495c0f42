"""Token choice: greedy, temperature, top-k, top-p, per-sequence seeded generators; and logprobs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .config import SamplingParams
from .sequence import Sequence, TokenLogprob


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest value along the last dim (the first of equal ones, a NaN first of all, as
    `torch.argmax`), int64. CPU fp32 goes through NumPy, whose argmax over vocabulary-wide rows is an order of
    magnitude faster than torch's CPU one (README, session 24): every greedy step and verify takes one."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.argmax(-1)
    return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1), dtype=np.int64))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row of logits [V]; returns the filtered logits."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[0] = False  # even a top_p that rounds to 0 in fp32 keeps the best token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Pick one token per row of `logits` [B, V]."""
    def raise_it(row: int, e: Exception) -> None:
        raise e

    return sample_rows(logits, params, generators, raise_it)  # type: ignore[return-value]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                on_error: Callable[[int, Exception], None]) -> list[int | None]:
    """One token per row of `logits` [B, V]; greedy rows share one argmax over the batch, sampled rows draw
    alone, so a row that fails goes to `on_error(row, e)` (its token is None) and touches no other row."""
    greedy = argmax(logits).tolist()
    out: list[int | None] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            out.append(greedy[row])
            continue
        try:
            probs = filter_logits(logits[row], p).softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
        except Exception as e:
            on_error(row, e)
            out.append(None)
    return out


def token_logprobs(logits: torch.Tensor, chosen: list[int], top_n: int) -> list[TokenLogprob]:
    """Logprobs of `chosen` tokens under the raw distribution of each row of `logits` [N, V], plus top-n."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, torch.tensor(chosen).unsqueeze(1)).squeeze(1).tolist()
    tops: list[dict[int, float]] = [{} for _ in chosen]
    if top_n > 0:
        values, ids = logp.topk(top_n, dim=-1)
        tops = [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(chosen, picked, tops, strict=True)]


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A per-sequence generator when the request has a seed, so its samples repeat run to run."""
    if seed is None:
        return None
    # Modulo 2^64: choice i of a seed near the top of the range wraps instead of overflowing manual_seed
    # (which takes [-2^63, 2^64) and reads a negative seed as seed + 2^64, so small seeds are unchanged).
    return torch.Generator().manual_seed((seed + index) % 2**64)


def sample_each(logits: torch.Tensor, seqs: list[Sequence],
                on_error: Callable[[Sequence, Exception], None]) -> list[int | None]:
    """One token per sequence from its row of `logits` [B, V]; a sequence whose sampling fails goes to
    `on_error` and its token is None."""
    return sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs],
                       lambda row, e: on_error(seqs[row], e))
