"""Tests of session pins (workers/block_manager.py) and their wiring through the engine: a
finished turn's blocks stay for the next turn, expire after the session TTL, and are given up
before any running work is preempted."""

from __future__ import annotations

import time

import pytest

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.disagg_engine import seq_from_state, state_of
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.scheduler import Scheduler, SchedulerConfig
from pdserve.workers.sequence import Sequence, SequenceStatus

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_seq(name: str, tokens: list[int], session: str | None = None,
             max_tokens: int = 16) -> Sequence:
    return Sequence(request_id=name, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    params=SamplingParams(max_tokens=max_tokens), arrival=0.0, session_id=session)


def run_turn(bm: BlockManager, seq: Sequence, num_output: int) -> None:
    """Prefill, decode ``num_output`` tokens (the last one never computed), finish, free."""
    hits = bm.match_prefix(seq)
    n = seq.num_tokens - len(hits) * BS
    assert bm.can_allocate(seq, n, hits)
    bm.allocate(seq, n, hits)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    for i in range(num_output):
        seq.token_ids.append(500 + i)
        if i < num_output - 1:
            assert bm.can_allocate(seq, 1)
            bm.allocate(seq, 1)
            seq.num_computed_tokens += 1
            bm.commit(seq)
    seq.status = SequenceStatus.FINISHED
    bm.free(seq)
    bm.check_integrity()


def churn(bm: BlockManager, first: int, rounds: int) -> None:
    """Unrelated requests that cycle through every free block."""
    for r in range(rounds):
        s = make_seq(f"churn{first}-{r}", [first + r * 1000 + j for j in range(bm.num_free_blocks * BS)])
        run_turn(bm, s, 0)


def test_a_session_keeps_its_last_turn_cached_for_a_prefix_hit_on_the_next_turn():
    bm = BlockManager(12, BS)
    turn1 = make_seq("t1", list(range(10)), session="chat")
    run_turn(bm, turn1, 7)  # 16 tokens computed: 4 full blocks; the 17th has no KV yet
    assert bm.owners() == ["session:chat"] and bm.num_sessions == 1
    assert bm.num_free_blocks == 12 - 4
    history = list(turn1.token_ids)
    churn(bm, 10_000, 3)  # would evict an unpinned turn (see the control below)
    turn2 = make_seq("t2", history + [7, 8, 9], session="chat")
    assert len(bm.match_prefix(turn2)) == 4
    run_turn(bm, turn2, 5)  # 24 computed: the pin moves to turn 2's 6 full blocks
    assert bm.owners() == ["session:chat"] and bm.num_free_blocks == 12 - 6
    # Control: without a session the same churn leaves no hit.
    bm2 = BlockManager(12, BS)
    run_turn(bm2, make_seq("t1", list(range(10))), 7)
    churn(bm2, 10_000, 3)
    assert bm2.match_prefix(make_seq("t2", history + [7, 8, 9])) == []


def test_the_pin_goes_on_the_block_each_hash_resolves_to():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(12)))  # keeps running
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.commit(a)
    # Same prompt: a prefix hit leaves the last block to compute, so the session's third
    # block is a private copy; the pin goes on a's block, the one a lookup finds.
    run_turn(bm, make_seq("b", list(range(12)), session="s"), 1)
    assert [bm.pool.blocks[i].ref_count for i in a.block_table] == [2, 2, 2]
    assert bm.num_free_blocks == 16 - 3


def test_sessions_expire_after_their_ttl_least_recently_used_first():
    clock = Clock()
    bm = BlockManager(32, BS, session_ttl_seconds=100.0, clock=clock)
    s1 = make_seq("a1", list(range(8)), session="s1")
    run_turn(bm, s1, 1)
    clock.t = 50
    run_turn(bm, make_seq("b1", list(range(100, 108)), session="s2"), 1)
    clock.t = 60
    run_turn(bm, make_seq("a2", s1.token_ids + [1, 2, 3, 4], session="s1"), 1)  # refreshes s1
    bm.expire(now=149.0)
    assert bm.num_sessions == 2
    bm.expire(now=150.0)
    assert bm.owners() == ["session:s1"]
    cached = bm.pool.cached_hashes()
    bm.expire(now=160.0)
    assert bm.owners() == [] and bm.num_free_blocks == 32
    assert bm.pool.cached_hashes() == cached  # unpinned blocks stay cached until evicted
    bm.check_integrity()


def test_aborted_and_preempted_sequences_pin_nothing():
    bm = BlockManager(16, BS)
    seq = make_seq("a", list(range(9)), session="s")
    bm.allocate(seq, 9)
    seq.num_computed_tokens = 9
    bm.commit(seq)
    seq.status = SequenceStatus.RUNNING  # a preemption or an abort frees it while running
    bm.free(seq)
    assert bm.owners() == [] and bm.num_free_blocks == 16


def test_session_pins_are_dropped_instead_of_preempting_running_work():
    bm = BlockManager(10, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    run_turn(bm, make_seq("old", list(range(24)), session="s"), 1)  # pins 6 blocks
    assert bm.num_free_blocks == 4
    sched.add(make_seq("long", list(range(100, 112)), max_tokens=20))  # grows to 8 blocks
    while sched.has_work():
        out = sched.schedule()
        assert not out.preempted
        samplers = [s.seq for s in out.scheduled if s.samples]
        sched.finish_step(out.scheduled)
        for seq in samplers:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                seq.status = SequenceStatus.FINISHED
                sched.remove(seq)
        bm.check_integrity()
    assert sched.num_preemptions == 0 and bm.num_sessions == 0 and bm.num_sessions_dropped == 1


def test_a_waiting_request_may_take_a_sessions_room_too():
    bm = BlockManager(8, BS)
    run_turn(bm, make_seq("old", list(range(16)), session="s"), 1)  # pins 4 blocks
    seq = make_seq("big", list(range(100, 128)))  # 7 blocks
    assert bm.can_allocate(seq, 28) and bm.num_sessions == 0


def test_a_request_too_big_even_for_the_pinned_room_drops_no_pin():
    """Pins are given up only when that makes the room: a request that would not fit with
    every pin dropped takes none of them (nothing would be admitted for the loss). A block
    two sessions pin comes free only with both dropped."""
    bm = BlockManager(12, BS)
    run_turn(bm, make_seq("a", list(range(16)), session="s1"), 1)  # pins 4 blocks
    run_turn(bm, make_seq("b", list(range(16)) + list(range(50, 58)), session="s2"), 1)
    assert bm.num_sessions == 2 and bm.num_free_blocks == 6  # s2 shares s1's 4, adds 2
    too_big = make_seq("big", list(range(100, 100 + 13 * BS)))  # 13 blocks: 12 at most
    assert not bm.can_allocate(too_big, 13 * BS)
    assert bm.num_sessions == 2 and bm.num_sessions_dropped == 0
    assert not bm.can_allocate(make_seq("r", list(range(200, 240))), 40, reserve=3)  # 10 + 3
    assert bm.num_sessions == 2 and bm.num_sessions_dropped == 0
    fits = make_seq("fits", list(range(300, 300 + 8 * BS)))  # 8 blocks: both pins must go
    assert bm.can_allocate(fits, 8 * BS)
    assert bm.num_sessions == 0 and bm.num_sessions_dropped == 2 and bm.num_free_blocks == 12
    bm.check_integrity()


def test_a_next_turn_that_hits_its_own_pinned_blocks_counts_them_once():
    """The session's next turn hits the blocks its pin holds: dropping the pin frees them
    only to be taken again as hits, so they make no room. 2 free + 4 pinned of 6: a turn
    that hits the 4 and needs 3 more does not fit, and keeps its pin; one that needs 2 fits
    without dropping it."""
    bm = BlockManager(6, BS)
    first = list(range(16))
    run_turn(bm, make_seq("t1", first, session="s"), 1)  # pins 4 blocks
    assert bm.num_free_blocks == 2 and bm.num_sessions == 1
    too_long = make_seq("t2", first + list(range(100, 112)), session="s")  # 4 hits + 3 blocks
    hits = bm.match_prefix(too_long)
    assert len(hits) == 4
    assert not bm.can_allocate(too_long, 12, hits)
    assert bm.num_sessions == 1 and bm.num_sessions_dropped == 0
    fits = make_seq("t2", first + list(range(100, 108)), session="s")  # 4 hits + 2 blocks
    assert bm.can_allocate(fits, 8, bm.match_prefix(fits))
    assert bm.num_sessions == 1 and bm.num_sessions_dropped == 0
    bm.check_integrity()


def test_a_pinned_block_a_running_sequence_holds_makes_no_room():
    """Dropping a pin frees only the blocks nothing else holds: a running sequence that
    shares the session's blocks keeps them."""
    bm = BlockManager(8, BS)
    first = list(range(16))
    run_turn(bm, make_seq("t1", first, session="s"), 1)  # pins 4 blocks
    running = make_seq("run", first + [7, 7, 7, 7])  # shares the 4, adds 1
    hits = bm.match_prefix(running)
    assert bm.can_allocate(running, 4, hits)
    bm.allocate(running, 4, hits)
    assert bm.num_free_blocks == 3 and bm.num_sessions == 1
    # 4 blocks wanted, 3 free, and the pin holds no block only it holds: no room, pin kept
    assert not bm.can_allocate(make_seq("big", list(range(200, 216))), 16)
    assert bm.num_sessions == 1 and bm.num_sessions_dropped == 0
    assert bm.can_allocate(make_seq("small", list(range(200, 212))), 12)  # 3 fit as they are
    assert bm.num_sessions == 1
    bm.check_integrity()


def test_the_handoff_state_carries_the_session():
    seq = make_seq("r", list(range(5)), session="chat-7")
    assert seq_from_state(state_of(seq)).session_id == "chat-7"


# ---- through the engine (tiny random Llama) -------------------------------------------------


@pytest.fixture
def engine(engine_factory, tiny_model_factory):
    eng = engine_factory(tiny_model_factory("llama"), num_blocks=12, worker_id="sessions")
    yield eng
    for owner in eng.block_manager.owners():
        eng.block_manager.unpin(owner)
    assert eng.block_manager.pool.reset_prefix_cache()


def run_one(engine, run_engine, request_id: str, ids: list[int], max_tokens: int,
            session: str | None = None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(request_id, params=params, prompt_token_ids=ids, session_id=session)
    chunks = run_engine(engine)[request_id]
    assert chunks[-1].finished
    return [t for c in chunks for t in c.token_ids], chunks[-1]


@pytest.mark.parametrize("session", [None, "chat"])
def test_engine_turn_two_hits_the_pinned_turn_one(engine, run_engine, session):
    base = 1000 if session else 2000
    prompt = [base + i for i in range(40)]
    out, _ = run_one(engine, run_engine, "turn1", prompt, 10, session)
    assert engine.block_manager.num_sessions == (1 if session else 0)
    preemptions = engine.scheduler.num_preemptions
    for i in range(2):  # two unrelated 9-block requests: under LRU they evict turn 1
        filler = [base + 100 * (i + 1) + j for j in range(130)]
        run_one(engine, run_engine, f"filler{i}", filler, 10)
    _, last = run_one(engine, run_engine, "turn2", prompt + out + [5, 6, 7], 4, session)
    # Turn 1 computed 40 + 9 tokens: 3 full blocks of 16.
    assert last.usage.cached_tokens == (48 if session else 0)
    assert engine.scheduler.num_preemptions == preemptions


def test_engine_housekeeping_expires_idle_sessions(engine, run_engine, monkeypatch):
    run_one(engine, run_engine, "t", [3000 + i for i in range(20)], 4, "s")
    engine.step()  # housekeeping with the real clock: not yet
    assert engine.block_manager.owners() == ["session:s"]
    ttl = engine.config.session_ttl_seconds
    monkeypatch.setattr(engine.block_manager.pool, "clock", lambda: time.monotonic() + ttl + 1)
    engine.step()
    assert engine.block_manager.owners() == []


def test_engine_drops_a_session_instead_of_preempting(engine, run_engine):
    run_one(engine, run_engine, "t", [4000 + i for i in range(40)], 10, "s")  # pins 3 blocks
    preemptions = engine.scheduler.num_preemptions
    # 8 blocks at admission (9 are free), 12 by the end: the session's room is needed.
    out, _ = run_one(engine, run_engine, "long", [5000 + i for i in range(120)], 60)
    assert len(out) == 60
    assert engine.scheduler.num_preemptions == preemptions
    assert engine.block_manager.num_sessions == 0


@pytest.mark.parametrize("bad", ["", 7])
def test_engine_refuses_a_bad_session_id(engine, bad):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("x", prompt_token_ids=[1, 2, 3], session_id=bad)
    assert e.value.field == "session_id"
