"""Which free block the pool gives up next: eviction policies and per-tenant quotas.

``lru`` (the default) is the pool's own intrusive free queue: the least recently freed
block goes first, every operation O(1). The ranked policies keep the free blocks in two
heaps with lazy invalidation, O(log n) per operation (under a tenant quota, ``lru`` is
ranked too, by last_access, so that free blocks without a hash go first)::

    plain    free blocks without a hash, FIFO      always taken first: they cost no hit
    cached   free blocks with a hash, by rank()    the lowest rank is evicted first

    lru   rank = last_access                       least recently used (with a quota only)
    lfu   rank = (hits, last_access)               least reused; ties least recently used
    ttl   rank = last_access                       expired(now) also drops every block idle
                                                   for ttl seconds (the pool emits BlockRemoved)
    cost  rank = (has cached children,             leaves first, then the least expected saved
                  log(P(reuse) x recompute cost))  prefill work (see CostPolicy)

A heap entry is ``(rank, tick, version, block)``. A block's version changes whenever it
leaves its heap (a hit, an allocation, a new rank), so older entries are skipped when they
reach the top, and a heap is rebuilt once its stale entries outnumber the live ones. A rank
never changes while a block stays free (hits and last_access change only while it is in
use), except the cost policy's leaf flag, which is re-filed when a child comes or goes.

`TenantQuota` caps the cached blocks of each tenant (a sequence's cache salt): when blocks
are needed, the free cached blocks of a tenant over its quota go before anyone else's.

Which to use (``scripts/bench_eviction.py``, BENCHMARKS.md): on multi-turn chat, reuse
follows recency and ``lru``/``ttl`` win (a new turn's blocks have no hits yet, which
``lfu``/``cost`` hold against them); on popular shared documents mixed with one-off prompts,
``lfu``/``cost`` keep the documents that ``lru`` lets the one-off prompts flush.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any

from pdserve.workers.errors import InvalidRequestError, OutOfBlocksError

if TYPE_CHECKING:
    from pdserve.workers.block_pool import Block, BlockPool
    from pdserve.workers.kv_events import BlockHash

POLICIES = ("lru", "lfu", "ttl", "cost")


def check_cache_options(eviction_policy: str = "lru", cache_ttl_seconds: float | None = None,
                        tenant_quota_blocks: int | None = None,
                        session_ttl_seconds: float | None = None, prefix: str = "") -> None:
    """Raise InvalidRequestError naming the field (``prefix + name``) of a bad cache option."""
    if eviction_policy not in POLICIES:
        raise InvalidRequestError(f"{prefix}eviction_policy",
                                  f"must be one of {POLICIES}, got {eviction_policy!r}")
    if (eviction_policy == "ttl") != (cache_ttl_seconds is not None):
        raise InvalidRequestError(f"{prefix}cache_ttl_seconds",
                                  "is required by eviction_policy 'ttl' and used by no other")
    if cache_ttl_seconds is not None and not cache_ttl_seconds > 0:
        raise InvalidRequestError(f"{prefix}cache_ttl_seconds",
                                  f"must be > 0, got {cache_ttl_seconds}")
    if tenant_quota_blocks is not None and (
            isinstance(tenant_quota_blocks, bool) or not isinstance(tenant_quota_blocks, int)
            or tenant_quota_blocks < 1):
        raise InvalidRequestError(f"{prefix}tenant_quota_blocks",
                                  f"must be an integer >= 1 or None, got {tenant_quota_blocks!r}")
    if session_ttl_seconds is not None and not session_ttl_seconds > 0:
        raise InvalidRequestError(f"{prefix}session_ttl_seconds",
                                  f"must be > 0 or None, got {session_ttl_seconds}")


class _Heap:
    __slots__ = ("entries", "live")

    def __init__(self) -> None:
        self.entries: list[tuple[Any, int, int, Block]] = []
        self.live = 0  # entries still valid (one per filed block)


class _Filing:
    """Blocks filed in lazily invalidated heaps; a block has at most one live entry."""

    __slots__ = ("_version", "_where", "_tick")

    def __init__(self, num_blocks: int) -> None:
        self._version = [0] * num_blocks
        self._where: list[_Heap | None] = [None] * num_blocks
        self._tick = itertools.count()

    def file(self, heap: _Heap, rank: Any, block: Block) -> None:
        bid = block.block_id
        self.unfile(block)
        heapq.heappush(heap.entries, (rank, next(self._tick), self._version[bid], block))
        heap.live += 1
        self._where[bid] = heap
        if len(heap.entries) > 2 * heap.live + 64:
            heap.entries = self.valid(heap)
            heapq.heapify(heap.entries)

    def unfile(self, block: Block) -> None:
        bid = block.block_id
        heap = self._where[bid]
        if heap is not None:
            heap.live -= 1
            self._where[bid] = None
            self._version[bid] += 1

    def peek(self, heap: _Heap) -> Block | None:
        """The live block of lowest rank in ``heap`` (stale entries on top are dropped)."""
        entries, version = heap.entries, self._version
        while entries:
            _, _, ver, block = entries[0]
            if ver == version[block.block_id]:
                return block
            heapq.heappop(entries)
        return None

    def where(self, block: Block) -> _Heap | None:
        return self._where[block.block_id]

    def valid(self, heap: _Heap) -> list[tuple[Any, int, int, Block]]:
        version = self._version
        return [e for e in heap.entries if e[2] == version[e[3].block_id]]


class EvictionPolicy:
    """``lru``: the pool's free queue order (the least recently freed block first), O(1).

    Also the base class of the other policies: the pool calls these hooks on every change
    of a free block's state; here they do nothing.
    """

    name = "lru"

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool

    def victim(self) -> Block:
        """The free block to hand out next; the pool then takes it (and calls `discard`)."""
        return self.pool.free_queue.first()

    def add_free(self, block: Block) -> None:
        """``block`` is free (ref_count 0): file it by its current hash and metadata."""

    def discard(self, block: Block) -> None:
        """``block`` stops being free (a hit or an allocation)."""

    def on_cache(self, block: Block, parent: BlockHash | None) -> Block | None:
        """``block`` now caches a block whose parent hash is ``parent``.
        Returns a free block whose rank changed because of it (to re-file), if any."""
        return None

    def on_uncache(self, block: Block) -> Block | None:
        """``block`` is about to lose its hash; returns a free block whose rank changed."""
        return None

    def rank(self, block: Block) -> Any:
        """Lower is evicted first (one tenant's blocks are ranked by it under a quota)."""
        return block.last_access

    def expired(self, now: float) -> list[Block]:
        """Free cached blocks to drop now, unfiled (only the ``ttl`` policy has any)."""
        return []

    def check_integrity(self) -> None:
        """Raise AssertionError if the policy's view of the free blocks is inconsistent."""


class RankedPolicy(EvictionPolicy):
    """Free blocks without a hash first (FIFO), then the cached free block of lowest rank."""

    def __init__(self, pool: BlockPool) -> None:
        super().__init__(pool)
        self._filing = _Filing(pool.num_blocks)
        self._plain = _Heap()
        self._cached = _Heap()
        for b in pool.free_queue:
            self.add_free(b)

    def victim(self) -> Block:
        b = self._filing.peek(self._plain)
        if b is None:
            b = self._filing.peek(self._cached)
            if b is None:
                raise OutOfBlocksError(1, 0)
        return b

    def add_free(self, block: Block) -> None:
        if block.block_hash is None:
            self._filing.file(self._plain, 0, block)
        else:
            self._filing.file(self._cached, self.rank(block), block)

    def discard(self, block: Block) -> None:
        self._filing.unfile(block)

    def rank(self, block: Block) -> Any:
        raise NotImplementedError

    def check_integrity(self) -> None:
        for heap in (self._plain, self._cached):
            live = self._filing.valid(heap)
            assert len(live) == heap.live, f"{self.name}: live count of a heap drifted"
            for rank, _, _, b in live:
                assert heap is self._plain or rank == self.rank(b), (
                    f"{self.name}: block {b.block_id} filed under a stale rank")
        for b in self.pool.blocks:
            where = self._filing.where(b)
            want = None if b.ref_count else (self._plain if b.block_hash is None else self._cached)
            assert where is want, f"{self.name}: block {b.block_id} filed wrongly"


class RankedLRUPolicy(RankedPolicy):
    """``lru`` under a tenant quota: least recently used first, after blocks without a hash.

    The plain free queue may hold a block without a hash behind cached ones; a quota needs
    those taken first, or a tenant within its quota could lose a block while room is free.
    """

    def rank(self, block: Block) -> Any:
        return block.last_access


class LFUPolicy(RankedPolicy):
    """``lfu``: the cached block with the fewest prefix hits; ties least recently used."""

    name = "lfu"

    def rank(self, block: Block) -> Any:
        return (block.hits, block.last_access)


class TTLPolicy(RankedLRUPolicy):
    """``ttl``: least recently used first, and blocks idle ``ttl_seconds`` are dropped.

    Among free cached blocks the ones idle longest (expired first) are the least recently
    used, so eviction order is LRU; `expired` also lets the pool drop them before anyone
    needs the room, so the global index forgets them.
    """

    name = "ttl"

    def __init__(self, pool: BlockPool, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        super().__init__(pool)

    def expired(self, now: float) -> list[Block]:
        out = []
        while True:
            b = self._filing.peek(self._cached)
            if b is None or b.last_access + self.ttl_seconds > now:
                return out
            self._filing.unfile(b)
            out.append(b)


class CostPolicy(RankedPolicy):
    """``cost``: evict the block whose loss costs the least expected prefill work.

    Expected saved work = P(reuse) x recompute cost, where

    * recompute cost of the block at chain depth i = (i + 1) + ``mlp_blocks``: its tokens
      attend to i + 1 blocks of keys, plus the position-independent MLP/projection work
      (``mlp_blocks`` in the same unit; about 6 * hidden_size / block_size for a real model);
    * P(reuse) ~ (hits + 1) * 2 ** (-idle / ``half_life_s``). An exponential decay keeps the
      order of two idle blocks fixed as time passes (the log of the product differs from a
      static rank by the same ``-now`` term for every block), which is what lets a heap hold
      them; a hyperbolic decay would let two idle blocks swap places.

    A block that is the parent of another cached block is worth its whole subtree (a prefix
    match stops at the first miss, stranding the children), so such blocks are evicted only
    when no cached leaf is free. Children are counted per parent *hash*, so the count stays
    right when a parent is evicted and cached again in another block.
    """

    name = "cost"

    def __init__(self, pool: BlockPool, half_life_s: float = 60.0, mlp_blocks: float = 1.0) -> None:
        self.half_life_s = half_life_s
        self.mlp_blocks = mlp_blocks
        self._parent: list[BlockHash | None] = [None] * pool.num_blocks
        self._children: dict[BlockHash, int] = {}
        super().__init__(pool)

    def rank(self, block: Block) -> Any:
        value = math.log((block.hits + 1) * (block.depth + 1 + self.mlp_blocks))
        recency = math.log(2) * block.last_access / self.half_life_s
        return (block.block_hash in self._children, value + recency)

    def on_cache(self, block: Block, parent: BlockHash | None) -> Block | None:
        self._parent[block.block_id] = parent
        if parent is None:
            return None
        n = self._children.get(parent, 0)
        self._children[parent] = n + 1
        return self._free_holder(parent) if n == 0 else None  # it stopped being a leaf

    def on_uncache(self, block: Block) -> Block | None:
        parent = self._parent[block.block_id]
        self._parent[block.block_id] = None
        if parent is None:
            return None
        n = self._children[parent] - 1
        if n:
            self._children[parent] = n
            return None
        del self._children[parent]
        return self._free_holder(parent)  # it became a leaf

    def _free_holder(self, block_hash: BlockHash) -> Block | None:
        b = self.pool.cached.get(block_hash)
        return b if b is not None and b.ref_count == 0 else None

    def check_integrity(self) -> None:
        super().check_integrity()
        counts: dict[BlockHash, int] = {}
        for b in self.pool.cached.values():
            p = self._parent[b.block_id]
            if p is not None:
                counts[p] = counts.get(p, 0) + 1
        assert counts == self._children, "cost: child counts disagree with the cached blocks"


def make_policy(name: str, pool: BlockPool, cache_ttl_seconds: float | None = None,
                ranked: bool = False) -> EvictionPolicy:
    """The policy called ``name``; ``ranked``: ``lru`` in heaps too (what a quota needs)."""
    check_cache_options(name, cache_ttl_seconds)
    if name == "lfu":
        return LFUPolicy(pool)
    if name == "ttl":
        assert cache_ttl_seconds is not None
        return TTLPolicy(pool, cache_ttl_seconds)
    if name == "cost":
        return CostPolicy(pool)
    return RankedLRUPolicy(pool) if ranked else EvictionPolicy(pool)


class TenantQuota:
    """At most ``limit`` cached blocks per tenant before its own blocks are evicted first.

    Every cached block (in use or free) counts against its tenant. When the pool would evict
    a cached block, a free cached block of a tenant over its quota goes instead, the lowest
    of that tenant by the policy's rank. So a tenant that fills the cache pays for it with
    its own prefixes, and a tenant within its quota loses blocks only when every tenant over
    quota has its cached blocks in use. Victim choice scans the tenants over quota (few).
    """

    def __init__(self, limit: int, policy: EvictionPolicy, num_blocks: int) -> None:
        self.limit = limit
        self.policy = policy
        self.counts: dict[str | None, int] = {}
        self._over: dict[str | None, None] = {}  # tenants whose count exceeds the limit
        self._heaps: dict[str | None, _Heap] = {}
        self._filing = _Filing(num_blocks)

    def victim(self) -> Block | None:
        for tenant in self._over:
            heap = self._heaps.get(tenant)
            b = self._filing.peek(heap) if heap is not None else None
            if b is not None:
                return b
        return None

    def on_cache(self, block: Block) -> None:
        t = block.tenant
        n = self.counts.get(t, 0) + 1
        self.counts[t] = n
        if n > self.limit:
            self._over[t] = None

    def on_uncache(self, block: Block) -> None:
        self._filing.unfile(block)
        t = block.tenant
        n = self.counts[t] - 1
        if n <= self.limit:
            self._over.pop(t, None)
        if n:
            self.counts[t] = n
        else:
            del self.counts[t]
            self._heaps.pop(t, None)  # nothing live is left in it

    def add_free(self, block: Block) -> None:
        if block.block_hash is None:
            self._filing.unfile(block)
            return
        heap = self._heaps.get(block.tenant)
        if heap is None:
            heap = self._heaps[block.tenant] = _Heap()
        self._filing.file(heap, self.policy.rank(block), block)

    def discard(self, block: Block) -> None:
        self._filing.unfile(block)

    def check_integrity(self, pool: BlockPool) -> None:
        counts: dict[str | None, int] = {}
        for b in pool.blocks:
            if b.block_hash is not None:
                counts[b.tenant] = counts.get(b.tenant, 0) + 1
            free_cached = b.block_hash is not None and b.ref_count == 0
            want = self._heaps.get(b.tenant) if free_cached else None
            assert self._filing.where(b) is want and (want is not None or not free_cached), (
                f"quota: block {b.block_id} filed wrongly")
        assert counts == self.counts, "quota: tenant counts disagree with the cached blocks"
        assert set(self._over) == {t for t, n in counts.items() if n > self.limit}
        for heap in self._heaps.values():
            live = self._filing.valid(heap)
            assert len(live) == heap.live, "quota: live count of a heap drifted"
            for rank, _, _, b in live:
                assert rank == self.policy.rank(b), f"quota: block {b.block_id} has a stale rank"
