"""Tree attention for speculative decoding: rows of a draft tree share RoPE positions but not cache slots.

A draft tree's nodes at the same depth have the same position (depth-based, as the accepted path will have), so
they are written to distinct cache indices `slots`, and each row attends the cached prefix [0, base) plus its
ancestors and itself (`ancestors` over the T cache indices [base, base + T)). The decode-attention kernel reads
that per-row mask directly; elsewhere SDPA gets the same mask densely (`dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeMask:
    slots: torch.Tensor  # [B, S] cache index each row is written at
    base: torch.Tensor  # [B] first cache index of the tree
    ancestors: torch.Tensor  # [B, S, T] bool: row s attends base + j (itself included)
    dense: torch.Tensor | None = None  # [B, 1, G*S, L] for SDPA; None where the kernel runs

    def __post_init__(self) -> None:
        B, S, _ = self.ancestors.shape
        if self.slots.shape != (B, S) or self.base.shape != (B,):
            raise ValueError(f"tree mask: slots {tuple(self.slots.shape)}, base {tuple(self.base.shape)} for "
                             f"ancestors {tuple(self.ancestors.shape)}")


def dense_tree_mask(base: torch.Tensor, ancestors: torch.Tensor, attn_len: int) -> torch.Tensor:
    """The tree mask as a per-query mask over keys [0, attn_len): [B, S, L] bool."""
    B, S, T = ancestors.shape
    keys = torch.arange(attn_len, device=ancestors.device)
    allowed = (keys < base[:, None, None]).expand(B, S, attn_len).clone()  # the prefix
    tree_keys = (base[:, None] + torch.arange(T, device=ancestors.device))[:, None].expand(B, S, T)
    return allowed.scatter_(2, tree_keys, ancestors)


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """For nodes listed parents-first (parents[i] < i, -1 for a root), [N, N] bool: i attends j (self included)."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (a root's children are at 0) for nodes listed parents-first."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out
