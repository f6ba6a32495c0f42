"""EAGLE-2's dynamic draft tree over the EAGLE-3 head.

From the root (the head's state after the last accepted token), each of `num_steps` depths expands the top-k
children of every frontier node by cumulative log-probability and keeps the k best as the next frontier: one
batched head forward per depth over the frontier, each node attending the head's cached prefix and its own
ancestors (a tree mask), written at its own slot of the head's cache. Of all candidates, the best
`num_draft_tokens` by cumulative log-probability form the tree the target verifies; since a child never scores
above its parent, they are a connected subtree. The head's tree slots are scratch: after verification the head
re-reads the accepted positions with the target's features (as the chain does), so nothing in its cache needs
compacting.

Beyond EAGLE (`ngram_branch`): the n-gram lookup's continuation (engine/spec/ngram.py) enters the same tree as
an extra branch from the root, sharing the nodes it agrees with, so one verify scores both; it takes at most half
the node budget, the head's best nodes the rest. Chat answers repeat their prompt, where the head is weakest.

Sampled requests get the chain (exact rejection sampling over one path); a batch with any sampled request
drafts chains for all its sequences.
"""

from __future__ import annotations

import torch

from ..kv_cache import SlotTables
from ..runner import tree_mask
from ..sequence import Sequence
from .draft_head import DraftHead
from .drafters import EagleDrafter, Proposal
from .ngram import propose_ngram


class EagleTreeDrafter(EagleDrafter):
    def __init__(self, head: DraftHead, num_steps: int, topk: int, num_draft_tokens: int, tables: SlotTables,
                 dtype: torch.dtype, ngram_branch: bool = False):
        super().__init__(head, num_steps, tables, dtype)
        self.topk, self.num_draft_tokens, self.ngram_branch = topk, num_draft_tokens, ngram_branch
        self.max_draft_tokens = num_draft_tokens

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_draft_tokens: int | None = None) -> list[Proposal]:
        """A draft tree of up to `num_draft_tokens` (<= the configured number) nodes per sequence in slots [0, B).
        A smaller budget also expands fewer depths: b connected nodes reach depth b at most, and the candidates
        above that depth do not depend on the expansion below it (so the tree is the full expansion's b best)."""
        budget = self.num_draft_tokens if num_draft_tokens is None else min(num_draft_tokens, self.num_draft_tokens)
        if budget == 0 or not all(s.params.greedy for s in seqs):
            return super().propose(seqs, min(budget, self.k))
        h, ends = self._catch_up(seqs)  # [B, 1, H], [B]
        scores, tokens, parents = self._expand(h, ends, min(self.k, budget))  # candidates [B, N] each
        lookups = [propose_ngram(s.token_ids, min(self.k, budget // 2)) if self.ngram_branch else [] for s in seqs]
        return [with_branch(self._best_subtree(scores[b], tokens[b], parents[b], budget - len(lookups[b])),
                            lookups[b]) for b in range(len(seqs))]

    def _expand(self, h: torch.Tensor, ends: torch.Tensor, num_steps: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All candidate nodes of `num_steps` depths: cumulative log-probs, draft ids and parent candidate ids (-1:
        root), [B, N] each, numbered so that a parent comes before its children."""
        B, K, H = h.shape[0], self.topk, h.shape[-1]
        score, tok = self.head.logits(h[:, 0]).log_softmax(-1).topk(K, -1)  # [B, K]
        cand_score, cand_tok, cand_parent = [score], [tok], [torch.full((B, K), -1)]
        frontier = torch.arange(K).expand(B, K)  # candidate ids of the frontier nodes
        hidden = h.expand(B, K, H).contiguous()  # the state each frontier node reads: its parent's output
        ancestors = torch.zeros(B, K, num_steps * K, dtype=torch.bool)  # over the head cache's tree slots
        num_cand = K
        for depth in range(1, num_steps):
            slots = (depth - 1) * K + torch.arange(K)  # this depth's rows, relative to `ends`
            ancestors[:, torch.arange(K), slots] = True  # each row attends itself
            out, logits = self._run_tree(self.head.d2t[tok], hidden, ends, depth - 1, slots, ancestors)
            child_score, child_tok = logits.log_softmax(-1).topk(K, -1)  # [B, K, K]
            child_score = (score[..., None] + child_score).flatten(1)  # [B, K*K] cumulative
            child_tok = child_tok.flatten(1)
            cand_score.append(child_score)
            cand_tok.append(child_tok)
            cand_parent.append(frontier.repeat_interleave(K, dim=1))
            best = child_score.topk(K, -1).indices  # [B, K] the next frontier, among the K*K children
            parent_row = best // K
            frontier, score, tok = num_cand + best, child_score.gather(1, best), child_tok.gather(1, best)
            hidden = out.gather(1, parent_row[..., None].expand(B, K, H))
            ancestors = ancestors.gather(1, parent_row[..., None].expand_as(ancestors))
            num_cand += K * K
        return torch.cat(cand_score, 1), torch.cat(cand_tok, 1), torch.cat(cand_parent, 1)

    def _run_tree(self, tokens: torch.Tensor, hidden: torch.Tensor, ends: torch.Tensor, depth: int,
                  slots: torch.Tensor, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over frontier `tokens` [B, K] (target ids) at position ends + depth, rows written at
        ends + slots, attending the prefix [0, ends) and their `ancestors` [B, K, T]: output states [B, K, H] and
        their draft logits [B, K, Vd]."""
        positions = (ends + depth)[:, None].expand_as(tokens)  # [B, K] a tree depth is one position
        write_at = ends[:, None] + slots  # [B, K]
        lengths = (ends + ancestors.shape[-1]).tolist()  # [B] the prefix and the tree slots
        self.cache.begin(0, lengths)
        attn_len = max(lengths)
        mask = tree_mask(write_at, ends, ancestors, attn_len, self.group, self.unmasked_decode)
        return self.head.step(tokens, hidden, positions, self.cache, mask, with_logits=True)

    def _best_subtree(self, scores: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                      budget: int) -> Proposal:
        """The `budget` best candidates whose parents are kept too, parents first, as target ids."""
        parent_of = parents.tolist()
        kept: set[int] = set()
        for c in sorted(range(len(parent_of)), key=lambda c: (-scores[c].item(), c)):
            if parent_of[c] < 0 or parent_of[c] in kept:
                kept.add(c)
                if len(kept) == budget:
                    break
        order = sorted(kept)  # candidate ids number parents before children
        index = {c: i for i, c in enumerate(order)}
        ids = self.head.d2t[tokens[order]].tolist()
        return Proposal(ids, None, [index.get(parent_of[c], -1) for c in order])


def with_branch(tree: Proposal, chain: list[int]) -> Proposal:
    """`tree` with `chain` merged in from the root: where a node with the chain's next token already hangs from the
    current one, the chain follows it; else it adds a node (so parents still come first)."""
    tokens, parents = list(tree.tokens), list(tree.parents or [])
    at = -1
    for token in chain:
        same = [i for i, (t, p) in enumerate(zip(tokens, parents, strict=True)) if p == at and t == token]
        if same:
            at = same[0]
        else:
            tokens.append(token)
            parents.append(at)
            at = len(tokens) - 1
    return Proposal(tokens, None, parents)
