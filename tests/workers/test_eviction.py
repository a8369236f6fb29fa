"""Tests of pdserve.workers.eviction: each policy's order, TTL expiry, tenant quotas, integrity
under random operations, and the global index kept exact by the eviction events."""

from __future__ import annotations

import random

import pytest

from pdserve.cluster.prefix_index import PrefixIndex
from pdserve.workers.block_manager import BlockManager
from pdserve.workers.block_pool import Block, BlockPool
from pdserve.workers.config import EngineConfig
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.eviction import POLICIES
from pdserve.workers.kv_events import BlockRemoved, pack_tokens
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence, SequenceStatus

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def options(policy: str) -> dict:
    return {"eviction_policy": policy, "cache_ttl_seconds": 1e9 if policy == "ttl" else None}


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def toks(i: int) -> bytes:
    return pack_tokens(tuple(range(i * BS, (i + 1) * BS)))


def chain(pool: BlockPool, first: int, n: int, depth: int | None = None) -> list[Block]:
    """Allocate and cache a chain of ``n`` blocks hashed h(first), h(first + 1), ..."""
    blocks = pool.allocate(n)
    pool.cache_full_blocks(blocks, [h(first + i) for i in range(n)],
                           [toks(first + i) for i in range(n)], None, depth=depth)
    return blocks


def eviction_order(pool: BlockPool, n: int) -> list[int | None]:
    """Allocate ``n`` blocks one at a time: which hash each evicted (None: a block without one)."""
    out: list[int | None] = []
    for _ in range(n):
        pool.take_events()
        pool.allocate(1)
        batch = pool.take_events()
        gone = [x for ev in batch.events for x in ev.block_hashes] if batch else []
        assert len(gone) <= 1
        out.append(int.from_bytes(gone[0], "little") if gone else None)
    pool.check_integrity()
    return out


def make_seq(name: str, tokens: list[int], salt: str | None = None,
             session: str | None = None, seq_id: str = "") -> Sequence:
    return Sequence(request_id=name, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    params=SamplingParams(), arrival=0.0, cache_salt=salt, session_id=session,
                    seq_id=seq_id)


def admit(bm: BlockManager, seq: Sequence) -> bool:
    """Match, allocate and compute the whole sequence (what scheduler + runner do)."""
    hits = bm.match_prefix(seq) if not seq.block_table else []
    n = seq.num_tokens - seq.num_computed_tokens - len(hits) * BS
    if not bm.can_allocate(seq, n, hits):
        return False
    bm.allocate(seq, n, hits)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return True


# ---- each policy's order ------------------------------------------------------------------


def test_lru_is_the_default_and_evicts_the_least_recently_freed_even_before_an_unused_block():
    pool = BlockPool(4, BS)
    assert pool.policy.name == "lru" and pool.quota is None
    a, b, c = chain(pool, 0, 1), chain(pool, 10, 1), chain(pool, 20, 1)
    (plain,) = pool.allocate(1)
    for x in (a, b, c, [plain]):
        pool.free(x)
    # The free queue's order exactly: a cached block at the head goes before a plain one.
    assert eviction_order(pool, 4) == [0, 10, 20, None]


@pytest.mark.parametrize("policy", ["lfu", "ttl", "cost"])
def test_ranked_policies_take_blocks_without_a_hash_before_any_cached_block(policy):
    pool = BlockPool(4, BS, **options(policy))
    a, b, c = chain(pool, 0, 1), chain(pool, 10, 1), chain(pool, 20, 1)
    (plain,) = pool.allocate(1)
    for x in (a, b, c, [plain]):
        pool.free(x)
    assert eviction_order(pool, 1) == [None]


def test_lfu_evicts_the_least_hit_block_and_breaks_ties_least_recently_used():
    clock = Clock()
    pool = BlockPool(4, BS, eviction_policy="lfu", clock=clock)
    d, c, b, a = chain(pool, 30, 1), chain(pool, 20, 1), chain(pool, 10, 1), chain(pool, 0, 1)
    for x in (d, c, b, a):  # freed at t=0 in this order
        pool.free(x)
    clock.t = 1
    for _ in range(2):  # a: two prefix hits
        pool.hit(a)
        pool.free(a)
    clock.t = 2
    pool.hit(b)  # b: one
    pool.free(b)
    assert [x.hits for x in (a[0], b[0], c[0], d[0])] == [2, 1, 0, 0]
    # LRU would now go d, c, a, b; LFU keeps the most reused.
    assert eviction_order(pool, 4) == [30, 20, 10, 0]


def test_ttl_expires_idle_blocks_proactively_and_evicts_the_longest_idle_first():
    clock = Clock()
    pool = BlockPool(5, BS, eviction_policy="ttl", cache_ttl_seconds=10.0, clock=clock)
    a, b, c, d = (chain(pool, i * 10, 1) for i in range(4))
    pool.allocate(1)  # the fifth block stays in use (no hash)
    for t, x in ((0, a), (5, b), (8, c)):
        clock.t = t
        pool.free(x)
    pool.take_events()
    assert pool.expire(now=9.9) == 0 and pool.take_events() is None
    assert pool.expire(now=12.0) == 1  # a was idle 12 s; b 7 s, c 4 s; d is in use
    batch = pool.take_events()
    assert batch is not None and batch.events == (BlockRemoved((h(0),)),)
    assert pool.cached_hashes() == {h(10), h(20), h(30)} and a[0].block_hash is None
    assert pool.num_free == 3 and pool.num_expired == 1
    pool.check_integrity()
    clock.t = 20
    pool.free(d)  # idle time counts from the release, not from when it was cached
    assert pool.expire(now=25.0) == 2  # b and c
    assert pool.cached_hashes() == {h(30)}
    assert pool.expire(now=30.0) == 1 and pool.cached_hashes() == set()
    pool.check_integrity()


def test_ttl_eviction_order_is_longest_idle_first():
    clock = Clock()
    pool = BlockPool(3, BS, eviction_policy="ttl", cache_ttl_seconds=100.0, clock=clock)
    blocks = [chain(pool, i * 10, 1) for i in range(3)]
    for t, i in ((0, 2), (1, 0), (2, 1)):
        clock.t = t
        pool.free(blocks[i])
    assert eviction_order(pool, 3) == [20, 0, 10]


def test_cost_evicts_the_cheapest_to_recompute_leaf_first():
    pool = BlockPool(4, BS, eviction_policy="cost", clock=Clock())
    x = chain(pool, 0, 3)  # depths 0, 1, 2
    y = chain(pool, 10, 1)  # depth 0
    assert [b.depth for b in x + y] == [0, 1, 2, 0]
    pool.free(x[::-1])
    pool.free(y)
    # LRU would go x2, x1, x0, y. The cheapest leaf is y (depth 0), then x's tail: x0 is
    # cheaper than x2 but goes last, since evicting it would strand x1 and x2.
    assert eviction_order(pool, 4) == [10, 2, 1, 0]


def test_cost_weighs_hits_and_recency_against_depth():
    clock = Clock()
    pool = BlockPool(4, BS, eviction_policy="cost", clock=clock)  # half-life 60 s
    deep = chain(pool, 0, 1, depth=7)  # recompute cost 7 + 1 + 1 = 9
    shallow = chain(pool, 10, 1, depth=0)  # 2
    hot, cold = chain(pool, 20, 1, depth=0), chain(pool, 30, 1, depth=3)  # 2 and 5
    pool.free(deep)
    clock.t = 60  # one half-life later: shallow 2 * 1 < deep 9 * 1/2
    pool.free(shallow)
    assert pool.policy.victim() is shallow[0]
    pool.hit(shallow)
    clock.t = 240  # four half-lives after deep: shallow (1 + 1) * 2 > deep 9 / 16
    pool.free(shallow)
    assert pool.policy.victim() is deep[0]
    # Three hits make a shallow block worth more than a deeper unused one of the same age.
    for _ in range(3):
        pool.hit(hot)
        pool.free(hot)
    pool.free(hot)
    pool.free(cold)
    assert hot[0].hits == 3
    assert eviction_order(pool, 4) == [0, 10, 30, 20]


def test_lazy_heaps_stay_bounded_under_hit_and_free_churn():
    pool = BlockPool(8, BS, eviction_policy="lfu", tenant_quota_blocks=1)
    blocks = chain(pool, 0, 4)
    pool.free(blocks)
    for i in range(5000):
        b = blocks[i % 4]
        pool.hit([b])
        pool.free([b])
    heap = pool.policy._cached
    assert heap.live == 4 and len(heap.entries) <= 2 * heap.live + 65
    pool.check_integrity()


# ---- quotas -----------------------------------------------------------------------------


def run_tenants(policy: str, quota: int | None, rounds: int) -> tuple[BlockManager, list[bytes]]:
    """Tenant B caches one 3-block prompt; tenant A then churns through fresh prompts."""
    clock = Clock()
    bm = BlockManager(16, BS, tenant_quota_blocks=quota, clock=clock, **options(policy))
    b = make_seq("b", list(range(1000, 1013)), salt="B")
    assert admit(bm, b)
    b_hashes = list(b.block_hashes)
    bm.free(b)
    for i in range(rounds):
        clock.t += 1
        a = make_seq(f"a{i}", [i * 100 + j for j in range(9)], salt="A")
        assert admit(bm, a)
        bm.free(a)
        bm.check_integrity()
        if quota is not None:
            assert set(b_hashes) <= bm.pool.cached_hashes(), f"B lost a block in round {i}"
    return bm, b_hashes


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tenant_filling_the_cache_does_not_evict_another_within_its_quota(policy):
    bm, b_hashes = run_tenants(policy, quota=6, rounds=100)
    counts = bm.pool.quota.counts
    assert counts["B"] == 3 and counts["A"] > 6  # A uses the room nobody else needs
    # Without a quota A's churn evicts B's prefix too.
    bm, b_hashes = run_tenants(policy, quota=None, rounds=100)
    assert not set(b_hashes) <= bm.pool.cached_hashes()


def test_quota_falls_back_to_the_policy_when_the_tenant_over_quota_has_nothing_free():
    bm = BlockManager(8, BS, tenant_quota_blocks=2)
    b = make_seq("b", list(range(500, 509)), salt="B")
    admit(bm, b)
    b_hashes = set(b.block_hashes)
    bm.free(b)  # B: 2 cached free blocks
    a = make_seq("a", list(range(13)), salt="A")
    assert admit(bm, a)  # A: 3 cached blocks, all in use (over quota, nothing free)
    c = make_seq("c", list(range(900, 903)))
    assert admit(bm, c)  # needs 1 block: 8 - 4 (a) - 2 (b) leaves 2 free
    d = make_seq("d", list(range(700, 707)))
    assert admit(bm, d)  # needs 2: one free, one evicted from B by the policy
    assert len(b_hashes & bm.pool.cached_hashes()) == 1
    bm.check_integrity()


# ---- random operations: integrity, free count, and the index mirror ---------------------


@pytest.mark.parametrize("quota", [None, 5])
@pytest.mark.parametrize("policy", POLICIES)
def test_random_operations_keep_integrity_and_the_index_agrees_with_the_pool(policy, quota):
    rng = random.Random(f"{policy}-{quota}")
    clock = Clock()
    opts = options(policy)
    if policy == "ttl":
        opts["cache_ttl_seconds"] = 30.0
    bm = BlockManager(24, BS, worker_id="w", tenant_quota_blocks=quota, session_ttl_seconds=50.0,
                      clock=clock, **opts)
    idx = PrefixIndex()
    systems = [[rng.randrange(50) for _ in range(rng.choice((4, 8, 9)))] for _ in range(3)]
    running: list[Sequence] = []
    leases: list[str] = []
    for counter in range(1500):
        op = rng.random()
        if op < 0.3:
            tokens = rng.choice(systems) + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
            seq = make_seq(f"r{counter}", tokens, salt=rng.choice((None, "t1", "t2")),
                           session=rng.choice((None, None, "s1", "s2", "s3")))
            if admit(bm, seq):
                running.append(seq)
        elif op < 0.45 and running:  # decode a few tokens
            seq = rng.choice(running)
            seq.token_ids.extend(rng.randrange(50) for _ in range(rng.randint(1, 6)))
            if not admit(bm, seq):
                running.remove(seq)
                bm.free(seq)  # preempted: no session pin (the status is not FINISHED)
        elif op < 0.6 and running:  # finish (a session keeps its blocks)
            seq = running.pop(rng.randrange(len(running)))
            seq.status = SequenceStatus.FINISHED
            bm.free(seq)
        elif op < 0.65 and running:
            parent = rng.choice(running)
            child = make_seq(parent.request_id, parent.token_ids, parent.cache_salt,
                             seq_id=f"{parent.seq_id}#{counter}")
            bm.fork(parent, child)
            running.append(child)
        elif op < 0.7 and running:
            seq = rng.choice(running)
            leases.append(f"lease{counter}")
            bm.pin(leases[-1], seq.block_table[:2])
        elif op < 0.75 and leases:
            assert bm.unpin(leases.pop(rng.randrange(len(leases))))
        elif op < 0.85:
            clock.t += rng.choice((1.0, 5.0, 20.0))
            bm.expire()
        elif op < 0.87:
            bm.drop_session(rng.choice(("s1", "s2", "s3")))
        elif op < 0.88 and not running and not leases:
            for s in ("s1", "s2", "s3"):
                bm.drop_session(s)
            assert bm.pool.reset_prefix_cache()
        bm.check_integrity()
        batch = bm.take_events()
        if batch is not None:
            assert idx.apply(batch).applied
        assert idx.snapshot("w") == bm.pool.cached_hashes()
    assert bm.pool.num_evictions > 0
    for seq in running:
        bm.free(seq)
    for owner in leases:
        bm.unpin(owner)
    for s in ("s1", "s2", "s3"):
        bm.drop_session(s)
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks and bm.owners() == []


# ---- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"eviction_policy": "mru"}, "eviction_policy"),
    ({"eviction_policy": "ttl"}, "cache_ttl_seconds"),
    ({"cache_ttl_seconds": 5.0}, "cache_ttl_seconds"),
    ({"eviction_policy": "ttl", "cache_ttl_seconds": 0.0}, "cache_ttl_seconds"),
    ({"tenant_quota_blocks": 0}, "tenant_quota_blocks"),
    ({"tenant_quota_blocks": True}, "tenant_quota_blocks"),
    ({"session_ttl_seconds": -1.0}, "session_ttl_seconds"),
])
def test_bad_cache_options_are_refused_naming_the_field(kwargs, field):
    from pdserve.cluster.config import ClusterConfig

    with pytest.raises(InvalidRequestError) as e:
        EngineConfig(**kwargs)
    assert e.value.field == f"config.{field}"
    with pytest.raises(InvalidRequestError) as e:
        ClusterConfig(**kwargs)
    assert e.value.field == f"config.{field}"
    with pytest.raises(InvalidRequestError) as e:
        BlockManager(8, BS, **kwargs)
    assert e.value.field == field


def test_cluster_config_reaches_the_engine_config():
    from pdserve.cluster.config import ClusterConfig
    from pdserve.cluster.spawn import engine_config

    cfg = ClusterConfig.from_dict({"eviction_policy": "ttl", "cache_ttl_seconds": 9.0,
                                   "tenant_quota_blocks": 100, "session_ttl_seconds": 60.0})
    ec = engine_config(cfg, cfg.decode, "d0")
    assert (ec.eviction_policy, ec.cache_ttl_seconds, ec.tenant_quota_blocks,
            ec.session_ttl_seconds) == ("ttl", 9.0, 100, 60.0)
