"""Drafters: what proposes tokens for the target to verify. An EAGLE-3 head, or n-gram prompt lookup."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..kv_cache import CacheShape, KVCache, SlotTables
from ..runner import mask_unless_kernel
from ..sampler import argmax
from ..sequence import Sequence
from .draft_head import DraftHead
from .ngram import propose_ngram


@dataclass
class Proposal:
    """Per sequence: draft token ids (target vocabulary) and, for sampled drafts, the distributions they were
    drawn from [k, V] (None: greedy drafts or deterministic lookup); a chain unless `parents` is given."""

    tokens: list[int]
    probs: torch.Tensor | None
    parents: list[int] | None = None  # a draft tree: each token's parent index (-1: the root), parents first


class NgramDrafter:
    """Prompt lookup; needs nothing from the target."""

    capture: tuple[int, ...] = ()

    def __init__(self, k: int):
        self.k = self.max_draft_tokens = k

    def on_prefill(self, seq: Sequence, features: torch.Tensor | None) -> None:
        pass

    def steady(self, seqs: list[Sequence]) -> bool:
        return True  # nothing to catch up on

    def backlog(self, seq: Sequence) -> int:
        return 0

    def read_backlog(self, seqs: list[Sequence]) -> bool:
        return False

    def propose(self, seqs: list[Sequence], num_draft_tokens: int | None = None) -> list[Proposal]:
        k = self.k if num_draft_tokens is None else min(num_draft_tokens, self.k)
        return [Proposal(propose_ngram(s.token_ids, k) if k else [], None) for s in seqs]

    def on_verify(self, seq: Sequence, features: torch.Tensor | None) -> None:
        pass


@dataclass
class EagleState:
    """Target features not yet run through the head (positions draft_len..), as the pieces [m, 3H] they arrived in
    (joined only when the head reads them: steps that draft nothing would otherwise copy the backlog each step),
    the head's cache length, and a tree's last n-gram lookup (match length, tokens, sequence length then) until it is
    scored."""

    pending: list[torch.Tensor]
    draft_len: int = 0
    lookup: tuple[int, list[int], int] | None = None

    def take_pending(self) -> torch.Tensor:
        """The pending features [n, 3H], joined; nothing is pending afterwards."""
        features, self.pending = torch.cat(self.pending), []
        return features


class EagleDrafter:
    """Runs the draft head over its own one-layer KV cache (slots mirror the target's) and drafts a k-token chain."""

    def __init__(self, head: DraftHead, k: int, tables: SlotTables, dtype: torch.dtype):
        self.head, self.k = head, k
        self.max_draft_tokens = k  # what a step may verify per sequence (a tree: its node budget)
        self.capture = head.cfg.target_layers
        c = head.cfg
        shape = CacheShape(1, len(tables.tables), c.num_kv_heads, tables.max_len, c.head_dim, tables.block_size,
                           tables.pool.num_blocks)
        self.cache = KVCache(shape, dtype, tables=tables)  # the target's block tables index the head's pool too
        self.group = c.num_heads // c.num_kv_heads
        # As in the target's runner: one-token steps need no mask when the decode-attention kernel bounds each row.
        self.unmasked_decode = ops.decode_attention_available(dtype, head.norm.weight.device)

    def on_prefill(self, seq: Sequence, features: torch.Tensor | None) -> None:
        """After the target read the prompt (features [S, 3H]): nothing drafted from them yet."""
        seq.draft_state = EagleState([features])

    def on_verify(self, seq: Sequence, features: torch.Tensor | None) -> None:
        """Features [m, 3H] of the positions the target kept: the next proposal reads them first. Appended: a
        proposal that failed part-way (its batch retried without drafts) may have left some unread."""
        state = seq.draft_state
        state.pending = [*state.pending, features]  # a new list: the engine's pre-step copy must not see it

    def steady(self, seqs: list[Sequence]) -> bool:
        """Whether the head has read each sequence's positions up to the last verify's: drafting now costs what
        it costs every step, with no backlog (a prompt, or steps that drafted nothing) to catch up on first."""
        return all(s.draft_state.draft_len > 0 and len(s.draft_state.pending) <= 1 for s in seqs)

    def backlog(self, seq: Sequence) -> int:
        """Positions the head must read before it drafts for `seq`."""
        return sum(len(f) for f in seq.draft_state.pending)

    @torch.inference_mode()
    def read_backlog(self, seqs: list[Sequence]) -> bool:
        """Where a sequence is not steady (a prompt, or steps that drafted nothing), run the head over its pending
        features but the last position (one forward), so that the proposal after it reads one position, as a
        steady step does: the backlog is then timed apart from the step (the policy learns a draft's cost from the
        step, whatever came before it). Whether there was any."""
        behind = [s for s in seqs if not self.steady([s]) and self.backlog(s) > 1]
        if not behind:
            return False
        lasts = []
        for seq in behind:
            features = seq.draft_state.take_pending()  # [n, 3H]
            seq.draft_state.pending = [features[:-1]]
            lasts.append(features[-1:])
        self._catch_up(behind)
        for seq, last in zip(behind, lasts, strict=True):
            seq.draft_state.pending = [last]
        return True

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_draft_tokens: int | None = None) -> list[Proposal]:
        """Catch the head up on the pending features (one forward), then k-1 one-token steps, each sequence in its
        own slot (any of the batch's: a probe drafts for one). `num_draft_tokens` (<= k) shortens the chain."""
        k = self.k if num_draft_tokens is None else min(num_draft_tokens, self.k)
        if k == 0:
            return [Proposal([], None) for _ in seqs]
        h, ends = self._catch_up(seqs)
        logits = self.head.logits(h[:, 0])  # [B, Vd]
        drafted, probs = [], []
        for j in range(k):
            d, q = self._pick(logits, seqs)
            drafted.append(d)
            probs.append(q)
            if j + 1 < k:  # the head embeds target ids, as in training: map the draft id back
                h, logits = self._run(seqs, self.head.d2t[d].unsqueeze(1), h, (ends + j).unsqueeze(1), True)
                logits = logits[:, 0]
        target_ids = self.head.d2t[torch.stack(drafted, dim=1)].tolist()  # [B, k]
        return [Proposal(ids, None if probs[0][b] is None else torch.stack([q[b] for q in probs]))
                for b, ids in enumerate(target_ids)]

    def _catch_up(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head over each sequence's pending features (one forward); returns each row's last output state
        [B, 1, H] (it predicts the first draft) and the positions where drafting continues [B]."""
        states: list[EagleState] = [s.draft_state for s in seqs]
        pending = [st.take_pending() for st in states]  # [n_b, 3H] each
        counts = [len(f) for f in pending]
        S = max(counts)
        tokens = torch.zeros(len(seqs), S, dtype=torch.long)  # token t+1 pairs with the feature at t
        feats = pending[0].new_zeros(len(seqs), S, pending[0].shape[-1])
        for b, (seq, st, n) in enumerate(zip(seqs, states, counts, strict=True)):
            tokens[b, :n] = torch.tensor(seq.token_ids[st.draft_len + 1 : st.draft_len + 1 + n])
            feats[b, :n] = pending[b]
        starts = torch.tensor([st.draft_len for st in states])
        h, _ = self._run(seqs, tokens, self.head.fuse(feats), starts[:, None] + torch.arange(S))  # [B, S, H]
        h = h[torch.arange(len(seqs)), torch.tensor(counts) - 1].unsqueeze(1)  # each row's last real pair
        for st, n in zip(states, counts, strict=True):
            st.draft_len += n
        return h, torch.tensor([st.draft_len for st in states])

    def _run(self, seqs: list[Sequence], tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head over `tokens` [B, S] at `positions` [B, S] in the sequences' slots: output states [B, S, H]
        and (`with_logits`) their draft logits [B, S, Vd]."""
        lengths = (positions.amax(1) + 1).tolist()  # [B]
        self.cache.begin_rows([s.slot for s in seqs], lengths)
        attn_len = max(lengths)
        mask = mask_unless_kernel(positions, attn_len, self.group, None, self.unmasked_decode)
        return self.head.step(tokens, hidden, positions, self.cache, mask, with_logits)

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list]:
        """Draft ids [B]: argmax for greedy requests, else a sample from softmax(logits / T); and for sampled
        rows q over the target vocabulary [V] (rejection sampling needs the exact distribution drawn from)."""
        picks, qs = argmax(logits), []
        V = self.head.cfg.target_vocab_size
        for b, seq in enumerate(seqs):
            if seq.params.greedy:
                qs.append(None)
                continue
            q = (logits[b] / seq.params.temperature).softmax(-1)
            picks[b] = torch.multinomial(q, 1, generator=seq.generator)[0]
            qs.append(torch.zeros(V).index_copy_(0, self.head.d2t, q))
        return picks, qs
