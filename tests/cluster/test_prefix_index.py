"""Tests of the global prefix-cache index (cluster/prefix_index.py) and its Ray actor shell."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from pdserve.cluster.prefix_index import ApplyResult, PrefixIndex
from pdserve.workers.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    pack_tokens,
)

BLOCK_SIZE = 4


def chain(tokens: Sequence[int], parent: bytes | None = None) -> list[bytes]:
    """Chained 16-byte hashes, one block per token (the token stands for a whole block)."""
    out = []
    for t in tokens:
        h = hashlib.blake2b((parent or b"") + t.to_bytes(4, "little"), digest_size=16).digest()
        out.append(h)
        parent = h
    return out


def stored(hashes: Sequence[bytes], parent: bytes | None = None) -> BlockStored:
    tokens = pack_tokens(range(len(hashes) * BLOCK_SIZE))
    return BlockStored(tuple(hashes), parent, tokens, BLOCK_SIZE)


def batch(worker: str, seq: int, *events: KVEvent) -> KVEventBatch:
    return KVEventBatch(worker, seq, tuple(events))


A = chain([1, 2, 3, 4])  # prompt A, four blocks
B = chain([1, 2, 7, 8])  # shares A's first two blocks


# ---- ordering, gaps, duplicates ------------------------------------------------------------


def test_apply_in_order_and_duplicates_are_idempotent() -> None:
    idx = PrefixIndex()
    assert idx.apply(batch("w0", 1, stored(A[:2]))) == ApplyResult(True, False, 2)
    assert idx.apply(batch("w0", 2, stored(A[2:], A[1]))) == ApplyResult(True, False, 3)
    # Re-delivery of seq 1 (even with different content) changes nothing.
    assert idx.apply(batch("w0", 1, BlockRemoved(tuple(A)))) == ApplyResult(False, False, 3)
    assert idx.apply(batch("w0", 2, AllBlocksCleared())) == ApplyResult(False, False, 3)
    assert idx.snapshot("w0") == set(A)
    assert idx.last_seq("w0") == 2
    s = idx.stats()
    assert (s.batches_applied, s.batches_duplicate, s.gaps) == (2, 2, 0)
    idx.check_integrity()


def test_gap_is_not_applied_and_asks_for_resync() -> None:
    idx = PrefixIndex()
    idx.apply(batch("w0", 1, stored(A[:2])))
    res = idx.apply(batch("w0", 3, stored(A[2:], A[1])))
    assert res == ApplyResult(False, True, 2)
    # Stale entries are kept until the resync; later batches keep failing.
    assert idx.snapshot("w0") == set(A[:2])
    assert idx.apply(batch("w0", 4, AllBlocksCleared())).needs_resync
    assert idx.stats().gaps == 2
    idx.resync("w0", A[1:], seq=4)
    assert idx.snapshot("w0") == set(A[1:])
    assert idx.last_seq("w0") == 4
    assert idx.apply(batch("w0", 4, AllBlocksCleared())) == ApplyResult(False, False, 5)
    assert idx.apply(batch("w0", 5, BlockRemoved((A[3],)))) == ApplyResult(True, False, 6)
    assert idx.snapshot("w0") == {A[1], A[2]}
    idx.check_integrity()


def test_unknown_worker_must_start_at_seq_one() -> None:
    idx = PrefixIndex()
    assert idx.apply(batch("w9", 5, stored(A))) == ApplyResult(False, True, 1)
    assert idx.last_seq("w9") is None
    assert idx.num_blocks() == 0
    # A resync registers it; an empty snapshot at seq 0 means "start from 1".
    idx.resync("w9", [], seq=0)
    assert idx.apply(batch("w9", 1, stored(A))).applied
    assert idx.num_blocks("w9") == 4


def test_resync_replaces_entries_and_keeps_other_workers() -> None:
    idx = PrefixIndex()
    idx.apply(batch("w0", 1, stored(A)))
    idx.apply(batch("w1", 1, stored(B)))
    idx.resync("w0", B[:3], seq=10)
    assert idx.snapshot("w0") == set(B[:3])
    assert idx.snapshot("w1") == set(B)
    assert idx.workers_holding(A[3]) == frozenset()
    assert idx.workers_holding(B[2]) == {"w0", "w1"}
    assert idx.num_blocks() == 4
    assert idx.stats().resyncs == 1
    with pytest.raises(ValueError):
        idx.resync("w0", [], seq=-1)
    idx.check_integrity()


def test_remove_worker_drops_entries_and_reuses_slot() -> None:
    idx = PrefixIndex()
    for i, w in enumerate(["w0", "w1", "w2"]):
        idx.apply(batch(w, 1, stored(A[: i + 2])))
    assert idx.lookup(A) == {"w0": 2, "w1": 3, "w2": 4}  # fills the mask -> names cache
    assert idx.remove_worker("w1")
    assert not idx.remove_worker("w1")
    assert idx.snapshot("w1") == set()
    assert idx.workers_holding(A[0]) == {"w0", "w2"}
    assert idx.lookup(A) == {"w0": 2, "w2": 4}
    # A new worker takes the freed slot and must not inherit anything.
    idx.apply(batch("w3", 1, stored(B[:1])))
    assert idx.lookup(A) == {"w0": 2, "w2": 4, "w3": 1}
    assert idx.workers_holding(A[0]) == {"w0", "w2", "w3"}
    assert idx.stats().num_workers == 3
    idx.check_integrity()


def test_all_blocks_cleared_affects_only_that_worker() -> None:
    idx = PrefixIndex()
    idx.apply(batch("w0", 1, stored(A)))
    idx.apply(batch("w1", 1, stored(A[:2])))
    idx.apply(batch("w0", 2, AllBlocksCleared(), stored(B[:1])))
    assert idx.snapshot("w0") == {B[0]}
    assert idx.lookup(A) == {"w0": 1, "w1": 2}
    assert idx.num_blocks() == 2
    idx.check_integrity()


def test_events_apply_in_batch_order() -> None:
    idx = PrefixIndex()
    idx.apply(batch("w0", 1, stored(A), BlockRemoved((A[0],)), stored(A[:1])))
    assert idx.snapshot("w0") == set(A)
    idx.apply(batch("w0", 2, stored(B), AllBlocksCleared(), stored(A[:2])))
    assert idx.snapshot("w0") == set(A[:2])
    # Removing a block the worker never reported is a no-op.
    idx.apply(batch("w0", 3, BlockRemoved((B[3],))))
    assert idx.snapshot("w0") == set(A[:2])


# ---- lookup ----------------------------------------------------------------------------


def test_lookup_counts_leading_blocks_only() -> None:
    idx = PrefixIndex()
    idx.apply(batch("w0", 1, stored(A)))
    idx.apply(batch("w1", 1, stored(B)))
    # w2 holds A's blocks 0, 1 and 3 but not 2: its match stops at 2.
    idx.apply(batch("w2", 1, stored([A[0], A[1], A[3]])))
    # w3 holds A's later blocks only (its first block was evicted): no match at all.
    idx.apply(batch("w3", 1, stored(A[1:])))
    assert idx.lookup(A) == {"w0": 4, "w1": 2, "w2": 2}
    assert idx.lookup(B) == {"w0": 2, "w1": 4, "w2": 2}
    assert idx.lookup(A[:1]) == {"w0": 1, "w1": 1, "w2": 1}
    assert idx.lookup(A + chain([5], A[3])) == {"w0": 4, "w1": 2, "w2": 2}
    assert idx.lookup(chain([9, 9])) == {}
    assert idx.lookup([]) == {}
    assert idx.workers_holding(A[1]) == {"w0", "w1", "w2", "w3"}
    assert idx.stats().lookups == 6


def test_lookup_with_many_worker_slots() -> None:
    idx = PrefixIndex()
    prefix = chain(range(8))
    for w in range(150):  # beyond 64 slots: the bitmask grows past one machine word
        idx.apply(batch(f"w{w}", 1, stored(prefix[: 1 + w % 8])))
    got = idx.lookup(prefix)
    assert got == {f"w{w}": 1 + w % 8 for w in range(150)}
    idx.check_integrity()


# ---- randomized, against a naive model ---------------------------------------------------


class NaiveIndex:
    """The obvious, slow model of PrefixIndex: per-worker sets and seq bookkeeping."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[bytes]] = {}
        self.seq: dict[str, int] = {}

    def apply(self, b: KVEventBatch) -> ApplyResult:
        last = self.seq.get(b.worker_id)
        if last is None and b.seq != 1:
            return ApplyResult(False, True, 1)
        last = last or 0
        if b.seq <= last:
            return ApplyResult(False, False, last + 1)
        if b.seq != last + 1:
            return ApplyResult(False, True, last + 1)
        held = self.blocks.setdefault(b.worker_id, set())
        for e in b.events:
            if isinstance(e, BlockStored):
                held.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                held.difference_update(e.block_hashes)
            else:
                held.clear()
        self.seq[b.worker_id] = b.seq
        return ApplyResult(True, False, b.seq + 1)

    def resync(self, w: str, hashes: set[bytes], seq: int) -> None:
        self.blocks[w] = set(hashes)
        self.seq[w] = seq

    def remove_worker(self, w: str) -> None:
        self.blocks.pop(w, None)
        self.seq.pop(w, None)

    def lookup(self, hashes: Sequence[bytes]) -> dict[str, int]:
        out = {}
        for w, held in self.blocks.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                out[w] = n
        return out


class SimWorker:
    """A worker's true cache: prompts are paths in a small token tree, so workers overlap."""

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name, self.rng = name, rng
        self.held: set[bytes] = set()
        self.seq = 0

    def next_batch(self) -> KVEventBatch:
        events: list[KVEvent] = []
        for _ in range(self.rng.randint(0, 4)):
            r = self.rng.random()
            if r < 0.6:
                hs = random_chain(self.rng)
                start = self.rng.randrange(len(hs))
                events.append(stored(hs[start:], hs[start - 1] if start else None))
                self.held.update(hs[start:])
            elif r < 0.95 and self.held:
                gone = self.rng.sample(
                    sorted(self.held), self.rng.randint(1, min(5, len(self.held)))
                )
                events.append(BlockRemoved(tuple(gone)))
                self.held.difference_update(gone)
            elif r >= 0.95:
                events.append(AllBlocksCleared())
                self.held.clear()
        self.seq += 1
        return batch(self.name, self.seq, *events)


def random_chain(rng: random.Random, max_len: int = 8) -> list[bytes]:
    return chain([rng.randrange(3) for _ in range(rng.randint(1, max_len))])


@pytest.mark.parametrize("seed", range(5))
def test_randomized_against_naive_model(seed: int) -> None:
    rng = random.Random(seed)
    idx, ref = PrefixIndex(), NaiveIndex()
    workers = {f"w{i}": SimWorker(f"w{i}", rng) for i in range(6)}
    for step in range(1500):
        w = rng.choice(list(workers.values()))
        r = rng.random()
        if r < 0.01:  # the worker dies; a fresh one replaces it under a new name
            idx.remove_worker(w.name)
            ref.remove_worker(w.name)
            del workers[w.name]
            fresh = SimWorker(f"w{len(workers)}-{step}", rng)
            workers[fresh.name] = fresh
            continue
        b = w.next_batch()
        deliveries = [] if r < 0.05 else [b, b] if r < 0.10 else [b]
        for d in deliveries:
            got = idx.apply(d)
            assert got == ref.apply(d)
            if got.needs_resync:
                idx.resync(w.name, w.held, w.seq)
                ref.resync(w.name, w.held, w.seq)
        if step % 50 == 0:
            idx.check_integrity()
        for _ in range(2):
            q = random_chain(rng, max_len=10)
            assert idx.lookup(q) == ref.lookup(q)
    idx.check_integrity()
    for name, blocks in ref.blocks.items():
        assert idx.snapshot(name) == blocks
        assert idx.num_blocks(name) == len(blocks)
    assert idx.num_blocks() == len(set().union(*ref.blocks.values()))
    # After a final resync of everyone the index equals the workers' true caches.
    for w in workers.values():
        idx.resync(w.name, w.held, w.seq)
        assert idx.snapshot(w.name) == w.held
    idx.check_integrity()


def test_follows_real_block_pools() -> None:
    """Event batches of real BlockPools (with evictions and lost batches) keep the index exact."""
    block_pool = pytest.importorskip("pdserve.workers.block_pool")
    from pdserve.workers.kv_events import pack_tokens
    rng = random.Random(7)
    idx = PrefixIndex()
    pools = [block_pool.BlockPool(12, BLOCK_SIZE, worker_id=f"w{i}") for i in range(3)]
    for _ in range(400):
        pool = rng.choice(pools)
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 6))]
        hashes = chain(tokens)
        blocks = pool.allocate(len(hashes))
        chunks = [pack_tokens((t,) * BLOCK_SIZE) for t in tokens]
        pool.cache_full_blocks(blocks, hashes, chunks, None)
        pool.free(blocks[::-1])
        b = pool.take_events()
        lost = rng.random() < 0.1
        if b is not None and not lost and idx.apply(b).needs_resync:
            idx.resync(pool.worker_id, pool.cached_hashes(), pool.event_seq)
        q = random_chain(rng)
        for p in pools:
            if idx.last_seq(p.worker_id) == p.event_seq:  # in sync: exact
                assert idx.snapshot(p.worker_id) == p.cached_hashes()
                n = 0
                while n < len(q) and q[n] in p.cached:
                    n += 1
                assert idx.lookup(q).get(p.worker_id, 0) == n
    idx.check_integrity()


# ---- the Ray actor shell -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(ray_session):
    return ray_session  # the session's Ray (tests/cluster/conftest.py): one start for all


def test_actor_round_trip(ray_local) -> None:
    from pdserve.cluster.prefix_index_actor import PrefixIndexActor

    ray = ray_local
    actor = PrefixIndexActor.remote()
    assert ray.get(actor.apply.remote(batch("w0", 1, stored(A)))) == ApplyResult(True, False, 2)
    assert ray.get(actor.apply.remote(batch("w1", 1, stored(B[:3])))).applied
    assert ray.get(actor.lookup.remote(A)) == {"w0": 4, "w1": 2}
    gap = ray.get(actor.apply.remote(batch("w1", 3, AllBlocksCleared())))
    assert gap == ApplyResult(False, True, 2)
    ray.get(actor.resync.remote("w1", B, 3))
    assert ray.get(actor.snapshot.remote("w1")) == set(B)
    assert ray.get(actor.apply.remote(batch("w1", 4, BlockRemoved((B[0],))))).applied
    assert ray.get(actor.lookup.remote(B)) == {"w0": 2}
    assert ray.get(actor.remove_worker.remote("w0"))
    assert ray.get(actor.lookup.remote(A)) == {}
    s = ray.get(actor.stats.remote())
    assert (s.num_workers, s.num_blocks, s.gaps, s.resyncs) == (1, 3, 1, 1)
    ray.kill(actor)
