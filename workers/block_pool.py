"""The pool of KV blocks: reference counts, an O(1) LRU free queue and the prefix-cache map.

::

    free queue (LRU order; evict from the head, freed blocks join at the tail)
    head <-> b7 <-> b2 <-> b9 <-> tail        b2 may still carry a hash: it is a
                                              cached block nobody uses right now.
    cached: {hash -> block}                   a hit on b2 takes it out of the queue.

Invariant: a block is in the free queue iff its ref_count is 0. Block ids never
change once allocated, so block tables are append-only.

Which free block goes next is the eviction policy's choice (``workers/eviction.py``):
the default ``lru`` takes the queue's head; the others rank free blocks in heaps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.workers.errors import OutOfBlocksError
from pdserve.workers.eviction import (
    EvictionPolicy,
    TenantQuota,
    check_cache_options,
    make_policy,
)
from pdserve.workers.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)

MAX_PENDING_EVENTS = 4096  # events kept for take_events; past it they are dropped (a gap)


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    tokens: bytes | None = None  # its packed token ids (pack_tokens): a hit is verified on them
    prev: Block | None = None
    next: Block | None = None
    # What eviction policies rank by; reset when the block loses its hash.
    hits: int = 0  # prefix hits since it was cached
    last_access: float = 0.0  # clock time of its last hit or release
    depth: int = 0  # index of the block in its chain (0: the first block of a prompt)
    tenant: str | None = None  # the cache salt of its chain (None: the default tenant)


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks; every operation is O(1)."""

    def __init__(self, blocks: list[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-2)
        self._head.next = self._tail
        self._tail.prev = self._head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None
        last.next = block
        block.prev = last
        block.next = self._tail
        self._tail.prev = block
        self.size += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise AssertionError(f"block {block.block_id} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self.size -= 1

    def first(self) -> Block:
        first = self._head.next
        if first is None or first is self._tail:
            raise OutOfBlocksError(1, 0)
        return first

    def popleft(self) -> Block:
        first = self.first()
        self.remove(first)
        return first

    def popleft_n(self, n: int) -> list[Block]:
        """The first ``n`` blocks, unlinked in one splice (the caller checked ``size``)."""
        out = []
        node = self._head.next
        for _ in range(n):
            assert node is not None and node is not self._tail
            out.append(node)
            nxt = node.next
            node.prev = node.next = None
            node = nxt
        self._head.next = node
        node.prev = self._head
        self.size -= n
        return out

    def __iter__(self):
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next


class BlockPool:
    """Owns every block; hands them out, takes them back and remembers cached ones.

    ``eviction_policy`` picks which cached free block is evicted (``lru``, ``lfu``, ``ttl``
    with ``cache_ttl_seconds``, ``cost``); ``tenant_quota_blocks`` caps each tenant's cached
    blocks before its own go first; ``clock`` times idleness (injected for tests).

    ``keep_events``: queue KV events from the start (True), or only from the first
    ``take_events`` call on (False: an engine nobody may be listening to). Before that
    first call the events are not made at all: a full queue of them would be thousands of
    objects the cyclic GC keeps walking, pauses of milliseconds in an offline run. If any
    were skipped, the sequence number skips one, so the consumer sees a gap and resyncs.
    """

    def __init__(self, num_blocks: int, block_size: int, worker_id: str = "local",
                 enable_caching: bool = True, *, eviction_policy: str = "lru",
                 cache_ttl_seconds: float | None = None, tenant_quota_blocks: int | None = None,
                 clock: Callable[[], float] = time.monotonic, keep_events: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        check_cache_options(eviction_policy, cache_ttl_seconds, tenant_quota_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.worker_id = worker_id
        self.enable_caching = enable_caching
        self.clock = clock
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.eviction_policy = eviction_policy
        self.cache_ttl_seconds = cache_ttl_seconds
        self.policy = make_policy(eviction_policy, self, cache_ttl_seconds,
                                  ranked=tenant_quota_blocks is not None)
        self.quota = (TenantQuota(tenant_quota_blocks, self.policy, num_blocks)
                      if tenant_quota_blocks is not None else None)
        # LRU without quotas is the free queue alone: its hooks need not be called.
        self._ranked = type(self.policy) is not EvictionPolicy
        self._events: list[KVEvent] = []
        self._event_seq = 0
        self._keep_events = keep_events
        self._skipped_events = False  # events not made before the first take (a gap)
        self.num_dropped_events = 0  # times the pending events overflowed (see _emit)
        self.num_evictions = 0
        self.num_expired = 0

    # -- allocation -------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.free_queue.size

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` free blocks in the policy's order, evicting cached ones.

        Under a quota, a cached block about to be evicted is replaced by a free cached
        block of a tenant over its quota, if there is one.
        """
        if n > self.free_queue.size:
            raise OutOfBlocksError(n, self.free_queue.size)
        evicted: list[BlockHash] = []
        if not self._ranked:  # LRU: the queue's head, taken in one splice
            out = self.free_queue.popleft_n(n)
            cached, reset = self.cached, self._reset
            for b in out:
                h = b.block_hash
                if h is not None:  # _uncache without policy hooks (a full pool evicts per block)
                    evicted.append(h)
                    if cached.get(h) is b:
                        del cached[h]
                    reset(b)
                b.ref_count = 1
        else:
            out = []
            policy, quota = self.policy, self.quota
            for _ in range(n):
                b = policy.victim()
                if quota is not None and b.block_hash is not None:
                    b = quota.victim() or b
                self._take(b)
                if b.block_hash is not None:
                    evicted.append(b.block_hash)
                    self._uncache(b)
                b.ref_count = 1
                out.append(b)
        if evicted:
            self.num_evictions += len(evicted)
            self._emit(BlockRemoved(tuple(evicted)))
        return out

    def touch(self, block: Block) -> None:
        """Take one more reference (a shared fork, a pin)."""
        if block.ref_count == 0:
            self._take(block)
        block.ref_count += 1

    def hit(self, blocks: list[Block]) -> None:
        """Take one more reference on each block for a prefix hit (what policies count)."""
        now = self.clock()
        take = self._take
        for b in blocks:  # touch(), inlined: a hit on a shared prompt takes ~100 blocks
            if b.ref_count == 0:
                take(b)
            b.ref_count += 1
            b.hits += 1
            b.last_access = now

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference of each block, in the order given.

        Callers pass a sequence's blocks tail first so that, among equally old
        blocks, a chain's last blocks are evicted before its shared head.
        """
        now = None
        for b in blocks:
            if b.ref_count <= 0:
                raise AssertionError(f"double free of block {b.block_id}")
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.block_hash is None or not self.enable_caching:
                    self._reset(b)
                if now is None:
                    now = self.clock()
                b.last_access = now
                self.free_queue.append(b)
                if self._ranked:
                    self._file(b)

    # -- prefix cache -----------------------------------------------------
    def lookup(self, block_hash: BlockHash, tokens: bytes) -> Block | None:
        """The cached block of ``block_hash`` if it holds ``tokens`` (packed token ids)."""
        b = self.cached.get(block_hash)
        if b is None or b.tokens != tokens:  # verify: a collision is not a hit
            return None
        return b

    def cache_full_blocks(self, blocks: list[Block], hashes: list[BlockHash],
                          token_chunks: list[bytes], parent: BlockHash | None, *,
                          tenant: str | None = None, depth: int | None = None) -> None:
        """Register newly filled blocks under their chained hashes and emit one event.

        ``tenant`` owns them (for quotas); ``depth`` is the first block's index in its chain
        (None: one more than the cached parent's, 0 without one).
        """
        if not self.enable_caching or not blocks:
            return
        if depth is None:
            held = self.cached.get(parent) if parent is not None else None
            depth = held.depth + 1 if held is not None else 0
        stored_hashes: list[BlockHash] = []
        stored_tokens: list[bytes] = []
        first_parent = parent
        cached, ranked = self.cached, self._ranked
        for i, (b, h, toks) in enumerate(zip(blocks, hashes, token_chunks, strict=True)):
            if b.block_hash is not None:
                parent = b.block_hash
                continue  # already cached (a hit being re-registered)
            if h in cached:
                # Another block already holds this content; this one stays private.
                parent = h
                continue
            if not stored_hashes:
                first_parent = parent
            b.block_hash = h
            b.tokens = toks
            b.tenant = tenant
            b.depth = depth + i
            cached[h] = b
            if ranked:
                self._refile(self.policy.on_cache(b, parent))
                if self.quota is not None:
                    self.quota.on_cache(b)
                if b.ref_count == 0:
                    self._file(b)
            stored_hashes.append(h)
            stored_tokens.append(toks)
            parent = h
        if stored_hashes:
            if self._keep_events:
                self._emit(BlockStored(tuple(stored_hashes), first_parent,
                                       b"".join(stored_tokens), self.block_size))
            else:  # not made at all (the token bytes' join is the costly part)
                self._skipped_events = True

    def expire(self, now: float | None = None) -> int:
        """Drop the cached free blocks the policy says have expired (``ttl``); they stay free.

        Emits one BlockRemoved; returns how many blocks were dropped.
        """
        blocks = self.policy.expired(self.clock() if now is None else now)
        if not blocks:
            return 0
        hashes: list[BlockHash] = []
        for b in blocks:
            assert b.block_hash is not None
            hashes.append(b.block_hash)
            self._uncache(b)
            self._file(b)  # free again, now without a hash
        self.num_expired += len(hashes)
        self._emit(BlockRemoved(tuple(hashes)))
        return len(hashes)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if self.free_queue.size != self.num_blocks:
            return False
        for b in self.blocks:
            self._reset(b)
        self.cached.clear()
        self.policy = make_policy(self.eviction_policy, self, self.cache_ttl_seconds,
                                  ranked=self.quota is not None)
        if self.quota is not None:
            self.quota = TenantQuota(self.quota.limit, self.policy, self.num_blocks)
        self._emit(AllBlocksCleared())
        return True

    def cached_hashes(self) -> set[BlockHash]:
        return set(self.cached)

    # -- events -------------------------------------------------------------
    def _emit(self, event: KVEvent) -> None:
        """Queue an event for ``take_events``. Nobody may be taking them (an offline
        engine): past MAX_PENDING_EVENTS the queue is dropped and the sequence number
        skips one, so a consumer that does come sees a gap and resyncs from a snapshot.
        Before the first take (``keep_events`` False) nothing is queued."""
        if not self._keep_events:
            self._skipped_events = True
            return
        self._events.append(event)
        if len(self._events) > MAX_PENDING_EVENTS:
            self._events = []
            self._event_seq += 1
            self.num_dropped_events += 1
            self._skipped_events = True  # the next take reports the gap, events or not

    def take_events(self) -> KVEventBatch | None:
        """The queued events as one batch (None: nothing new). The first take after events
        were skipped (made before any take, or dropped from a full queue) returns a batch
        even when none are queued: its seq jumps past the gap, so the consumer resyncs now
        rather than at the next event."""
        gap = self._skipped_events
        self._skipped_events = False
        if not self._keep_events:  # the first consumer: events are kept from now on
            self._keep_events = True
            if gap:
                self._event_seq += 1
        if not self._events and not gap:
            return None
        self._event_seq += 1
        batch = KVEventBatch(self.worker_id, self._event_seq, tuple(self._events))
        self._events = []
        return batch

    @property
    def event_seq(self) -> int:
        return self._event_seq

    # -- internals ----------------------------------------------------------
    def _take(self, b: Block) -> None:
        """A free block stops being free (allocated or hit)."""
        self.free_queue.remove(b)
        if self._ranked:
            self.policy.discard(b)
            if self.quota is not None:
                self.quota.discard(b)

    def _file(self, b: Block) -> None:
        """A free block (re)enters the policy's and the quota's order."""
        self.policy.add_free(b)
        if self.quota is not None:
            self.quota.add_free(b)

    def _refile(self, b: Block | None) -> None:
        if b is not None and b.ref_count == 0:
            self._file(b)

    def _uncache(self, b: Block) -> None:
        if b.block_hash is not None and self.cached.get(b.block_hash) is b:
            if self._ranked:
                self._refile(self.policy.on_uncache(b))
                if self.quota is not None:
                    self.quota.on_uncache(b)
            del self.cached[b.block_hash]
        self._reset(b)

    @staticmethod
    def _reset(b: Block) -> None:
        b.block_hash = None
        b.tokens = None
        b.hits = 0
        b.depth = 0
        b.tenant = None

    def check_integrity(self) -> None:
        """Raise AssertionError if any pool invariant is broken."""
        in_queue = set()
        for b in self.free_queue:
            assert b.ref_count == 0, f"block {b.block_id} in free queue with refs"
            assert b.block_id not in in_queue, f"block {b.block_id} twice in free queue"
            in_queue.add(b.block_id)
        assert len(in_queue) == self.free_queue.size, "free queue size drifted"
        for b in self.blocks:
            assert b.ref_count >= 0, f"block {b.block_id} has negative refs"
            assert (b.ref_count == 0) == (b.block_id in in_queue), (
                f"block {b.block_id}: ref_count {b.ref_count} vs in-queue {b.block_id in in_queue}")
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, f"block {b.block_id} hash not mapped"
                assert b.tokens is not None and len(b.tokens) == 8 * self.block_size
        for h, b in self.cached.items():
            assert b.block_hash == h, f"cached map entry for block {b.block_id} is stale"
        self.policy.check_integrity()
        if self.quota is not None:
            self.quota.check_integrity(self)
