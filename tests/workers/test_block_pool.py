"""Tests of pdserve.workers.block_pool: reference counts, the LRU free queue, the cached map, KV events."""

from __future__ import annotations

import random

import pytest

from pdserve.workers.block_pool import Block, BlockPool, FreeBlockQueue
from pdserve.workers.errors import OutOfBlocksError
from pdserve.workers.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    pack_tokens,
    unpack_tokens,
)

BS = 4


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def toks(i: int) -> bytes:
    return pack_tokens(tuple(range(i * BS, (i + 1) * BS)))


def cache(pool: BlockPool, blocks: list[Block], first: int, parent: bytes | None = None) -> None:
    pool.cache_full_blocks(blocks, [h(first + i) for i in range(len(blocks))],
                           [toks(first + i) for i in range(len(blocks))], parent)


def test_free_queue_is_fifo_with_o1_removal_from_the_middle():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.append(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4, 2] and q.size == 5
    assert q.popleft() is blocks[0]
    with pytest.raises(AssertionError):
        q.remove(blocks[0])  # not in the queue any more
    for _ in range(4):
        q.popleft()
    with pytest.raises(OutOfBlocksError):
        q.popleft()
    assert q.size == 0 and list(q) == []


def test_allocate_and_free_keep_counts_and_reject_double_free():
    pool = BlockPool(8, BS)
    a = pool.allocate(3)
    assert [b.ref_count for b in a] == [1, 1, 1] and pool.num_free == 5
    with pytest.raises(OutOfBlocksError) as e:
        pool.allocate(6)
    assert (e.value.needed, e.value.free) == (6, 5)
    assert pool.num_free == 5  # a failed allocation takes nothing
    pool.touch(a[0])
    pool.free(a)
    assert a[0].ref_count == 1 and pool.num_free == 7
    pool.free([a[0]])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([a[0]])
    pool.check_integrity()
    assert pool.num_free == 8


def test_freed_cached_blocks_are_evicted_in_lru_order():
    pool = BlockPool(6, BS)
    a, b, c = pool.allocate(2), pool.allocate(2), pool.allocate(2)
    cache(pool, a, 0)
    cache(pool, b, 10)
    cache(pool, c, 20)
    pool.take_events()
    pool.free(a[::-1])  # tail first, as the block manager frees a sequence
    pool.free(c[::-1])
    pool.free(b[::-1])
    pool.check_integrity()
    assert [x.block_id for x in pool.free_queue] == [a[1].block_id, a[0].block_id, c[1].block_id,
                                                     c[0].block_id, b[1].block_id, b[0].block_id]
    # A hit on b's head takes it out of the queue: it survives the evictions below.
    assert pool.lookup(h(10), toks(10)) is b[0]
    pool.touch(b[0])
    got = pool.allocate(4)
    assert got == [a[1], a[0], c[1], c[0]]
    batch = pool.take_events()
    assert batch is not None and batch.events == (BlockRemoved((h(1), h(0), h(21), h(20))),)
    assert pool.cached_hashes() == {h(10), h(11)}
    assert pool.num_evictions == 4
    for x in got:  # reused blocks carry nothing of their previous content
        assert x.block_hash is None and x.tokens is None
    pool.check_integrity()


def test_lookup_verifies_token_ids_so_a_hash_collision_is_not_a_hit():
    pool = BlockPool(4, BS)
    (blk,) = pool.allocate(1)
    cache(pool, [blk], 0)
    assert pool.lookup(h(0), toks(0)) is blk
    assert pool.lookup(h(0), toks(1)) is None  # same hash, other tokens
    assert pool.lookup(h(99), toks(0)) is None


def test_a_second_block_with_cached_content_stays_private():
    pool = BlockPool(4, BS)
    x, y = pool.allocate(2)
    cache(pool, [x], 0)
    pool.take_events()
    cache(pool, [y], 0)
    assert y.block_hash is None and pool.lookup(h(0), toks(0)) is x
    assert pool.take_events() is None  # nothing new was stored
    pool.free([y, x])
    pool.check_integrity()
    assert y.block_hash is None and x.block_hash == h(0)


def test_caching_disabled_stores_nothing_and_resets_on_free():
    pool = BlockPool(4, BS, enable_caching=False)
    blocks = pool.allocate(2)
    cache(pool, blocks, 0)
    assert pool.cached_hashes() == set() and pool.take_events() is None
    pool.free(blocks)
    pool.check_integrity()


def test_kv_events_carry_chain_parents_tokens_and_increasing_seq_numbers():
    pool = BlockPool(4, BS, worker_id="w7")
    assert pool.take_events() is None and pool.event_seq == 0  # an empty drain uses no number
    blocks = pool.allocate(3)
    cache(pool, blocks[:1], 0)
    cache(pool, blocks[1:], 1, parent=h(0))
    b1 = pool.take_events()
    assert b1 is not None and (b1.worker_id, b1.seq) == ("w7", 1)
    assert b1.events == (BlockStored((h(0),), None, toks(0), BS),
                         BlockStored((h(1), h(2)), h(0), toks(1) + toks(2), BS))
    assert b1.events[1].token_ids == unpack_tokens(toks(1) + toks(2))
    assert not pool.reset_prefix_cache()  # blocks in use: refused, no event
    pool.free(blocks[::-1])
    pool.allocate(2)  # evicts the free queue's head: the never-used block, then block 2's
    b2 = pool.take_events()
    assert b2 is not None and b2.seq == 2 and b2.events == (BlockRemoved((h(2),)),)
    pool.free([pool.blocks[i] for i in range(4) if pool.blocks[i].ref_count])
    assert pool.reset_prefix_cache()
    b3 = pool.take_events()
    assert b3 is not None and b3.seq == 3 and b3.events == (AllBlocksCleared(),)
    assert pool.cached_hashes() == set() and pool.take_events() is None and pool.event_seq == 3
    pool.check_integrity()


def test_events_nobody_takes_stay_bounded_and_leave_a_gap(monkeypatch):
    """An offline engine never takes its events: the queue is dropped past its cap, and the
    sequence number skips one so a late consumer sees a gap (and resyncs)."""
    from pdserve.workers import block_pool

    monkeypatch.setattr(block_pool, "MAX_PENDING_EVENTS", 3)
    pool = BlockPool(8, BS)
    blocks = pool.allocate(5)
    for i, b in enumerate(blocks):
        cache(pool, [b], i, parent=h(i - 1) if i else None)
    assert len(pool._events) <= 3 and pool.num_dropped_events == 1
    batch = pool.take_events()
    assert batch is not None and batch.seq == 2  # 1 was skipped: a gap for the consumer
    assert batch.events == (BlockStored((h(4),), h(3), toks(4), BS),)
    # a drop with nothing queued after it is reported at the next take all the same
    monkeypatch.setattr(block_pool, "MAX_PENDING_EVENTS", 2)  # the third event drops them
    more = pool.allocate(3)
    for i, b in enumerate(more):
        cache(pool, [b], 10 + i, parent=h(9 + i) if i else None)
    assert pool._events == [] and pool.num_dropped_events == 2
    gap = pool.take_events()
    assert gap is not None and gap.seq == 4 and gap.events == ()  # 3 was dropped
    assert pool.take_events() is None
    pool.check_integrity()


def test_events_are_kept_only_from_the_first_take_when_asked():
    """keep_events=False (an engine): no event is made before a consumer's first take; what
    was skipped shows as a gap, so a PrefixIndex resyncs and then follows the events."""
    from pdserve.cluster.prefix_index import PrefixIndex

    pool = BlockPool(8, BS, worker_id="w", keep_events=False)
    blocks = pool.allocate(2)
    cache(pool, blocks, 0)
    pool.free(blocks[::-1])
    pool.allocate(7)  # evicts one cached block
    assert pool._events == [] and pool.event_seq == 0
    # skipped events: the first take carries the gap at once, with no event in it
    first = pool.take_events()
    assert first is not None and first.seq == 2 and first.events == ()
    index = PrefixIndex()
    res = index.apply(first)
    assert res.needs_resync and not res.applied  # the consumer saw the gap
    index.resync("w", pool.cached_hashes(), pool.event_seq)
    assert pool.take_events() is None  # the gap is reported once
    pool.free([b for b in pool.blocks if b.ref_count])
    pool.allocate(8)  # evicts the other: now an event
    batch = pool.take_events()
    assert batch is not None and batch.seq == 3 and batch.events == (BlockRemoved((h(0),)),)
    assert index.apply(batch).applied
    pool.free(pool.blocks[:1])
    cache(pool, pool.allocate(1), 5)
    assert index.apply(pool.take_events()).applied
    assert index.snapshot("w") == pool.cached_hashes() == {h(5)}
    # nothing skipped before the first take: no gap
    quiet = BlockPool(4, BS, keep_events=False)
    assert quiet.take_events() is None and quiet.event_seq == 0
    cache(quiet, quiet.allocate(1), 0)
    assert quiet.take_events().seq == 1
    pool.check_integrity()


def test_randomized_pool_operations_keep_invariants_and_event_mirror():
    """Random allocate / touch / free / cache / reset; the events replayed give the cached set."""
    rng = random.Random(0)
    pool = BlockPool(16, BS)
    held: list[Block] = []  # one entry per reference we own
    mirror: set[bytes] = set()
    last_seq = 0
    next_hash = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 4)
            if n <= pool.num_free:
                held.extend(pool.allocate(n))
            else:
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(n)
        elif op < 0.55 and held:
            b = held.pop(rng.randrange(len(held)))
            pool.free([b])
        elif op < 0.7:
            # a prefix hit: any cached block, in use or not
            if pool.cached:
                hsh = rng.choice(sorted(pool.cached))
                b = pool.lookup(hsh, pool.cached[hsh].tokens)
                assert b is not None
                pool.touch(b)
                held.append(b)
        elif op < 0.9 and held:
            b = rng.choice(held)
            if b.block_hash is None:
                next_hash += 1
                pool.cache_full_blocks([b], [h(next_hash)], [toks(next_hash)], None)
        elif op < 0.92 and not held:
            assert pool.reset_prefix_cache()
        batch = pool.take_events()
        if batch is not None:
            assert batch.seq == last_seq + 1
            last_seq = batch.seq
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    mirror.update(ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    assert set(ev.block_hashes) <= mirror
                    mirror.difference_update(ev.block_hashes)
                else:
                    mirror.clear()
        pool.check_integrity()
        assert mirror == pool.cached_hashes()
        assert pool.num_free == sum(1 for b in pool.blocks if b.ref_count == 0)
    pool.free(held)
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks
