"""EAGLE-3's training-time test: the draft head trained on its own earlier predictions, several steps deep.

Step 0 at index t reads the target's fused features f_t and token t+1 and predicts the target's token at t+2.
Step k at index t reads the head's own step k-1 output state at t and token t+1+k, sits at position t+k, and
predicts the target's token at t+2+k. Its query sees step 0's keys at indices <= t (the real context) and steps
1..k's keys at index t only (its own chain) — exactly what the head sees when it drafts k tokens at serving time.
All steps run through the same `DraftHead.forward` as serving, with a cache that keeps earlier steps' keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optiserve.engine.runner import fold_groups
from optiserve.engine.spec.draft_head import DraftHead

IGNORE = -100
OUT_OF_VOCAB = -1  # a label the draft vocabulary lacks: no loss, but a miss when the head is scored


class StepKeys:
    """Stands in for the KV cache during training: each step appends its keys/values and attends to all so far."""

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, layer: int, positions, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(k.transpose(1, 2))  # [B, KV, T, D]
        self.v.append(v.transpose(1, 2))

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


@dataclass
class PackedBatch:
    """Rows of packed sequences: `tokens`/`labels`/`segments`/`positions` [B, T], `features` [B, T, 3H], and
    optionally the target's top-k next tokens `top_ids` (draft ids, 0 where absent) with `top_probs` [B, T, K]
    (0 where absent, or where the target's token has no draft id).

    `labels` are draft-vocabulary ids (OUT_OF_VOCAB where the target's token has none, IGNORE where there is no
    token to predict); `segments` tell packed sequences apart (-1 = padding)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    segments: torch.Tensor
    positions: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None


def shift_left(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x[:, t + n] at index t (dim 1), `fill` past the end."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


def step_mask(segments: torch.Tensor, step: int, group: int) -> torch.Tensor:
    """Attention mask for step `step` over [step 0 keys | step 1 keys | ...]: [B, 1, G*T, (step+1)*T]."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]  # [B, T, T]
    blocks = [same & (idx[None, :] <= idx[:, None])]  # step 0: causal within the sequence
    blocks += [(idx[None, :] == idx[:, None]).expand(B, T, T)] * step  # later steps: the query's own chain
    return fold_groups(torch.cat(blocks, dim=-1), group)


def ttt_states(head: DraftHead, batch: PackedBatch, steps: int) -> Iterator[torch.Tensor]:
    """The head's output states [B, T, H] at each step k < `steps`; index t of step k predicts token t+2+k."""
    keys = StepKeys()
    hidden = head.fuse(batch.features)  # [B, T, H]
    for k in range(steps):
        tokens = shift_left(batch.tokens, 1 + k, 0)
        mask = step_mask(batch.segments, k, head.attn.n_heads // head.attn.n_kv)
        hidden = head(tokens, hidden, batch.positions + k, keys, mask)
        yield hidden


def step_labels(batch: PackedBatch, k: int) -> torch.Tensor:
    """Step k's draft-vocabulary labels [B, T]: the label of index t+1+k, IGNORE across sequence boundaries."""
    labels = shift_left(batch.labels, 1 + k, IGNORE)
    return labels.masked_fill(shift_left(batch.segments, 1 + k, -1) != batch.segments, IGNORE)


def teacher_cross_entropy(logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j p_j log q(id_j): logits [N, Vd], the target's top-k [N, K] renormalised over the
    draft vocabulary — the teacher's distribution (EAGLE-3 trains on it) instead of its argmax alone."""
    p = top_probs / top_probs.sum(-1, keepdim=True).clamp(min=1e-6)
    return -(p * F.log_softmax(logits.float(), -1).gather(-1, top_ids)).sum(-1).mean()


def ttt_losses(head: DraftHead, batch: PackedBatch, steps: int, teacher_probs: bool = False
               ) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Per step: the loss (cross-entropy against the target's argmax, or against its top-k distribution with
    `teacher_probs` where the batch has it) over the positions whose token the draft vocabulary holds, the correct
    top-1 predictions, and the number of positions scored: every one with a token, so a token outside the draft
    vocabulary counts as a miss (as it is when serving) and heads with different vocabularies compare fairly."""
    soft = teacher_probs and batch.top_ids is not None
    losses, correct, counted = [], [], []
    for k, hidden in enumerate(ttt_states(head, batch, steps)):
        logits = head.logits(hidden)  # [B, T, Vd]
        labels = step_labels(batch, k)
        valid = labels >= 0
        if not valid.any():
            losses.append(logits.sum() * 0)
        elif soft:
            ids, probs = (shift_left(t, 1 + k, 0)[valid] for t in (batch.top_ids, batch.top_probs))  # [N, K]
            losses.append(teacher_cross_entropy(logits[valid], ids, probs))
        else:
            losses.append(F.cross_entropy(logits[valid], labels[valid]))
        correct.append(int((logits[valid].argmax(-1) == labels[valid]).sum()))
        counted.append(int((labels != IGNORE).sum()))
    return losses, correct, counted


def expected_accept_length(step_acc: list[float], draft_len: int) -> float:
    """τ of a `draft_len` chain if step k is accepted with probability step_acc[k] given the earlier ones
    (steps past those trained reuse the last figure): 1 bonus token + sum_j prod_{i<=j} acc_i."""
    tau, run = 1.0, 1.0
    for j in range(draft_len):
        run *= step_acc[min(j, len(step_acc) - 1)]
        tau += run
    return tau
