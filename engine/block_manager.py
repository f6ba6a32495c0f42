"""Paged KV bookkeeping: fixed-size blocks from one pool, per-sequence block tables, prefix reuse by content.

A sequence's KV lives in `BlockTable.blocks` (block i holds its positions [i * block_size, (i + 1) * block_size)).
A block that is full and committed (its tokens accepted, not speculative) gets a key: a hash chained over every
block before it, so equal keys mean equal prefixes. A new sequence whose prompt starts with keyed blocks shares
them (reference counts) instead of prefilling them again. Blocks whose count drops to 0 keep their key and go to
the end of the free list; allocation takes from the front, so the least recently freed cached block is evicted
first (LRU). This module only does the accounting; the KV tensors are indexed by block id elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

NO_PARENT = 0  # the chain's seed: the key "before" a sequence's first block


def chain_key(parent: int, tokens: tuple[int, ...]) -> int:
    """A block's key: its tokens and (through `parent`) every token before it."""
    return hash((parent, tokens))


class NoFreeBlocks(RuntimeError):
    """The pool cannot give the blocks asked for (the caller preempts or keeps the request waiting)."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # set once the block is full and committed
    parent: int = NO_PARENT  # the key of the block before it; with `tokens`, what a hash hit is confirmed against
    tokens: tuple[int, ...] = ()


@dataclass
class BlockTable:
    """One sequence's blocks in position order; `num_keyed` leading blocks are registered for reuse."""

    blocks: list[int] = field(default_factory=list)
    num_keyed: int = 0


@dataclass
class PrefixStats:
    """vLLM's counters: prompt tokens looked up, and those found cached."""

    queries: int = 0
    hits: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.by_key: dict[int, int] = {}
        self.stats = PrefixStats()

    # ---- sizes ----------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some sequence (`kv_cache_usage_perc`)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- a sequence's life ------------------------------------------------------------------------------
    def allocate(self, prompt: list[int], lookup: bool = True) -> tuple[BlockTable, int]:
        """Blocks for a new sequence's whole prompt (see `match_prefix`); returns its table and how many leading
        tokens are already cached."""
        table = self.match_prefix(prompt, lookup)
        try:
            self.grow(table, len(prompt))
        except NoFreeBlocks:
            self.free_table(table)
            raise
        return table, self.count_query(table, len(prompt))

    def match_prefix(self, prompt: list[int], lookup: bool = True) -> BlockTable:
        """A new sequence's table holding the cached blocks its prompt starts with (shared, not copied); they cover
        a multiple of block_size tokens, always < len(prompt): the last token is computed for its logits. `lookup`
        False finds none (e.g. the prompt's logprobs are wanted)."""
        table, parent = BlockTable(), NO_PARENT
        cacheable = (len(prompt) - 1) // self.block_size if self.prefix_caching and lookup else 0
        for i in range(cacheable):
            tokens = tuple(prompt[i * self.block_size : (i + 1) * self.block_size])
            block_id = self._lookup(parent, tokens)
            if block_id is None:
                break
            self._take(block_id)
            table.blocks.append(block_id)
            parent = self.blocks[block_id].key
        table.num_keyed = len(table.blocks)
        return table

    def count_query(self, table: BlockTable, prompt_len: int) -> int:
        """Count an admitted prompt in the prefix-cache stats (only while prefix caching is on, as vLLM records
        them); returns its cached tokens."""
        cached = table.num_keyed * self.block_size
        if self.prefix_caching:
            self.stats.queries += prompt_len
            self.stats.hits += cached
        return cached

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make room for `num_tokens` positions (fresh blocks at the end); all or nothing."""
        needed = self.blocks_for(num_tokens) - len(table.blocks)
        if needed > self.num_free:
            raise NoFreeBlocks(f"{needed} blocks needed, {self.num_free} free")
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._forget(block_id)
            self._take(block_id)
            table.blocks.append(block_id)

    def commit(self, table: BlockTable, tokens: list[int]) -> None:
        """`tokens` are the sequence's committed tokens so far: key every block they fill (reusable from now)."""
        if not self.prefix_caching:
            return
        parent = self.blocks[table.blocks[table.num_keyed - 1]].key if table.num_keyed else NO_PARENT
        for i in range(table.num_keyed, len(tokens) // self.block_size):
            block = self.blocks[table.blocks[i]]
            block.parent, block.tokens = parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block.key = chain_key(parent, block.tokens)
            self.by_key.setdefault(block.key, block.block_id)  # an equal block already keyed stays the one found
            parent = block.key
            table.num_keyed = i + 1

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep positions [0, num_tokens) (speculative rollback); blocks past them go back to the pool."""
        if num_tokens < table.num_keyed * self.block_size:
            raise ValueError("cannot roll back into committed blocks")
        keep = self.blocks_for(num_tokens)
        while len(table.blocks) > keep:
            self._release(table.blocks.pop())

    def fork(self, table: BlockTable, num_tokens: int) -> tuple[BlockTable, list[tuple[int, int]]]:
        """A second sequence with the same `num_tokens` positions (n > 1): full blocks are shared, a partly
        filled last block is copied. Returns the new table and the (source, destination) block copies to make."""
        full = num_tokens // self.block_size
        child = BlockTable(list(table.blocks[:full]), min(table.num_keyed, full))
        for block_id in child.blocks:
            self.blocks[block_id].ref_count += 1
        try:
            self.grow(child, num_tokens)
        except NoFreeBlocks:
            self.free_table(child)
            raise
        copies = [(table.blocks[full], child.blocks[full])] if num_tokens % self.block_size else []
        return child, copies

    def forget_all(self) -> None:
        """No block's content is findable any more (the weights that computed it are gone); tables holding keyed
        blocks must reset their `num_keyed` too."""
        for block in self.blocks:
            block.key, block.parent, block.tokens = None, NO_PARENT, ()
        self.by_key.clear()

    def free_table(self, table: BlockTable) -> None:
        """A finished (or preempted) sequence: its blocks go back, keyed ones stay findable until evicted."""
        for block_id in reversed(table.blocks):  # the tail is freed first, so it is evicted before the prefix
            self._release(block_id)
        table.blocks.clear()
        table.num_keyed = 0

    # ---- blocks ---------------------------------------------------------------------------------------
    def _lookup(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.by_key.get(chain_key(parent, tokens))
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block_id if (block.parent, block.tokens) == (parent, tokens) else None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None

    def _forget(self, block_id: int) -> None:
        """A free block about to hold new tokens: its old content is no longer findable."""
        block = self.blocks[block_id]
        if block.key is not None and self.by_key.get(block.key) == block_id:
            del self.by_key[block.key]
        block.key, block.parent, block.tokens = None, NO_PARENT, ()
