"""The model runner: builds positions and masks, and runs `prefill` and `decode` steps over the KV cache."""

from __future__ import annotations

import math

import torch

from . import ops
from .kv_cache import CacheShape, KVCache, blocks_for_memory, kv_memory_bytes
from .kv_quant import kv_bytes_per_element
from .model import Transformer
from .tree_attention import TreeMask, ancestor_matrix, dense_tree_mask, depths

# Draft-tree rows per sequence up to which the decode-attention kernel reads the tree mask (config.MAX_TREE_NODES
# keeps trees within it). Decode, verify and prefill rows of any number run in the kernel where it is built: each
# row computed alone, so a verify is bit-identical to decode steps and a prompt prefilled after a cached prefix to
# the same prompt prefilled whole (SDPA rounds a row differently with other query rows beside it; prefill takes
# as long either way).
KERNEL_ROWS = 16


def attention_mask(positions: torch.Tensor, attn_len: int, group: int, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask for queries at `positions` [B, S] over keys [0, attn_len).

    Returns a bool mask [B, 1, G*S, L] matching the model's GQA layout, G query heads per KV head.
    """
    keys = torch.arange(attn_len, device=positions.device)  # [L]
    allowed = keys <= positions.unsqueeze(-1)  # [B, S, L]
    if window is not None:
        allowed &= keys > positions.unsqueeze(-1) - window
    return fold_groups(allowed, group)


def mask_unless_kernel(positions: torch.Tensor, attn_len: int, group: int, window: int | None,
                       kernel: bool) -> torch.Tensor | None:
    """The attention mask for queries at `positions` [B, S] over cached keys, or None where the attention needs
    none: the decode-attention kernel (`kernel`: it runs here) bounds each row itself, and one row without a
    sliding window attends exactly its keys [0, attn_len); elsewhere SDPA takes the mask."""
    B, S = positions.shape
    if kernel or (S == 1 and B == 1 and window is None):
        return None
    return attention_mask(positions, attn_len, group, window)


def fold_groups(allowed: torch.Tensor, group: int) -> torch.Tensor:
    """A per-query mask [B, S, L] in the model's GQA layout [B, 1, G*S, L] (G query heads share a KV head)."""
    B, S, L = allowed.shape
    return allowed[:, None, None].expand(B, 1, group, S, L).reshape(B, 1, group * S, L)


class ModelRunner:
    """Owns the model and its KV cache; every forward goes through here."""

    def __init__(self, model: Transformer, num_slots: int, max_len: int, dtype: torch.dtype, block_size: int = 16,
                 kv_cache_memory: float | None = None, prefix_caching: bool = False, kv_format: str = "none"):
        """`block_size` 0: one block of max_len per slot; `kv_cache_memory` (bytes of K/V stored in `kv_format`, or
        a fraction of the device's memory) sizes the block pool (default: every slot at max_len); `prefix_caching`
        keeps full prompt blocks findable for reuse. The pool keeps its block count when the KV format changes
        later (its bytes follow the format)."""
        self.model = model
        cfg = model.cfg
        self.max_len = max_len
        self.device = model.embed.weight.device
        shape = CacheShape(cfg.num_layers, num_slots, cfg.num_kv_heads, max_len, cfg.head_dim, block_size)
        if kv_cache_memory is not None:
            bytes_per_token = math.ceil(shape.elements_per_token * kv_bytes_per_element(kv_format, dtype))
            nbytes = kv_memory_bytes(kv_cache_memory, self.device)
            shape.num_blocks = blocks_for_memory(nbytes, shape.block_size, bytes_per_token)
        self.cache = KVCache(shape, dtype, self.device, prefix_caching=prefix_caching)
        self.unmasked_decode = ops.decode_attention_available(dtype, self.device)

    def mask_for(self, positions: torch.Tensor, attn_len: int, window: int | None) -> torch.Tensor | None:
        """The attention mask for queries at `positions` [B, S] (None where `mask_unless_kernel` needs none)."""
        return mask_unless_kernel(positions, attn_len, self.model.cfg.group_size, window, self.unmasked_decode)

    def _forward(self, first_slot: int, tokens: torch.Tensor, positions: torch.Tensor,
                 all_logits: bool, capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ([B, S, V] if `all_logits` else [B, V]) and the captured layers' outputs [B, S, n*H] (or None)."""
        lengths = (positions.amax(1) + 1).tolist()  # [B] each row's cache positions, its own included
        self.cache.begin(first_slot, lengths)
        attn_len = max(lengths)
        mask = self.mask_for(positions, attn_len, self.model.cfg.sliding_window)
        x, captured = self.model.hidden_states(tokens, positions, self.cache, mask, capture)
        logits = self.model.logits(x if all_logits else x[:, -1])
        return logits, torch.cat(captured, dim=-1) if captured else None

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_logits: bool = False, start: int = 0) -> torch.Tensor:
        """Process a prompt into `slot`, positions [start, S) (those before `start` are cached already); logits
        [S - start, V] if `all_logits`, else [V] for the last token."""
        return self.prefill_features(slot, token_ids, all_logits, start=start)[0]

    @torch.inference_mode()
    def prefill_features(self, slot: int, token_ids: list[int], all_logits: bool = False,
                         capture: tuple[int, ...] = (), start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`prefill`, also returning the outputs of the `capture` layers at every computed position [S - start,
        n*H]."""
        tokens = torch.tensor([token_ids[start:]], device=self.device)  # [1, S - start]
        positions = torch.arange(start, len(token_ids), device=self.device).unsqueeze(0)
        logits, features = self._forward(slot, tokens, positions, all_logits, capture)
        return logits[0], None if features is None else features[0]

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of the sequences in slots [0, B); returns logits [B, V]."""
        return self.decode_features(last_tokens, positions)[0]

    @torch.inference_mode()
    def decode_features(self, last_tokens: list[int], positions: list[int],
                        capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode`, also returning the outputs of the `capture` layers [B, 1, n*H]."""
        tokens = torch.tensor([[t] for t in last_tokens], device=self.device)  # [B, 1]
        pos = torch.tensor([[p] for p in positions], device=self.device)  # [B, 1]
        return self._forward(0, tokens, pos, all_logits=False, capture=capture)

    @torch.inference_mode()
    def decode_at(self, slot: int, token: int, position: int,
                  capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token for the sequence in `slot` alone (a failed batch retried one by one): logits [1, V] and
        the captured features [1, 1, n*H] (or None)."""
        tokens = torch.tensor([[token]], device=self.device)
        return self._forward(slot, tokens, torch.tensor([[position]], device=self.device), False, capture)

    @torch.inference_mode()
    def forward_rows(self, slots: list[int], tokens: list[int], positions: list[int],
                     logit_rows: list[int]) -> torch.Tensor:
        """A ragged batch, one row per token: row i is `tokens[i]` of the sequence in `slots[i]`, at `positions[i]`,
        so decode rows and prompt chunks of several sequences share one pass over the weights. A sequence's rows
        continue its cache (every row's KV is written before any row attends, and each row attends up to its own
        position). Returns logits [len(logit_rows), V] for the rows listed."""
        tok = torch.tensor(tokens, device=self.device)[:, None]  # [T, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [T, 1]
        lengths = [p + 1 for p in positions]
        self.cache.begin_rows(slots, lengths)
        mask = self.mask_for(pos, max(lengths), self.model.cfg.sliding_window)
        x, _ = self.model.hidden_states(tok, pos, self.cache, mask)  # [T, 1, H]
        return self.model.logits(x[logit_rows, 0])

    @torch.inference_mode()
    def verify(self, tokens: list[list[int]], starts: list[int],
               capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score S tokens per sequence in slots [0, B), row b at positions starts[b] + [0, S), in one forward.

        Returns logits [B, S, V] and captured features [B, S, n*H]; the caller rolls back rejected positions."""
        tok = torch.tensor(tokens, device=self.device)  # [B, S]
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(tok.shape[1], device=self.device)
        return self._forward(0, tok, pos, all_logits=True, capture=capture)

    @torch.inference_mode()
    def verify_tree(self, tokens: list[list[int]], starts: list[int], parents: list[list[int]],
                    capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score a draft tree per sequence in slots [0, B) in one forward: row b's S tokens (root first, `parents`
        listed parents-first, -1 for a root) written at cache indices starts[b] + [0, S), at positions starts[b] +
        their depths, each attending the prefix, its ancestors and itself. Returns logits [B, S, V] and captured
        features [B, S, n*H]; the caller keeps the accepted path (`KVCache.keep_path`)."""
        tok = torch.tensor(tokens, device=self.device)  # [B, S]
        base = torch.tensor(starts, device=self.device)  # [B]
        slots = base[:, None] + torch.arange(tok.shape[1], device=self.device)  # [B, S]
        positions = base[:, None] + torch.tensor([depths(p) for p in parents], device=self.device)  # [B, S]
        lengths = (slots.amax(1) + 1).tolist()  # [B]
        self.cache.begin(0, lengths)
        attn_len = max(lengths)
        ancestors = torch.stack([ancestor_matrix(p) for p in parents]).to(self.device)  # [B, S, S]
        mask = self.tree_mask(slots, base, ancestors, attn_len)
        x, captured = self.model.hidden_states(tok, positions, self.cache, mask, capture)
        return self.model.logits(x), torch.cat(captured, dim=-1) if captured else None

    @torch.inference_mode()
    def verify_ragged(self, tokens: list[list[int]], starts: list[int], parents: list[list[int]],
                      capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`verify_tree` for trees of different sizes (one that drafts nothing: its root alone), one row per node
        and none of padding: at batch 8 a probe that drafts for one sequence verifies 6 + 7 rows, not 8 x 6. Rows
        are sequence 0's nodes, then sequence 1's, ... Returns logits [T, V] and captured features [T, n*H]."""
        width = max(len(t) for t in tokens)
        slots, cache_rows, positions, bases, masks, lengths = [], [], [], [], [], []
        for b, (toks, start, par) in enumerate(zip(tokens, starts, parents, strict=True)):
            n = len(toks)
            # Every row's mask spans `width` cache indices from its base (the kernel's one [T, S, W] layout): a
            # smaller tree's base moves back over its prefix, whose keys it attends in full.
            base = max(0, start + n - width)
            mask = torch.zeros(n, width, dtype=torch.bool)  # [n, W] over cache indices base + [0, W)
            mask[:, : start - base] = True
            mask[:, start - base : start - base + n] = ancestor_matrix(par)
            slots += [b] * n
            cache_rows += range(start, start + n)
            positions += [start + d for d in depths(par)]
            bases += [base] * n
            masks.append(mask)
            lengths += [start + n] * n
        self.cache.begin_rows(slots, lengths)
        tok = torch.tensor(sum(tokens, []), device=self.device)[:, None]  # [T, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [T, 1]
        rows = torch.tensor(cache_rows, device=self.device)[:, None]  # [T, 1]
        mask = self.tree_mask(rows, torch.tensor(bases, device=self.device),
                              torch.cat(masks)[:, None].to(self.device), max(lengths))  # ancestors [T, 1, W]
        x, captured = self.model.hidden_states(tok, pos, self.cache, mask, capture)  # [T, 1, H]
        return self.model.logits(x[:, 0]), torch.cat(captured, dim=-1)[:, 0] if captured else None

    def tree_mask(self, slots: torch.Tensor, base: torch.Tensor, ancestors: torch.Tensor, attn_len: int) -> TreeMask:
        return tree_mask(slots, base, ancestors, attn_len, self.model.cfg.group_size, self.unmasked_decode)


def tree_mask(slots: torch.Tensor, base: torch.Tensor, ancestors: torch.Tensor, attn_len: int, group: int,
              kernel: bool) -> TreeMask:
    """A draft tree's mask: read by the decode-attention kernel (`kernel`, up to KERNEL_ROWS rows), else dense."""
    dense = None
    if not (kernel and slots.shape[1] <= KERNEL_ROWS):
        dense = fold_groups(dense_tree_mask(base, ancestors, attn_len), group)
    return TreeMask(slots, base, ancestors, dense)
