"""A paged KV cache: one pool of fixed-size blocks per layer, and a block table per running slot.

Each layer's K and V live in a pool [num_blocks, block_size, kv_heads, head_dim]; slot s holds its positions in
the blocks `SlotTables.tables[s]` lists (block i: positions [i * block_size, (i + 1) * block_size)). Blocks come
from one `BlockPool` as a forward writes past a slot's last block and go back when the slot is freed or rolled
back, so memory follows the tokens held, not max_len per slot. A target and its drafter share one `SlotTables`
(the same block ids index both pools), so moving a slot is moving its table: no KV is copied.

The FP8/NVFP4 formats (kv_quant.py) store each token's K/V packed (kv_pools.py): their scales are per layer, and
NVFP4's block scales run along head_dim within one token, so no scale spans positions and a token's stored codes do
not depend on which block holds it. Attention reads the codes in place (ops.decode_attention); SDPA and `read` get
decoded values.
Positions past a slot's length hold stale values; nothing reads them (attention is bounded by positions/masks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .block_manager import BlockPool, BlockTable
from .kv_pools import KVPools
from .kv_quant import KVFormat, KVPages, kv_bytes_per_element


@dataclass
class CacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    max_len: int  # positions one slot may hold
    head_dim: int
    block_size: int = 16  # 0: one block of max_len per slot (the unpaged layout)
    num_blocks: int | None = None  # None: room for every slot at max_len

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_slots, self.num_kv_heads, self.max_len, self.head_dim) < 1:
            raise ValueError(f"cache shape: every size must be >= 1 ({self})")
        if self.block_size < 0:
            raise ValueError("kv block size must be >= 0 (0: one block per sequence)")
        if self.block_size == 0:
            self.block_size = self.max_len
        if self.num_blocks is None:
            self.num_blocks = self.num_slots * -(-self.max_len // self.block_size)
        if self.num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")

    @property
    def elements_per_token(self) -> int:
        """Elements of K and V for one token across all layers (times an element's bytes: the bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def kv_memory_bytes(amount: float, device: torch.device) -> int:
    """`--kv-cache-memory` in bytes: an amount >= 1 is bytes; one in (0, 1) is that fraction of the device's memory
    (a GPU's total memory, the host's physical memory for the CPU), as vLLM's and SGLang's memory fractions count."""
    if amount >= 1:
        return int(amount)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(amount * total)


def blocks_for_memory(nbytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many blocks of `block_size` tokens `nbytes` of KV memory holds (`--kv-cache-memory`)."""
    blocks = nbytes // (block_size * bytes_per_token)
    if blocks < 1:
        raise ValueError(f"--kv-cache-memory {nbytes} bytes holds no block of {block_size} tokens "
                         f"({block_size * bytes_per_token} bytes)")
    return blocks


class SlotTables:
    """Each slot's block table over one BlockPool: what a cache indexes its pool with."""

    def __init__(self, pool: BlockPool, num_slots: int, max_len: int):
        self.pool, self.max_len = pool, max_len
        self.tables = [BlockTable() for _ in range(num_slots)]

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def admit(self, slot: int, prompt: list[int], lookup: bool) -> int:
        """Blocks for a new sequence's prompt in `slot`, cached prefix blocks shared when the pool caches prefixes
        (and `lookup`); returns how many leading prompt tokens are cached (their KV is there already)."""
        self.free(slot)  # anything a caller of the runner left there
        self.tables[slot], cached = self.pool.allocate(prompt, lookup)
        return cached

    def match_prefix(self, slot: int, prompt: list[int], lookup: bool) -> int:
        """`slot` takes only the cached blocks `prompt` starts with (more are reserved chunk by chunk); returns the
        leading tokens they hold. `count_query` once the sequence is admitted."""
        self.free(slot)
        self.tables[slot] = self.pool.match_prefix(prompt, lookup)
        return self.tables[slot].num_keyed * self.block_size

    def count_query(self, slot: int, prompt_len: int) -> None:
        self.pool.count_query(self.tables[slot], prompt_len)

    def fork(self, src: int, dst: int, num_tokens: int) -> list[tuple[int, int]]:
        """`dst` shares `src`'s first `num_tokens` positions (n > 1): full blocks by reference, a partly filled last
        block copied. Returns the (source, destination) blocks whose KV the caller copies (`KVCache.copy_blocks`)."""
        self.free(dst)
        self.tables[dst], copies = self.pool.fork(self.tables[src], num_tokens)
        return copies

    def commit(self, slot: int, tokens: list[int]) -> None:
        """`tokens` have their KV written in `slot`: the full blocks they fill become findable by prefix."""
        self.pool.commit(self.tables[slot], tokens)

    def forget_prefixes(self) -> None:
        """After a weight swap: cached KV was computed by other weights, none of it may be found again."""
        self.pool.forget_all()
        for table in self.tables:
            table.num_keyed = 0

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Blocks for positions [0, num_tokens) of `slot` (raises NoFreeBlocks, taking none, if the pool is short)."""
        self.pool.grow(self.tables[slot], num_tokens)

    def truncate(self, slot: int, num_tokens: int) -> None:
        """Keep the blocks of positions [0, num_tokens); later ones go back to the pool."""
        self.pool.truncate(self.tables[slot], num_tokens)

    def free(self, slot: int) -> None:
        self.pool.free_table(self.tables[slot])

    def move(self, src: int, dst: int) -> None:
        """Slot compaction: `dst` (freed) takes `src`'s blocks."""
        assert not self.tables[dst].blocks, dst
        self.tables[dst], self.tables[src] = self.tables[src], BlockTable()

    def tensor(self, slots: list[int], num_blocks: int, device: torch.device) -> torch.Tensor:
        """The block ids of `slots` (a slot may repeat), num_blocks each, -1 past a table's end: [B, nb]."""
        rows = [self.tables[s].blocks[:num_blocks] for s in slots]
        return torch.tensor([r + [-1] * (num_blocks - len(r)) for r in rows], dtype=torch.long, device=device)


class KVCache:
    """K/V pools [layers, num_blocks, block_size, kv_heads, *] in the cache's format (`pools`) plus the block tables of
    the current forward."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: str | torch.device = "cpu",
                 tables: SlotTables | None = None, prefix_caching: bool = False):
        """`tables`: another cache's, to share (a drafter's); else the cache's own pool, caching prompt prefixes
        for reuse if `prefix_caching`."""
        self.shape = shape
        if tables is None:
            tables = SlotTables(BlockPool(shape.num_blocks, shape.block_size, prefix_caching),
                                shape.num_slots, shape.max_len)
        if (tables.pool.num_blocks, tables.block_size) != (shape.num_blocks, shape.block_size):
            raise ValueError("a cache sharing block tables needs the same number and size of blocks")
        self.tables, self.dtype, self.device = tables, dtype, torch.device(device)
        self.kv = KVFormat()
        self.pools = KVPools(self._dims, dtype, device, self.kv)
        self._table = torch.zeros(1, 1, dtype=torch.long)  # [B, nb] block ids of the current forward
        self._attn_len = 1
        self._index_of: torch.Tensor | None = None  # the `positions` that `_index` was built for
        self._index = torch.empty(0, dtype=torch.long)

    @property
    def _dims(self) -> tuple[int, int, int, int, int]:
        s = self.shape
        return s.num_layers, s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim

    @property
    def k(self) -> torch.Tensor:
        """The key pools [layers, num_blocks, block_size, KV, D] (the format's codes when quantized)."""
        return self.pools.k

    @property
    def v(self) -> torch.Tensor:
        return self.pools.v

    @property
    def nbytes(self) -> int:
        return self.pools.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Resident bytes of one token's K and V across all layers: what the pools hold per token."""
        return self.pools.nbytes // (self.shape.num_blocks * self.shape.block_size)

    @property
    def kv_format(self) -> str:
        return self.kv.name

    @property
    def block_table(self) -> torch.Tensor:
        """The current forward's block ids [B, nb] (-1 past a slot's last block)."""
        return self._table

    def set_format(self, kv: KVFormat) -> None:
        """Quantize K/V as they are written (`fp8`/`nvfp4`, calibrated per layer) or not (`none`). Another storage
        format takes new pools: what the old ones held is gone (a weight swap re-prefills the running sequences)."""
        if kv.name != self.kv.name:
            self.pools = KVPools(self._dims, self.dtype, self.device, kv)
        self.kv = self.pools.kv = kv

    def packed_bytes_per_token(self) -> float:
        """Bytes per token of K and V in the cache's format (block scales included): `bytes_per_token`, as the
        format defines it."""
        return float(self.shape.elements_per_token * kv_bytes_per_element(self.kv.name, self.dtype))

    def begin(self, first_slot: int, lengths: list[int]) -> None:
        """Select slots [first_slot, first_slot + len(lengths)) for the next forward (see `begin_rows`)."""
        self.begin_rows(list(range(first_slot, first_slot + len(lengths))), lengths)

    def begin_rows(self, slots: list[int], lengths: list[int]) -> None:
        """Select the slots of the next forward's rows, row b reading slot slots[b] and touching its cache positions
        [0, lengths[b]): blocks are taken for any of them not yet held (NoFreeBlocks if the pool is short). A slot
        may serve several rows (a ragged batch: one row per token of a prompt chunk)."""
        assert min(slots) >= 0 and max(slots) < self.shape.num_slots, slots
        self._attn_len = max(lengths)
        assert 0 < self._attn_len <= self.shape.max_len, self._attn_len
        for slot, n in zip(slots, lengths, strict=True):
            self.tables.reserve(slot, n)
        num_blocks = -(-self._attn_len // self.shape.block_size)
        self._table = self.tables.tensor(slots, num_blocks, self.k.device)
        self._index_of = None

    def token_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of a layer's pool viewed as [num_blocks * block_size, KV * D] for `positions` [B, S] of the current
        slots: [B * S]. Built once per forward: every layer writes the same places."""
        if positions is not self._index_of:
            bs = self.shape.block_size
            blocks = self._table.gather(1, positions // bs)  # [B, S]
            assert bool((blocks >= 0).all()), "a KV write past the blocks its slot holds"
            self._index = (blocks * bs + positions % bs).flatten()
            self._index_of = positions
        return self._index

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [B, S, KV, D] at `positions` [B, S] of the current slots."""
        self.pools.write(layer, self.token_rows(positions), k, v)

    def pages(self, layer: int) -> tuple[torch.Tensor | KVPages, torch.Tensor | KVPages, torch.Tensor]:
        """This layer's pools [num_blocks, block_size, KV, *] (fp32 tensors, or the packed codes and scales) and the
        current block table [B, nb] (kernel reads)."""
        return *self.pools.pages(layer), self._table

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys/values of the current slots, gathered and decoded: [B, KV, L, D] each (SDPA reads)."""
        return self._gather(layer, True), self._gather(layer, False)

    def _gather(self, layer: int, keys: bool) -> torch.Tensor:
        B, nb = self._table.shape
        # [B, nb, bs, KV, D]; blocks past a slot's end are never attended
        pages = self.pools.decoded(layer, keys, self._table.clamp(min=0))
        return pages.reshape(B, nb * self.shape.block_size, *pages.shape[3:])[:, : self._attn_len].transpose(1, 2)

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [0, length) of one slot, decoded: K and V [layers, length, KV, D] (copies; for tests and tools)."""
        bs, blocks = self.shape.block_size, self.tables.tables[slot].blocks
        index = (torch.tensor([blocks[p // bs] for p in range(length)], dtype=torch.long),
                 torch.tensor([p % bs for p in range(length)], dtype=torch.long))
        return tuple(torch.stack([self.pools.decoded(layer, keys, index) for layer in range(self.shape.num_layers)])
                     for keys in (True, False))

    def _slot_rows(self, slot: int, positions) -> torch.Tensor:
        """Token rows of the pools (viewed [layers, num_blocks * block_size, ...]) for positions of one slot."""
        bs, blocks = self.shape.block_size, self.tables.tables[slot].blocks
        return torch.tensor([blocks[p // bs] * bs + p % bs for p in positions], dtype=torch.long)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks' K/V, every layer (copy-on-write of a forked sequence's partly filled block)."""
        if copies:
            self.pools.copy_blocks(*(list(blocks) for blocks in zip(*copies, strict=True)))

    def truncate(self, slot: int, start: int, end: int | None = None) -> None:
        """Forget positions from `start` on (rollback): the slot's blocks past them go back to the pool. (`end`,
        the last position written, is not needed: stale positions are never read.)"""
        self.tables.truncate(slot, start)

    def keep_path(self, slot: int, start: int, rows: list[int], end: int) -> None:
        """Keep a draft tree's accepted path: the rows at start + rows[i] (ascending, rows[0] == 0) move to start + i,
        and positions from start + len(rows) on are forgotten, as if only the path had been written."""
        moves = [(start + r, start + i) for i, r in enumerate(rows) if r != i]
        if moves:
            self.pools.move(*(self._slot_rows(slot, ps) for ps in zip(*moves, strict=True)))
        self.truncate(slot, start + len(rows), end)
