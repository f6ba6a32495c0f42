"""Accepting draft tokens against the target's scores: lossless for greedy and for sampling.

Greedy: accept the longest prefix of drafts equal to the target's argmax, then the target's argmax after it
(the bonus token) — the same tokens plain greedy decoding would produce.
Sampling (speculative sampling, Leviathan et al. / Chen et al.): accept draft d_i with probability
min(1, p_i(d_i) / q_i(d_i)); on the first rejection, emit a token from norm(max(0, p_i - q_i)) and stop; if all
are accepted, emit a bonus token from p_k. Every emitted token is then distributed exactly as the target's p.
"""

from __future__ import annotations

import torch

from ..config import SamplingParams
from ..sampler import argmax, filter_logits


def accept_greedy(drafts: list[int], target_logits: torch.Tensor, best: list[int] | None = None) -> list[int]:
    """`target_logits` [k+1, V] scored at the last accepted token and each draft (or their argmax ids `best`, where
    the caller took them for a whole batch in one call); returns accepted + bonus."""
    best = argmax(target_logits).tolist() if best is None else best
    out = []
    for i, d in enumerate(drafts):
        if d != best[i]:
            break
        out.append(d)
    out.append(best[len(out)])
    return out


def accept_tree_greedy(tokens: list[int], parents: list[int],
                       target_logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """A verified draft tree, row 0 the root (`parents[r]` < r, -1 for the root and unused rows), `target_logits`
    [W, V] scored at each row: follow the child equal to the target's argmax from the root while there is one.
    Returns the emitted tokens (accepted + bonus) and the rows of the accepted path (root first)."""
    best = argmax(target_logits).tolist()
    children: dict[int, list[int]] = {}
    for r, p in enumerate(parents):
        children.setdefault(p, []).append(r)
    path, out = [0], []
    while True:
        here = path[-1]
        out.append(best[here])
        follow = next((c for c in children.get(here, ()) if tokens[c] == best[here]), None)
        if follow is None:
            return out, path
        path.append(follow)


def accept_sampled(
    drafts: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> list[int]:
    """`draft_probs` [k, V] the distributions the drafts were drawn from, `target_probs` [k+1, V] the target's
    (both over the target vocabulary, after the request's temperature/top-k/top-p); returns accepted + one more."""
    out = []
    for i, d in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        u = torch.rand((), generator=generator).item()
        if q[d] > 0 and u * q[d] <= p[d]:  # u < p/q without dividing by a tiny q
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)
        dist = residual if residual.sum() > 0 else p  # p == q: any token from p is exact
        out.append(int(torch.multinomial(dist / dist.sum(), 1, generator=generator).item()))
        return out
    out.append(int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator).item()))
    return out


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from, row by row: logits [N, V] -> probs [N, V] (fp32)."""
    return torch.stack([filter_logits(row, params).softmax(-1) for row in logits.float()])


def accept(
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    best: list[int] | None = None,
) -> list[int]:
    """Accepted drafts plus the target's own next token, by the rule the request's sampling calls for.

    `draft_probs` None means deterministic drafts (n-gram lookup): a one-hot q. `best`: the rows' argmax ids, if
    the caller has them (greedy only)."""
    if params.greedy:
        return accept_greedy(drafts, target_logits, best)
    if draft_probs is None:
        draft_probs = torch.zeros(len(drafts), target_logits.shape[-1])
        draft_probs[torch.arange(len(drafts)), torch.tensor(drafts, dtype=torch.long)] = 1.0
    return accept_sampled(drafts, draft_probs, sampling_probs(target_logits, params), generator)
