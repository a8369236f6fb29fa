"""Tests of pdserve.workers.scheduler, driven without a model: the test plays the runner."""

from __future__ import annotations

import random

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.scheduler import Scheduler, SchedulerConfig
from pdserve.workers.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(name: str, n: int, priority: int = 0, arrival: float = 0.0, max_tokens: int = 4,
             first: int = 0) -> Sequence:
    return Sequence(request_id=name, token_ids=list(range(first, first + n)), num_prompt_tokens=n,
                    params=SamplingParams(max_tokens=max_tokens), arrival=arrival, priority=priority)


def make(num_blocks: int = 64, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, BS))


def run_step(sched: Scheduler, out) -> list[Sequence]:
    """Play the runner and the engine: advance counts, append a token to samplers, finish some."""
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.finish_step(out.scheduled)
    done = []
    for seq in samplers:
        seq.token_ids.append(1000 + seq.num_output_tokens)
        if seq.num_output_tokens >= seq.params.max_tokens:
            seq.status = SequenceStatus.FINISHED
            sched.remove(seq)
            done.append(seq)
    return done


def test_waiting_queue_admits_by_priority_then_arrival():
    sched = make(max_num_seqs=1)
    order = [("low-early", 5, 1.0), ("high-late", -1, 9.0), ("mid-b", 0, 3.0),
             ("mid-a", 0, 2.0), ("high-early", -1, 4.0), ("mid-a-tie", 0, 2.0)]
    for name, prio, arr in order:
        sched.add(make_seq(name, 3, prio, arr, max_tokens=1))
    admitted = []
    while sched.has_work():
        out = sched.schedule()
        admitted += [s.seq.request_id for s in out.scheduled if s.seq.num_computed_tokens == 0]
        run_step(sched, out)
        sched.bm.check_integrity()
    # Equal (priority, arrival) keeps insertion order.
    assert admitted == ["high-early", "high-late", "mid-a", "mid-a-tie", "mid-b", "low-early"]


def test_one_step_admits_everything_that_fits_in_priority_order():
    sched = make(max_num_batched_tokens=100)
    for i, prio in enumerate([3, 1, 2, 0]):
        sched.add(make_seq(f"p{prio}", 5, prio, arrival=float(i), first=10 * i))  # unrelated
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["p0", "p1", "p2", "p3"]
    assert out.num_tokens == 20 and all(s.samples for s in out.scheduled)


def test_token_budget_and_chunk_cap_split_long_prompts():
    sched = make(max_num_batched_tokens=10, long_prefill_token_threshold=6)
    a, b = make_seq("a", 15, arrival=0), make_seq("b", 8, arrival=1, first=100)
    sched.add(a)
    sched.add(b)
    plan = []
    while a.num_output_tokens == 0 or b.num_output_tokens == 0:
        out = sched.schedule()
        assert out.num_tokens <= 10
        plan.append([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled])
        run_step(sched, out)
    assert plan[:3] == [[("a", 6), ("b", 4)], [("a", 6), ("b", 4)], [("a", 3), ("b", 1)]]


def test_preemption_recomputes_the_newest_lowest_priority_sequence():
    # 6 blocks of 4 tokens; two 8-token prompts fill 4, decoding soon needs more.
    sched = make(num_blocks=6, max_num_batched_tokens=64)
    old, new = make_seq("old", 8, arrival=0, max_tokens=12), make_seq("new", 8, arrival=1,
                                                                      max_tokens=12, first=50)
    sched.add(old)
    sched.add(new)
    preempted = []
    while sched.has_work():
        out = sched.schedule()
        preempted += [s.request_id for s in out.preempted]
        for p in out.preempted:
            assert p.block_table == [] and p.num_computed_tokens == 0
            assert p.status is SequenceStatus.WAITING
        run_step(sched, out)
        sched.bm.check_integrity()
    assert preempted and set(preempted) == {"new"}
    assert sched.num_preemptions == len(preempted) and new.num_preemptions == len(preempted)
    assert old.num_output_tokens == new.num_output_tokens == 12
    assert sched.bm.num_free_blocks == 6


def test_remove_frees_blocks_from_any_queue():
    sched = make(num_blocks=16, long_prefill_token_threshold=4)
    bm = sched.bm
    waiting, chunking, decoding = (make_seq("w", 9), make_seq("c", 12, first=20),
                                   make_seq("d", 3, first=40))
    sched.add(decoding)
    run_step(sched, sched.schedule())
    sched.add(chunking)
    run_step(sched, sched.schedule())
    assert decoding.num_output_tokens == 2 and 0 < chunking.num_computed_tokens < 12
    sched.add(waiting)
    for seq in (waiting, chunking, decoding):
        sched.remove(seq)
        bm.check_integrity()
    assert not sched.has_work() and bm.num_free_blocks == 16 and bm.owners() == []


def play_kv(content: dict[int, list], out) -> None:
    """Play the runner's cache: copies, then every new token's K/V into its slot; then check
    that each row reads its own tokens at every position it attends to (cache hits, blocks
    ridden while another row fills them in this step, its own)."""
    for src, dst in out.block_copies:
        content[dst] = list(content[src])
    for s in out.scheduled:
        seq, c = s.seq, s.seq.num_computed_tokens
        for p in range(c, c + s.num_new_tokens):
            content.setdefault(seq.block_table[p // BS], [None] * BS)[p % BS] = seq.token_ids[p]
    for s in out.scheduled:
        seq = s.seq
        read = [content.get(seq.block_table[p // BS], [None] * BS)[p % BS]
                for p in range(seq.num_computed_tokens + s.num_new_tokens)]
        assert read == seq.token_ids[:len(read)], seq.request_id


def test_randomized_load_respects_budget_slots_and_frees_everything():
    rng = random.Random(7)
    cfg = dict(max_num_seqs=5, max_num_batched_tokens=24, long_prefill_token_threshold=10)
    sched = make(num_blocks=20, **cfg)
    live: list[Sequence] = []
    content: dict[int, list] = {}
    pool_allocate = sched.bm.pool.allocate

    def allocate(n: int):  # a block handed out holds nothing yet: a read before a write fails
        got = pool_allocate(n)
        for b in got:
            content.pop(b.block_id, None)
        return got

    sched.bm.pool.allocate = allocate
    finished = 0
    for step in range(600):
        if step < 450 and rng.random() < 0.3:
            s = make_seq(f"r{step}", rng.randint(1, 40), rng.randint(0, 2), float(step),
                         max_tokens=rng.randint(1, 20), first=rng.choice([0, 0, 500 + step]))
            sched.add(s)
            live.append(s)
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            sched.remove(victim)
        out = sched.schedule()
        assert out.num_tokens <= cfg["max_num_batched_tokens"]
        assert sched.num_running <= cfg["max_num_seqs"]
        for s in out.scheduled:
            assert 1 <= s.num_new_tokens <= cfg["long_prefill_token_threshold"]
            assert s.seq.status is SequenceStatus.RUNNING
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        play_kv(content, out)
        for seq in run_step(sched, out):
            live.remove(seq)
            finished += 1
        sched.bm.check_integrity()
    assert not sched.has_work() and not live and finished > 50
    assert sched.bm.num_free_blocks == 20 and sched.num_preemptions > 0
    assert sched.bm.blocks_ridden > 0 and sched.bm.prefix_hits > 0


def test_a_burst_sharing_an_uncached_prefix_computes_it_once_in_one_step():
    """Requests that would compute the same two or more new blocks side by side: the first
    computes them, the others ride them in the same step (take its blocks, compute only
    their tails); an unrelated one is not touched. After the step the riders' chains are
    the writer's, without a second registration."""
    sched = make(max_num_batched_tokens=200)
    shared = list(range(500, 512))  # three full blocks of BS = 4
    for i in range(3):
        sched.add(Sequence(request_id=f"s{i}", token_ids=shared + [600 + i] * 3,
                           num_prompt_tokens=15, params=SamplingParams(max_tokens=2),
                           arrival=float(i)))
    sched.add(make_seq("other", 15, arrival=9.0, first=700))
    out = sched.schedule()
    by_id = {s.seq.request_id: s for s in out.scheduled}
    assert list(by_id) == ["s0", "s1", "s2", "other"]
    assert by_id["s0"].num_new_tokens == 15 and by_id["other"].num_new_tokens == 15
    s0 = by_id["s0"].seq
    for rid in ("s1", "s2"):  # the three shared blocks are s0's; each computes its tail
        s = by_id[rid]  # (computed in this step: not counted as cached tokens)
        assert s.seq.num_cached_tokens == 0 and s.num_new_tokens == 3
        assert s.seq.num_ridden_tokens == 12
        assert s.seq.block_table[:3] == s0.block_table[:3]
        assert s.seq.block_table[3] != s0.block_table[3]
    assert sched.bm.blocks_ridden == 6
    sched.bm.check_integrity()
    run_step(sched, out)
    for rid in ("s1", "s2"):
        assert by_id[rid].seq.block_hashes == s0.block_hashes[:3]
    assert len(sched.bm.pool.cached) == 6  # s0's three (the riders add none) and other's
    sched.bm.check_integrity()


def test_a_rider_waits_for_a_chunked_prompt_then_rides_its_last_chunk():
    """The writer fills the shared blocks over three chunks: the rider waits while the
    next shared block is still to come, then rides the chunk that ends the shared part,
    finishing its prompt in the same step as the writer."""
    sched = make(max_num_batched_tokens=200, long_prefill_token_threshold=8)
    shared = list(range(500, 524))  # six full blocks
    seqs = [Sequence(request_id=f"s{i}", token_ids=shared + [600 + i] * 3, num_prompt_tokens=27,
                     params=SamplingParams(max_tokens=2), arrival=float(i)) for i in range(2)]
    for s in seqs:
        sched.add(s)
    for step in range(2):
        out = sched.schedule()
        assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("s0", 8)], step
        run_step(sched, out)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("s0", 8), ("s1", 3)]
    # four blocks cached by now, two ridden
    assert seqs[1].num_cached_tokens == 16 and seqs[1].block_table[:6] == seqs[0].block_table[:6]
    assert seqs[1].num_ridden_tokens == 8
    run_step(sched, out)
    assert seqs[1].block_hashes[:6] == seqs[0].block_hashes[:6]
    sched.bm.check_integrity()


def test_a_longer_shared_prefix_is_ridden_off_the_first_rider():
    """A = S+x, B = S+T+y, C = S+T+z in one step: B rides S off A and computes T; C rides S
    off A and T off B (T computed once); D, on S and another salt, shares nothing."""
    sched = make(max_num_batched_tokens=200)
    s, t = list(range(500, 512)), list(range(700, 712))  # three blocks each
    prompts = {"A": s + [1, 2, 3], "B": s + t + [4, 5, 6], "C": s + t + [7, 8, 9]}
    for i, (rid, ids) in enumerate(prompts.items()):
        sched.add(Sequence(request_id=rid, token_ids=ids, num_prompt_tokens=len(ids),
                           params=SamplingParams(max_tokens=2), arrival=float(i)))
    sched.add(Sequence(request_id="D", token_ids=s + [1, 2, 3], num_prompt_tokens=15,
                       params=SamplingParams(max_tokens=2), arrival=9.0, cache_salt="tenant-2"))
    out = sched.schedule()
    got = {x.seq.request_id: x for x in out.scheduled}
    a, b, c, d = (got[r].seq for r in "ABCD")
    assert [got[r].num_new_tokens for r in "ABCD"] == [15, 15, 3, 15]
    assert b.block_table[:3] == c.block_table[:3] == a.block_table[:3]
    assert c.block_table[3:6] == b.block_table[3:6]
    assert not set(d.block_table) & set(a.block_table + b.block_table)
    assert sched.bm.blocks_ridden == 3 + 6
    play_kv({}, out)
    run_step(sched, out)
    assert c.block_hashes == b.block_hashes[:6] and c.block_hashes[:3] == a.block_hashes
    assert d.block_hashes != a.block_hashes
    sched.bm.check_integrity()


def test_one_shared_block_is_not_worth_a_step():
    sched = make(max_num_batched_tokens=200)
    for i in range(2):  # one shared full block, then different
        sched.add(Sequence(request_id=f"s{i}", token_ids=[1, 2, 3, 4] + [10 * i + 5] * 8,
                           num_prompt_tokens=12, params=SamplingParams(max_tokens=2),
                           arrival=float(i)))
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["s0", "s1"]


def _held_scene(**cfg) -> tuple[Scheduler, list[Sequence], Sequence]:
    """s0 fills six shared blocks over chunks of 8 tokens; s1 shares them and is held back
    for them; ``low``, of lower priority and sharing nothing, arrives after both."""
    sched = make(long_prefill_token_threshold=8, **cfg)
    shared = list(range(500, 524))
    seqs = [Sequence(request_id=f"s{i}", token_ids=shared + [600 + i] * 8, num_prompt_tokens=32,
                     params=SamplingParams(max_tokens=2), arrival=float(i)) for i in range(2)]
    low = make_seq("low", 8, priority=1, arrival=2.0, max_tokens=2, first=900)
    for s in (*seqs, low):
        sched.add(s)
    return sched, seqs, low


def test_a_held_request_keeps_its_sequence_slot_from_lower_priority_ones():
    sched, (s0, s1), low = _held_scene(max_num_seqs=2, max_num_batched_tokens=200)
    order = []
    while sched.has_work():
        out = sched.schedule()
        order += [s.seq.request_id for s in out.scheduled if s.seq.request_id not in order]
        run_step(sched, out)
    assert order == ["s0", "s1", "low"]
    assert s1.num_ridden_tokens == 8  # it waited for s0's chunks and rode the last one
    sched.bm.check_integrity()


def test_a_held_request_keeps_the_blocks_of_its_first_chunk_from_lower_priority_ones():
    # s0's first chunk takes 2 of 5 blocks; s1's own 8 tokens need 2; low's need 2
    sched, (s0, s1), low = _held_scene(num_blocks=5, max_num_batched_tokens=200)
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["s0"]
    assert sched.bm.num_free_blocks == 3 and low.status == SequenceStatus.WAITING
    # without s1 held back, low fits beside s0
    sched, (s0, s1), low = _held_scene(num_blocks=5, max_num_batched_tokens=200)
    sched.remove(s1)
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["s0", "low"]
