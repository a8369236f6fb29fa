"""Tests of pdserve.workers.block_manager: block tables, prefix hits, forks, leases, integrity.

The randomized test simulates the KV content itself (which token sits in which slot), so a
prefix hit on the wrong block, a missed copy-on-write or a block reused while still shared
shows up as a wrong token, not only as a wrong reference count.
"""

from __future__ import annotations

import random

import pytest

from pdserve.workers import block_manager as bm_mod
from pdserve.workers.block_manager import BlockManager, hash_block, hash_prompt_blocks
from pdserve.workers.errors import OutOfBlocksError
from pdserve.workers.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, unpack_tokens
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence

BS = 4


def make_seq(name: str, tokens: list[int], salt: str | None = None, seq_id: str = "") -> Sequence:
    return Sequence(request_id=name, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    params=SamplingParams(), arrival=0.0, cache_salt=salt, seq_id=seq_id)


def admit(bm: BlockManager, seq: Sequence, n: int | None = None) -> int:
    """What the scheduler does for a waiting sequence: match, allocate, compute, commit."""
    hits = bm.match_prefix(seq)
    computed = len(hits) * BS
    n = seq.num_tokens - computed if n is None else n
    bm.allocate(seq, n, hits)
    seq.num_computed_tokens += n
    bm.commit(seq)
    return computed


def probe_without_memo(bm: BlockManager, seq: Sequence):
    """A prefix probe that hashes every block (what probe_prefix did before its memo)."""
    max_blocks = (seq.num_tokens - 1) // BS
    hashes, chunks = bm_mod.block_keys(seq.token_ids, BS, seq.cache_salt, stop=max_blocks)
    hits = []
    for h, c in zip(hashes, chunks, strict=True):
        b = bm.pool.lookup(h, c)
        if b is None:
            return hits, h  # the missed block's hash
        hits.append(b)
    return hits, None


def test_hash_chain_matches_hash_prompt_blocks_and_depends_on_salt():
    ids = list(range(11))
    hashes = hash_prompt_blocks(ids, BS)
    assert len(hashes) == 2 and hashes[1] == hash_block(hash_block(None, ids[:4]), ids[4:8])
    assert hash_prompt_blocks(ids, BS, salt="t1")[0] != hashes[0]
    assert hash_prompt_blocks(ids, BS, salt="t1") == hash_prompt_blocks(ids, BS, salt="t1")
    assert len(hashes[0]) == 16


def test_block_hash_is_blake2b_of_little_endian_int64_ids():
    """The hash is part of the cluster's contract (router, index and every worker compute it):
    BLAKE2b-128 over the salted root or the parent, then the ids as little-endian int64,
    whether the ids come as a tuple, a list or an iterator."""
    import hashlib

    import numpy as np

    ids = [0, 1, 49151, 2**40, -1]

    def ref(prefix: bytes) -> bytes:
        return hashlib.blake2b(prefix + np.asarray(ids, dtype="<i8").tobytes(), digest_size=16).digest()

    root = ref(b"pdserve-root\x00tenant")
    assert hash_block(None, tuple(ids), "tenant") == hash_block(None, iter(ids), "tenant") == root
    assert hash_block(root, ids) == ref(root)


def test_prefix_hit_shares_full_blocks_and_always_leaves_a_token_to_compute():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(12)))
    assert admit(bm, a) == 0 and len(a.block_table) == 3
    b = make_seq("b", list(range(12)) + [99])  # shares all 3 full blocks of a
    assert admit(bm, b) == 12
    assert b.block_table[:3] == a.block_table and b.num_computed_tokens == 13
    c = make_seq("c", list(range(12)))  # identical prompt: the last block must be recomputed
    assert admit(bm, c) == 8
    assert c.block_table[:2] == a.block_table[:2] and c.block_table[2] != a.block_table[2]
    bm.check_integrity()
    for s in (a, b, c):
        bm.free(s)
    bm.check_integrity()
    assert bm.num_free_blocks == 16 and bm.owners() == []


def test_hash_collision_is_not_a_prefix_hit(monkeypatch):
    monkeypatch.setattr(bm_mod, "hash_block", lambda parent, token_ids, salt=None: b"\x00" * 16)
    bm = BlockManager(8, BS)
    a = make_seq("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    b = make_seq("b", [9, 9, 9, 9, 5])  # its block hashes to the same (forged) value
    assert bm.match_prefix(b) == []
    assert admit(bm, b) == 0
    assert b.block_table[0] != a.block_table[0]
    bm.check_integrity()
    assert admit(bm, make_seq("c", [1, 2, 3, 4, 6])) == 4  # same tokens still hit


def test_cache_salt_isolates_identical_prompts():
    bm = BlockManager(16, BS)
    ids = list(range(9))
    admit(bm, make_seq("plain", ids))
    assert admit(bm, make_seq("t1", ids, salt="tenant-1")) == 0
    assert admit(bm, make_seq("t2", ids, salt="tenant-2")) == 0
    assert admit(bm, make_seq("t1b", ids, salt="tenant-1")) == 8
    assert admit(bm, make_seq("plain2", ids)) == 8
    bm.check_integrity()


def test_freed_prefix_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(6, BS)
    seqs = {n: make_seq(n, [i * 100 + j for j in range(8)]) for i, n in enumerate("abc")}
    for s in seqs.values():
        admit(bm, s)
    hashes = {n: list(s.block_hashes) for n, s in seqs.items()}
    bm.take_events()
    for n in "acb":
        bm.free(seqs[n])
    assert bm.num_free_blocks == 6
    # Three fresh blocks evict a's tail, a's head, c's tail (freed first, tail first).
    admit(bm, make_seq("new", [7] * 9))
    batch = bm.take_events()
    assert batch is not None
    removed = [ev for ev in batch.events if isinstance(ev, BlockRemoved)]
    assert removed == [BlockRemoved((hashes["a"][1], hashes["a"][0], hashes["c"][1]))]
    # b, freed last, is still whole in the cache.
    assert admit(bm, make_seq("b2", seqs["b"].token_ids + [1])) == 8
    bm.check_integrity()


def test_allocate_refuses_what_can_allocate_refuses_and_changes_nothing():
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(10)))
    admit(bm, a)
    b = make_seq("b", list(range(50, 60)))
    assert not bm.can_allocate(b, 10)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(b, 10)
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.check_integrity()


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_write():
    bm = BlockManager(8, BS)
    parent = make_seq("r", list(range(6)))
    admit(bm, parent)
    child = make_seq("r", list(range(6)), seq_id="r#1")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 6
    bm.check_integrity()
    child.token_ids.append(42)
    assert bm.can_allocate(child, 1)
    copies = bm.allocate(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    bm.check_integrity()
    bm.free(parent)
    bm.free(child)
    bm.check_integrity()
    assert bm.num_free_blocks == 8


def test_in_place_table_rewrites_bump_the_epoch_and_appends_do_not():
    """The decode graphs copy only appended block-table entries while ``table_rewrites``
    stands still (decode_graphs.py): copy-on-write and truncation must move it."""
    bm = BlockManager(16, BS)
    parent = make_seq("r", list(range(6)))
    admit(bm, parent)
    assert bm.table_rewrites == 0
    parent.token_ids.extend([7, 8, 9])
    bm.allocate(parent, 3)  # appends a block
    assert bm.table_rewrites == 0
    child = make_seq("r", list(parent.token_ids), seq_id="r#1")
    parent.num_computed_tokens = 9
    bm.fork(parent, child)  # a new list for the child: not an in-place rewrite
    assert bm.table_rewrites == 0
    child.token_ids.append(42)
    assert bm.allocate(child, 1)  # copy-on-write of the shared partial block
    assert bm.table_rewrites == 1
    parent.num_computed_tokens = 4  # speculative KV rejected past the first block
    bm.truncate(parent)
    assert bm.table_rewrites == 2 and len(parent.block_table) == 1
    bm.truncate(parent)  # nothing past the computed tokens: no rewrite
    assert bm.table_rewrites == 2


def test_copy_on_write_counts_as_a_needed_block():
    bm = BlockManager(2, BS)
    parent = make_seq("r", list(range(6)))
    admit(bm, parent)
    child = make_seq("r", list(range(6)), seq_id="r#1")
    bm.fork(parent, child)
    bm.allocate(child, 0)  # nothing to write: no copy
    child.token_ids.append(1)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(child, 1)  # the shared partial block needs a private copy
    with pytest.raises(OutOfBlocksError):
        bm.allocate(child, 1)
    bm.check_integrity()


def test_pin_and_unpin_a_lease():
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.pin("lease-1", a.block_table[:2])
    bm.free(a)
    bm.check_integrity()
    assert bm.num_free_blocks == 6 and bm.owners() == ["lease-1"]
    assert bm.unpin("lease-1") and not bm.unpin("lease-1")
    bm.check_integrity()
    assert bm.num_free_blocks == 8


def test_randomized_operations_keep_integrity_content_and_event_mirror():
    rng = random.Random(1234)
    num_blocks = 24
    bm = BlockManager(num_blocks, BS, worker_id="w0")
    kv: dict[int, list[int | None]] = {b: [None] * BS for b in range(num_blocks)}  # slot contents
    live: list[Sequence] = []
    leases: dict[str, list[int]] = {}
    mirror: set[bytes] = set()
    last_seq = 0
    stems = [[rng.randrange(50) for _ in range(rng.randint(4, 14))] for _ in range(4)]
    counter = 0
    stats = {"hits": 0, "forks": 0, "copies": 0, "oom": 0, "evictions": 0}

    def write(seq: Sequence, start: int, n: int) -> None:
        for p in range(start, start + n):
            kv[seq.block_table[p // BS]][p % BS] = seq.token_ids[p]

    def check_content() -> None:
        for s in live:
            for p in range(s.num_computed_tokens):
                assert kv[s.block_table[p // BS]][p % BS] == s.token_ids[p], (s.seq_id, p)

    for _ in range(2500):
        counter += 1
        op = rng.random()
        if op < 0.2 and len(live) < 10:
            stem = rng.choice(stems) if rng.random() < 0.8 else []
            toks = stem + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
            live.append(make_seq(f"s{counter}", toks, salt=rng.choice([None, None, "x"])))
        elif op < 0.65 and live:
            s = rng.choice(live)
            if s.num_computed_tokens == s.num_tokens:  # decode: one new token
                s.token_ids.append(rng.randrange(50))
            if s.num_tokens > 12 * BS:
                continue
            hits, ahead = bm.probe_prefix(s) if not s.block_table else ([], None)
            if not s.block_table:  # the probe memo returns what hashing every block does
                ref_hits, ref_ahead = probe_without_memo(bm, s)
                assert [b.block_id for b in hits] == [b.block_id for b in ref_hits]
                assert ahead == ref_ahead
            start = s.num_computed_tokens + len(hits) * BS
            n = rng.randint(1, s.num_tokens - start)
            if bm.can_allocate(s, n, hits):
                copies = bm.allocate(s, n, hits)
                stats["hits"] += len(hits)
                stats["copies"] += len(copies)
                for src, dst in copies:
                    kv[dst] = list(kv[src])
                write(s, start, n)
                s.num_computed_tokens = start + n
                bm.commit(s)
            else:
                stats["oom"] += 1
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(s, n, hits)
                if rng.random() < 0.5:  # preempt someone to make room
                    victim = rng.choice(live)
                    bm.free(victim)
                    live.remove(victim)
        elif op < 0.72 and live:
            s = rng.choice(live)
            if s.block_table:
                child = make_seq(s.request_id, s.token_ids, s.cache_salt, seq_id=f"{s.seq_id}/f{counter}")
                child.num_prompt_tokens = s.num_prompt_tokens
                bm.fork(s, child)
                live.append(child)
                stats["forks"] += 1
        elif op < 0.88 and live:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
        elif op < 0.94 and live:
            s = rng.choice(live)
            if s.block_table and len(leases) < 3:
                leases[f"lease{counter}"] = s.block_table[: rng.randint(1, len(s.block_table))]
                bm.pin(f"lease{counter}", leases[f"lease{counter}"])
        elif leases:
            owner = rng.choice(sorted(leases))
            assert bm.unpin(owner)
            del leases[owner]
        elif not live and rng.random() < 0.3:
            assert bm.pool.reset_prefix_cache()
        bm.check_integrity()
        check_content()
        batch = bm.take_events()
        if batch is not None:
            assert batch.seq == last_seq + 1 and batch.worker_id == "w0"
            last_seq = batch.seq
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    assert len(ev.token_ids) == BS * len(ev.block_hashes)
                    assert not mirror & set(ev.block_hashes)
                    mirror.update(ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    stats["evictions"] += len(ev.block_hashes)
                    mirror.difference_update(ev.block_hashes)
                else:
                    assert isinstance(ev, AllBlocksCleared)
                    mirror.clear()
        assert mirror == bm.pool.cached_hashes()
        # Every cached block's remembered tokens are really what its slots hold.
        for blk in bm.pool.cached.values():
            assert tuple(kv[blk.block_id]) == unpack_tokens(blk.tokens)

    for s in live:
        bm.free(s)
    for owner in list(leases):
        bm.unpin(owner)
    bm.check_integrity()
    assert bm.num_free_blocks == num_blocks and bm.owners() == []
    # The run exercised every path it claims to test.
    assert all(v > 10 for v in stats.values()), stats
    assert bm.memo.blocks_reused > 10  # prompts on a shared stem took blocks from the probe memo


def test_probe_memo_hashes_a_shared_prefix_once_and_answers_like_a_full_probe():
    bm = BlockManager(num_blocks=64, block_size=BS)
    system = list(range(100, 124))  # 6 blocks
    admit(bm, make_seq("first", system + [1, 2, 3, 4, 5]))
    for i in range(5):
        seq = make_seq(f"q{i}", system + [50 + i] * (5 + i))
        before = bm.memo.blocks_reused
        hits, ahead = bm.probe_prefix(seq)
        assert [b.block_id for b in hits] == [b.block_id for b in probe_without_memo(bm, seq)[0]]
        assert ahead == probe_without_memo(bm, seq)[1]
        assert len(hits) == 6
        assert bm.memo.blocks_reused - before == (0 if i == 0 else 6)  # the first probe fills it
    # another salt never shares a memo (nor blocks)
    assert bm.probe_prefix(make_seq("other", system + [9] * 5, salt="t"))[0] == []
    # a prompt that begins alike and then differs takes the common blocks, hashes the rest
    variant = system[:8] + [7] * 20
    admit(bm, make_seq("variant", variant))
    hits, _ = bm.probe_prefix(make_seq("v2", variant + [1]))
    assert [b.block_id for b in hits] == [b.block_id for b in probe_without_memo(bm, make_seq("v", variant + [1]))[0]]
    assert len(hits) == 7
    assert len(bm.memo) == 2  # both variants kept under the same first block
    bm.check_integrity()


def test_probe_memo_never_returns_an_evicted_or_recached_block():
    bm = BlockManager(num_blocks=12, block_size=BS)
    system = list(range(200, 216))  # 4 blocks
    a = make_seq("a", system + [1])
    admit(bm, a)
    old = [b.block_id for b in bm.probe_prefix(make_seq("b", system + [2]))[0]]
    assert len(old) == 4
    bm.free(a)  # cached, unreferenced: the next allocation evicts them
    taken = bm.pool.allocate(bm.pool.num_free)
    bm.pool.free(taken)  # free again, uncached: the old blocks now sit at the back
    # the same content cached again (no probe in between: the memo still names the old
    # blocks), in blocks taken from the other end of the free list
    e = make_seq("e", system + [4])
    bm.allocate(e, e.num_tokens)
    e.num_computed_tokens = e.num_tokens
    bm.commit(e)
    seq = make_seq("f", system + [5])
    hits = bm.probe_prefix(seq)[0]
    assert [b.block_id for b in hits] == e.block_table[:4] != old
    assert [b.block_id for b in hits] == [b.block_id for b in probe_without_memo(bm, seq)[0]]
    # evicted and not cached again: no hit
    bm.free(e)
    bm.pool.free(bm.pool.allocate(bm.pool.num_free))
    assert bm.probe_prefix(make_seq("g", system + [6]))[0] == []
    bm.check_integrity()


def test_probe_memo_is_bounded_by_tokens():
    from pdserve.workers.probe_memo import ProbeMemo, common_blocks

    assert common_blocks([1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 5, 6], 3, 2) == 1
    assert common_blocks([1, 2, 3, 4], [1, 2, 3, 4], 2, 2) == 2
    assert common_blocks([1, 2], [0, 2], 1, 2) == 0
    bm = BlockManager(num_blocks=256, block_size=BS)
    bm.memo = ProbeMemo(BS, max_tokens=40)
    for i in range(10):  # ten prompts of 4 cached blocks each, each its own first block
        p = [1000 * i + j for j in range(16)]
        admit(bm, make_seq(f"p{i}", p + [1]))
        assert len(bm.probe_prefix(make_seq(f"x{i}", p + [2]))[0]) == 4
    assert bm.memo._tokens <= 40 and len(bm.memo) == 2
