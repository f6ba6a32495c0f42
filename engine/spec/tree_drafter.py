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
an extra branch from the root, sharing the nodes it agrees with, so one verify scores both. Its tokens compete with
the head's for the node budget, ranked by the lookup's accuracy learned online per match length (a 5-token match
that the answer keeps repeating earns a deep branch, a 1-token match rarely a node). Chat answers repeat their
prompt and themselves, where the head is weakest.

Pruned (`min_prob`): only nodes at least that likely are drafted, up to the budget, and no depth is expanded once
its best candidate is below it. The head's cumulative probabilities are calibrated (a node scored p is accepted
about p of the time; README), so a node is worth p tokens against one verify row: where the head is sure the tree
stays full, where it is unsure the step verifies a few rows or decodes plainly, and drafts fewer depths.

Sampled requests get the chain (exact rejection sampling over one path); a batch with any sampled request
drafts chains for all its sequences.
"""

from __future__ import annotations

import math

import torch

from ..kv_cache import SlotTables
from ..runner import tree_mask
from ..sequence import Sequence
from .draft_head import DraftHead
from .drafters import EagleDrafter, EagleState, Proposal
from .ngram import LookupAccuracy, lookup_ngram


class EagleTreeDrafter(EagleDrafter):
    def __init__(self, head: DraftHead, num_steps: int, topk: int, num_draft_tokens: int, tables: SlotTables,
                 dtype: torch.dtype, ngram_branch: bool = False, min_prob: float = 0.0):
        super().__init__(head, num_steps, tables, dtype)
        self.topk, self.num_draft_tokens, self.ngram_branch = topk, num_draft_tokens, ngram_branch
        self.min_score = math.log(min_prob) if min_prob > 0 else -math.inf  # nodes below it are not drafted
        self.max_draft_tokens = num_draft_tokens
        self.lookup_accuracy = LookupAccuracy()

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_draft_tokens: int | None = None) -> list[Proposal]:
        """A draft tree of up to `num_draft_tokens` (<= the configured number) nodes per sequence, in its slot.
        A smaller budget also expands fewer depths: b connected nodes reach depth b at most, and the candidates
        above that depth do not depend on the expansion below it (so the tree is the full expansion's b best)."""
        budget = self.num_draft_tokens if num_draft_tokens is None else min(num_draft_tokens, self.num_draft_tokens)
        if budget == 0 or not all(s.params.greedy for s in seqs):
            return super().propose(seqs, min(budget, self.k))
        h, ends = self._catch_up(seqs)  # [B, 1, H], [B]
        scores, tokens, parents = self._expand(seqs, h, ends, min(self.k, budget))  # candidates [B, N] each
        lookups = [self._lookup(s, budget) if self.ngram_branch else ([], []) for s in seqs]
        return [self._best_subtree(scores[b], tokens[b], parents[b], budget, lookups[b]) for b in range(len(seqs))]

    def _lookup(self, seq: Sequence, k: int) -> tuple[list[int], list[float]]:
        """The n-gram lookup's branch for `seq` (up to k tokens) and its log-probabilities of being right, after
        scoring the sequence's previous lookup against the tokens that followed it."""
        state: EagleState = seq.draft_state
        if state.lookup is not None:
            n, chain, start = state.lookup
            self.lookup_accuracy.observe(n, chain, seq.token_ids[start:])
        n, chain = lookup_ngram(seq.token_ids, k, max_n=LOOKUP_MAX_N)
        state.lookup = (n, chain, len(seq.token_ids)) if chain else None
        return chain, self.lookup_accuracy.log_probs(n, len(chain))

    def _expand(self, seqs: list[Sequence], h: torch.Tensor, ends: torch.Tensor, num_steps: int
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
            if score.max() < self.min_score:
                break  # a child never scores above its parent: nothing deeper is likely enough to draft
            slots = (depth - 1) * K + torch.arange(K)  # this depth's rows, relative to `ends`
            ancestors[:, torch.arange(K), slots] = True  # each row attends itself
            out, logits = self._run_tree(seqs, self.head.d2t[tok], hidden, ends, depth - 1, slots, ancestors)
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

    def _run_tree(self, seqs: list[Sequence], tokens: torch.Tensor, hidden: torch.Tensor, ends: torch.Tensor,
                  depth: int, slots: torch.Tensor, ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over frontier `tokens` [B, K] (target ids) at position ends + depth, rows written at
        ends + slots, attending the prefix [0, ends) and their `ancestors` [B, K, T]: output states [B, K, H] and
        their draft logits [B, K, Vd]."""
        positions = (ends + depth)[:, None].expand_as(tokens)  # [B, K] a tree depth is one position
        write_at = ends[:, None] + slots  # [B, K]
        lengths = (ends + ancestors.shape[-1]).tolist()  # [B] the prefix and the tree slots
        self.cache.begin_rows([s.slot for s in seqs], lengths)
        attn_len = max(lengths)
        mask = tree_mask(write_at, ends, ancestors, attn_len, self.group, self.unmasked_decode)
        return self.head.step(tokens, hidden, positions, self.cache, mask, with_logits=True)

    def _best_subtree(self, scores: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, budget: int,
                      branch: tuple[list[int], list[float]] = ([], [])) -> Proposal:
        """The `budget` likeliest candidates whose parents are kept too (none below `min_score`), parents first, as
        target ids; with a `branch` (tokens, their cumulative log-probabilities) merged in from the root, competing
        for the budget."""
        cand_scores, ids, parent_of = scores.tolist(), self.head.d2t[tokens].tolist(), parents.tolist()
        add_branch(cand_scores, ids, parent_of, *branch)
        kept: set[int] = set()
        for c in sorted(range(len(ids)), key=lambda c: (-cand_scores[c], c)):
            if cand_scores[c] < self.min_score:
                break
            if parent_of[c] < 0 or parent_of[c] in kept:
                kept.add(c)
                if len(kept) == budget:
                    break
        order = sorted(kept)  # candidate ids number parents before children
        index = {c: i for i, c in enumerate(order)}
        return Proposal([ids[c] for c in order], None, [index.get(parent_of[c], -1) for c in order])


# Longer matches predict better, and the lookup's accuracy is learned per match length.
LOOKUP_MAX_N = 5


def add_branch(scores: list[float], ids: list[int], parents: list[int], chain: list[int],
               chain_scores: list[float]) -> None:
    """Merges `chain` (with its cumulative log-probabilities, non-increasing) into the candidates from the root, in
    place: where a candidate with the chain's next token hangs from the current one, the chain follows it (its
    score becomes the likelier of the two); else it adds a candidate. A candidate never scores above its parent, so
    the budget's best stay a connected subtree."""
    at = -1
    for token, score in zip(chain, chain_scores, strict=True):
        same = next((c for c, (t, p) in enumerate(zip(ids, parents, strict=True)) if p == at and t == token), None)
        if same is None:
            ids.append(token)
            parents.append(at)
            scores.append(score)
            at = len(ids) - 1
        else:
            scores[same] = max(scores[same], score)
            at = same
