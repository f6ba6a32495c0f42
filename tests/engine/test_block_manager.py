"""Paged KV accounting (engine/block_manager.py): allocation, prefix reuse, LRU eviction, rollback, fork."""

import pytest

from optiserve.engine.block_manager import BlockPool, NoFreeBlocks

BS = 4


def used(pool: BlockPool) -> int:
    return pool.num_blocks - pool.num_free


def test_blocks_follow_the_tokens_and_return_to_zero():
    pool = BlockPool(8, BS)
    table, cached = pool.allocate(list(range(10)))  # 10 tokens: 3 blocks
    assert cached == 0 and len(table.blocks) == 3 and used(pool) == 3
    pool.grow(table, 13)
    assert len(table.blocks) == 4
    pool.free_table(table)
    assert used(pool) == 0 and pool.usage == 0.0


def test_a_shared_prefix_is_reused_and_counted():
    pool = BlockPool(16, BS)
    system = list(range(100, 112))  # three full blocks
    first, cached = pool.allocate(system + [1, 2])
    assert cached == 0
    pool.commit(first, system + [1, 2])
    second, cached = pool.allocate(system + [7, 8, 9])
    assert cached == 12 and second.blocks[:3] == first.blocks[:3]
    assert [pool.blocks[b].ref_count for b in first.blocks[:3]] == [2, 2, 2]
    assert (pool.stats.queries, pool.stats.hits) == (14 + 15, 12)
    pool.free_table(first)
    pool.free_table(second)
    assert used(pool) == 0


def test_a_whole_cached_prompt_still_computes_its_last_token():
    pool = BlockPool(8, BS)
    prompt = list(range(8))
    table, _ = pool.allocate(prompt)
    pool.commit(table, prompt)
    pool.free_table(table)
    again, cached = pool.allocate(prompt)
    assert cached == 4  # the second block holds the last token: recomputed in a block of its own
    assert len(again.blocks) == 2


def test_a_different_prefix_never_hits():
    pool = BlockPool(8, BS)
    a, _ = pool.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    pool.commit(a, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _, cached = pool.allocate([0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert cached == 0


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(5, BS)
    old, _ = pool.allocate([1, 1, 1, 1, 9])
    pool.commit(old, [1, 1, 1, 1, 9])
    pool.free_table(old)
    recent, _ = pool.allocate([2, 2, 2, 2, 9])
    pool.commit(recent, [2, 2, 2, 2, 9])
    pool.free_table(recent)
    filler, _ = pool.allocate(list(range(9)))  # 3 of 5 blocks: the never-used one, then the oldest freed
    assert pool.allocate([2, 2, 2, 2, 5])[1] == 4
    pool.free_table(filler)
    assert pool.allocate([1, 1, 1, 1, 5])[1] == 0  # evicted


def test_rollback_frees_draft_blocks_but_not_committed_ones():
    pool = BlockPool(8, BS)
    table, _ = pool.allocate(list(range(5)))
    pool.commit(table, list(range(5)))
    pool.grow(table, 11)  # drafts up to position 10
    assert len(table.blocks) == 3
    pool.truncate(table, 6)
    assert len(table.blocks) == 2 and used(pool) == 2
    with pytest.raises(ValueError):
        pool.truncate(table, 3)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    pool = BlockPool(8, BS)
    parent, _ = pool.allocate(list(range(6)))
    child, copies = pool.fork(parent, 6)
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert copies == [(parent.blocks[1], child.blocks[1])]
    pool.free_table(parent)
    pool.free_table(child)
    assert used(pool) == 0


def test_out_of_blocks_is_all_or_nothing():
    pool = BlockPool(3, BS)
    table, _ = pool.allocate(list(range(8)))
    with pytest.raises(NoFreeBlocks):
        pool.allocate(list(range(100, 109)))  # needs 3, 1 free
    assert used(pool) == 2
    with pytest.raises(NoFreeBlocks):
        pool.grow(table, 13)
    assert len(table.blocks) == 2


@pytest.mark.parametrize("seed", range(20))
def test_random_lives_keep_counts_exact(seed):
    """Random allocate / grow / commit / rollback / fork / free: every block's count equals the tables holding
    it, the free list is exactly the unreferenced blocks, and everything returns at the end."""
    import random

    rng = random.Random(seed)
    pool = BlockPool(24, BS)
    live: list[tuple[object, list[int]]] = []
    for _ in range(200):
        op = rng.random()
        try:
            if op < 0.3 or not live:
                prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]  # tiny vocabulary: many hits
                live.append((pool.allocate(prompt)[0], prompt))
            elif op < 0.6:
                table, tokens = rng.choice(live)
                new = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
                pool.grow(table, len(tokens) + len(new) + 2)  # two speculative positions past the end...
                tokens.extend(new)
                pool.truncate(table, len(tokens))  # ...rolled back
                pool.commit(table, tokens)
            elif op < 0.75:
                table, tokens = rng.choice(live)
                live.append((pool.fork(table, len(tokens))[0], list(tokens)))
            else:
                pool.free_table(live.pop(rng.randrange(len(live)))[0])
        except NoFreeBlocks:
            pass
        held = [b for table, _ in live for b in table.blocks]
        assert all(pool.blocks[i].ref_count == held.count(i) for i in range(pool.num_blocks))
        assert set(pool.free) == {i for i in range(pool.num_blocks) if i not in held}
    for table, _ in live:
        pool.free_table(table)
    assert pool.num_free == pool.num_blocks
