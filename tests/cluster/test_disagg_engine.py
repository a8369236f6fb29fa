"""The P/D side of the engine (workers/disagg_engine.py) without Ray: leases on a prefill's
blocks, export and import of blocks, reserve/complete on the decode side, lease expiry, and
the asyncio Worker's handling of an abort or a cancel in the middle of a handoff.

Engines share one loaded SmolLM2 (only their KV caches differ); greedy outputs are compared
with the single-process engine and transformers (the session's ``reference``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from pd_util import GREEDY, PROMPTS, Reference

from pdserve.workers import engine as engine_mod
from pdserve.workers.config import EngineConfig
from pdserve.workers.disagg_engine import DisaggEngine
from pdserve.workers.errors import InvalidRequestError, OutOfBlocksError
from pdserve.workers.kv_events import BlockStored
from pdserve.workers.models.loader import load_model
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.worker import Worker

BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0)  # to fill a cache: the output is not checked


@pytest.fixture(scope="module")
def shared(smollm2_path: Path):
    return load_model(smollm2_path, "float32", "cpu"), engine_mod.load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def make(shared, smollm2_path: Path):
    """``make(worker_id, num_blocks=64, lease_seconds=30) -> DisaggEngine`` on the shared model."""
    model, tok = shared

    def make(worker_id: str, num_blocks: int = 64, lease_seconds: float = 30.0) -> DisaggEngine:
        with mock.patch.object(engine_mod, "load_model", return_value=model):
            return DisaggEngine(EngineConfig(worker_id=worker_id, num_blocks=num_blocks),
                                smollm2_path, tokenizer=tok, lease_seconds=lease_seconds)

    return make


def run(engine: DisaggEngine, max_steps: int = 500) -> dict[str, list[TokenChunk]]:
    """Step until idle, checking integrity after every step."""
    out: dict[str, list[TokenChunk]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for c in engine.step():
            out.setdefault(c.request_id, []).append(c)
        engine.check_integrity()
    raise AssertionError("engine still busy")


def prefill(p: DisaggEngine, requests: dict[str, list[int]], params: SamplingParams = GREEDY):
    """Prefill-only on ``p``; returns {rid: (first chunk, lease)}."""
    for rid, ids in requests.items():
        p.add_request(rid, prompt_token_ids=ids, params=params, prefill_only=True)
    chunks = run(p)
    out = {}
    for rid in requests:
        (first,) = chunks[rid]
        assert len(first.token_ids) == 1 and not first.finished
        lease = p.lease_for(rid)
        assert lease is not None and rid not in p.requests
        out[rid] = (first, lease)
    return out


def hand_off(p: DisaggEngine, d: DisaggEngine, leases: dict) -> dict[str, int]:
    """reserve on d, export from p from the first missing block, release, complete."""
    starts = {}
    for rid, (_, lease) in leases.items():
        start = d.reserve(lease.state, lease.handle.num_tokens)
        payload = p.export_lease(lease.lease_id, start) if start < lease.handle.num_blocks else None
        assert p.release_lease(lease.lease_id)
        assert d.complete(rid, start, payload, lease.handle.num_tokens)
        starts[rid] = start
    return starts


def free_and_clean(e: DisaggEngine) -> None:
    e.check_integrity()
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    assert not e.leases and not e.reserved and not e.requests
    assert e.block_manager.owners() == []


def test_handoff_output_equals_the_single_engine(make, reference: Reference) -> None:
    p, d = make("p"), make("d")
    leases = prefill(p, {f"r{i}": reference.prompt_ids[q] for i, q in enumerate(PROMPTS)})
    for _rid, (_, lease) in leases.items():
        h = lease.handle
        assert h.worker_id == "p" and h.lease_id == f"p:{_rid}"
        assert h.num_blocks == -(-h.num_tokens // BS) == len(lease.block_ids)
        assert p.block_manager.owners().count(lease.lease_id) == 1
    pinned = sum(lease.handle.num_blocks for _, lease in leases.values())
    assert p.block_manager.num_free_blocks == p.block_manager.num_blocks - pinned

    assert set(hand_off(p, d, leases).values()) == {0}  # d's cache was cold
    free_and_clean(p)
    out = run(d)
    for i, q in enumerate(PROMPTS):
        first, _ = leases[f"r{i}"]
        reference.check(q, [*first.token_ids, *(t for c in out[f"r{i}"] for t in c.token_ids)])
        assert out[f"r{i}"][-1].usage.prompt_tokens == len(reference.prompt_ids[q])
    free_and_clean(d)


def test_blocks_cached_on_the_decode_side_are_not_pulled_again(make, reference: Reference) -> None:
    p, d = make("p"), make("d")
    q = PROMPTS[2]
    ids = reference.prompt_ids[q]
    assert len(ids) > 3 * BS
    hand_off(p, d, prefill(p, {"a": ids}, SamplingParams(max_tokens=2, temperature=0.0)))
    run(d)
    # Same prompt again: the prefill worker hits its own cache, the decode worker holds every
    # full block, so only the last (partial) block crosses.
    leases = prefill(p, {"b": ids})
    assert leases["b"][1].state.num_cached_tokens == (len(ids) - 1) // BS * BS
    (start,) = hand_off(p, d, leases).values()
    assert start == len(ids) // BS
    out = run(d)
    reference.check(q, [*leases["b"][0].token_ids, *(t for c in out["b"] for t in c.token_ids)])
    assert out["b"][-1].usage.cached_tokens == (len(ids) - 1) // BS * BS
    free_and_clean(p)
    free_and_clean(d)


def test_a_prompt_prefilled_beside_its_twin_rides_it_and_hands_off_exactly(make, reference) -> None:
    """The same prompt twice in one prefill step: the second takes the first one's blocks as
    they are filled (riding; its lease says how many tokens it did not compute, and none
    counts as cached), both leases share them, and both hand off to the same tokens."""
    p, d = make("p"), make("d")
    assert p.block_manager.pool.reset_prefix_cache()
    q = PROMPTS[2]
    ids = reference.prompt_ids[q]
    leases = prefill(p, {"a": ids, "b": ids})
    full = (len(ids) - 1) // BS * BS
    assert leases["a"][1].ridden_tokens == 0
    assert leases["b"][1].ridden_tokens == full and leases["b"][1].state.num_cached_tokens == 0
    shared = full // BS
    assert leases["b"][1].block_ids[:shared] == leases["a"][1].block_ids[:shared]
    hand_off(p, d, leases)
    free_and_clean(p)
    out = run(d)
    for rid in ("a", "b"):
        reference.check(q, [*leases[rid][0].token_ids, *(t for c in out[rid] for t in c.token_ids)])
    free_and_clean(d)


def test_a_fully_cached_prompt_is_admitted_without_pull_or_recompute(make, reference) -> None:
    p, d = make("p"), make("d")
    ids = reference.prompt_ids[PROMPTS[2]][: 2 * BS]  # exactly two full blocks
    short = SamplingParams(max_tokens=6, temperature=0.0)
    leases = prefill(p, {"a": ids}, short)
    hand_off(p, d, leases)
    want = [*leases["a"][0].token_ids, *(t for c in run(d)["a"] for t in c.token_ids)]
    first, lease = prefill(p, {"b": ids}, short)["b"]
    start = d.reserve(lease.state, lease.handle.num_tokens)
    assert start == lease.handle.num_blocks == 2
    assert p.release_lease(lease.lease_id)
    assert d.complete("b", start, None, lease.handle.num_tokens)
    assert d.requests["b"].num_computed_tokens == 2 * BS  # the KV is there: no recompute
    got = [*first.token_ids, *(t for c in run(d)["b"] for t in c.token_ids)]
    assert got == want and len(got) == 6
    free_and_clean(d)


def test_release_and_abort_unpin_the_lease(make, reference) -> None:
    p = make("p")
    ids = reference.prompt_ids[PROMPTS[1]]
    leases = prefill(p, {"a": ids, "b": ids})
    a, b = leases["a"][1], leases["b"][1]
    assert p.release_lease(a.lease_id)
    assert not p.release_lease(a.lease_id)  # twice is a no-op
    with pytest.raises(KeyError):
        p.export_lease(a.lease_id)
    assert p.abort_request("b")  # an abort after the prefill releases the lease too
    assert p.lease_for("b") is None and not p.abort_request("b")
    free_and_clean(p)
    assert b.lease_id not in p.block_manager.owners()


def test_an_unpulled_lease_expires(make, reference) -> None:
    p = make("p-short", lease_seconds=0.3)
    leases = prefill(p, {"a": reference.prompt_ids[PROMPTS[0]]})
    lease = leases["a"][1]
    p.housekeeping()
    assert p.lease_for("a") is lease  # not yet
    assert p.expire_leases(time.monotonic() + 0.31) == 1
    assert p.num_expired_leases == 1
    with pytest.raises(KeyError):
        p.export_lease(lease.lease_id)
    free_and_clean(p)


def test_the_idle_engine_thread_expires_leases(make, reference) -> None:
    from pdserve.workers.async_engine import AsyncEngine

    p = make("p-idle", lease_seconds=0.3)
    prefill(p, {"a": reference.prompt_ids[PROMPTS[0]]})
    aengine = AsyncEngine(p)  # nothing runs: only the idle loop's housekeeping can expire it
    try:
        deadline = time.monotonic() + 5
        while aengine.call(lambda e: len(e.leases)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert aengine.call(lambda e: (len(e.leases), e.num_expired_leases)) == (0, 1)
        aengine.call(free_and_clean)
    finally:
        aengine.shutdown()


def test_reserve_refuses_without_room_and_leaks_nothing(make, reference) -> None:
    p, small = make("p"), make("d-small", num_blocks=3)
    ids = reference.prompt_ids[PROMPTS[2]]  # 4 blocks
    (first, lease), = prefill(p, {"a": ids}).values()
    with pytest.raises(OutOfBlocksError):
        small.reserve(lease.state, lease.handle.num_tokens)
    free_and_clean(small)
    # The lease is intact: a decode worker with room takes it.
    d = make("d")
    hand_off(p, d, {"a": (first, lease)})
    reference.check(PROMPTS[2], [*first.token_ids, *(t for c in run(d)["a"] for t in c.token_ids)])
    d.reserve(lease.state, lease.handle.num_tokens)  # "a" has finished: its id is free again
    with pytest.raises(InvalidRequestError):  # but one reservation per request id at a time
        d.reserve(lease.state, lease.handle.num_tokens)
    assert d.abort_request("a")
    free_and_clean(d)


def test_abort_between_reserve_and_complete(make, reference) -> None:
    p, d = make("p"), make("d")
    (_, lease), = prefill(p, {"a": reference.prompt_ids[PROMPTS[1]]}).values()
    start = d.reserve(lease.state, lease.handle.num_tokens)
    assert d.block_manager.num_free_blocks < d.block_manager.num_blocks
    payload = p.export_lease(lease.lease_id, start)
    assert d.abort_request("a")
    assert not d.complete("a", start, payload, lease.handle.num_tokens)
    assert p.release_lease(lease.lease_id)
    free_and_clean(d)
    free_and_clean(p)


def test_a_corrupt_payload_falls_back_to_recompute(make, reference) -> None:
    p, d = make("p"), make("d")
    q = PROMPTS[3]
    (first, lease), = prefill(p, {"a": reference.prompt_ids[q]}).values()
    start = d.reserve(lease.state, lease.handle.num_tokens)
    payload = p.export_lease(lease.lease_id, start)
    data = np.array(payload.data, copy=True)
    data[0, 100] ^= 0xFF
    assert p.release_lease(lease.lease_id)
    assert d.complete("a", start, dataclasses.replace(payload, data=data), lease.handle.num_tokens)
    assert d.requests["a"].num_computed_tokens == 0  # recomputed, never used
    reference.check(q, [*first.token_ids, *(t for c in run(d)["a"] for t in c.token_ids)])
    free_and_clean(d)


def test_prefix_export_and_import_between_workers(make, reference) -> None:
    src, dst = make("src"), make("dst")
    # dst's events have a consumer from the start (an engine keeps none until its first take)
    assert dst.block_manager.take_events() is None
    q = PROMPTS[2]
    ids = reference.prompt_ids[q]
    full = len(ids) // BS
    src.add_request("warm", prompt_token_ids=ids, params=ONE)
    run(src)
    assert src.export_prefix(ids, "other-tenant", 0, full) == (0, None)  # salted: no match
    # Import block 0 first, then blocks 1.. on top of it (what the router's plan does when
    # the importing worker already holds part of the chain).
    n, payload = src.export_prefix(ids, None, 0, 1)
    assert n == 1 and dst.import_prefix(ids, None, 0, payload) == 1
    n, payload = src.export_prefix(ids, None, 1, full)
    assert n == full - 1 and dst.import_prefix(ids, None, 1, payload) == full - 1
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks  # cached, unused
    assert src.block_manager.pool.cached_hashes() >= dst.block_manager.pool.cached_hashes()
    stored = [h for e in dst.block_manager.take_events().events if isinstance(e, BlockStored)
              for h in e.block_hashes]
    assert set(stored) == dst.block_manager.pool.cached_hashes() and len(stored) == full

    dst.add_request("use", prompt_token_ids=ids, params=GREEDY)
    out = run(dst)["use"]
    reference.check(q, [t for c in out for t in c.token_ids])
    assert out[-1].usage.cached_tokens == min(full, (len(ids) - 1) // BS) * BS
    free_and_clean(dst)


def test_import_without_room_imports_nothing(make, reference) -> None:
    src, tiny = make("src"), make("tiny", num_blocks=2)
    ids = reference.prompt_ids[PROMPTS[2]]
    src.add_request("warm", prompt_token_ids=ids, params=ONE)
    run(src)
    n, payload = src.export_prefix(ids, None, 0, len(ids) // BS)
    assert n > 2 and tiny.import_prefix(ids, None, 0, payload) == 0
    assert not tiny.block_manager.pool.cached_hashes()
    free_and_clean(tiny)


def test_import_of_a_payload_longer_than_the_prompt_is_refused(make, reference) -> None:
    src, dst = make("src"), make("dst")
    ids = reference.prompt_ids[PROMPTS[2]]
    src.add_request("warm", prompt_token_ids=ids, params=ONE)
    run(src)
    n, payload = src.export_prefix(ids, None, 0, len(ids) // BS)
    free = dst.block_manager.num_free_blocks
    with pytest.raises(ValueError, match="payload"):
        dst.import_prefix(ids[:(n - 1) * BS], None, 0, payload)  # the prompt ends a block early
    assert dst.block_manager.num_free_blocks == free and not dst.block_manager.pool.cached_hashes()


def test_snapshot_matches_the_cache_and_skips_pending_events(make, reference) -> None:
    e = make("snap")
    assert e.block_manager.take_events() is None  # a consumer from the start: events pend
    e.add_request("a", prompt_token_ids=reference.prompt_ids[PROMPTS[2]], params=ONE)
    run(e)
    seq_before = e.block_manager.pool.event_seq
    hashes, seq = e.snapshot()
    assert hashes == sorted(e.block_manager.pool.cached_hashes()) and hashes
    assert seq == seq_before + 1 and e.block_manager.take_events() is None


# -- the asyncio Worker around it: aborts and cancels during a handoff ----------------------------
@pytest.fixture(scope="module")
def worker(shared, smollm2_path: Path):
    model, _ = shared
    with mock.patch.object(engine_mod, "load_model", return_value=model):
        w = Worker(EngineConfig(worker_id="w-decode", num_blocks=64), "decode",
                   model_path=str(smollm2_path))
    yield w
    w.shutdown()


def _lease(make, reference, rid: str):
    p = make(f"p-{rid}")
    (first, lease), = prefill(p, {rid: reference.prompt_ids[PROMPTS[1]]}).values()
    return p, first, lease


async def _idle(w: Worker) -> dict:
    s = await w.stats()
    assert (s["free_blocks"], s["reserved"], s["requests"], s["owners"]) == (
        s["total_blocks"], 0, 0, [])
    assert await w.check_integrity()
    return s


def test_worker_decode_streams_the_handed_off_request(worker, make, reference) -> None:
    p, first, lease = _lease(make, reference, "ok")
    released = []

    async def pull(h, start):
        return p.export_lease(h.lease_id, start)

    async def release(h):
        released.append(p.release_lease(h.lease_id))

    async def go():
        out = [c async for c in worker.decode(lease.state, lease.handle, pull, release)]
        await _idle(worker)
        return out

    out = asyncio.run(go())
    assert released == [True]
    reference.check(PROMPTS[1], [*first.token_ids, *(t for c in out for t in c.token_ids)])


def test_worker_abort_during_the_pull_ends_the_stream(worker, make, reference) -> None:
    p, _, lease = _lease(make, reference, "ab")

    async def go():
        gate = asyncio.Event()

        async def pull(h, start):
            await gate.wait()
            return p.export_lease(h.lease_id, start)

        async def consume():
            return [c async for c in worker.decode(lease.state, lease.handle, pull, None)]

        task = asyncio.create_task(consume())
        while (await worker.stats())["reserved"] == 0:
            await asyncio.sleep(0.01)
        assert await worker.abort("ab")  # frees the reservation
        gate.set()
        out = await asyncio.wait_for(task, 10)  # before the fix: hung forever
        await _idle(worker)
        return out

    out = asyncio.run(go())
    assert out[-1].finished and out[-1].finish_reason == "abort"


def test_worker_cancel_during_the_pull_frees_the_reservation(worker, make, reference) -> None:
    _, _, lease = _lease(make, reference, "cx")

    async def go():
        async def pull(h, start):
            await asyncio.Event().wait()  # never arrives

        async def consume():
            return [c async for c in worker.decode(lease.state, lease.handle, pull, None)]

        task = asyncio.create_task(consume())
        while (await worker.stats())["reserved"] == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _idle(worker)

    asyncio.run(go())


def test_worker_refusal_leaves_the_lease_to_the_caller(make, reference, shared, smollm2_path) -> None:
    model, _ = shared
    with mock.patch.object(engine_mod, "load_model", return_value=model):
        small = Worker(EngineConfig(worker_id="w-small", num_blocks=1), "decode",
                       model_path=str(smollm2_path))
    try:
        p, _, lease = _lease(make, reference, "rf")
        released = []

        async def release(h):
            released.append(h.lease_id)

        async def go():
            with pytest.raises(OutOfBlocksError):
                async for _ in small.decode(lease.state, lease.handle, None, release):
                    pass
            await _idle(small)

        asyncio.run(go())
        assert released == [] and p.lease_for("rf") is lease
    finally:
        small.shutdown()


def test_refusal_and_validation_errors_survive_pickling() -> None:
    # The router tells a refusal (OutOfBlocksError from a decode actor) from a failure by its
    # type, and reports a bad field by name: both cross a Ray actor boundary pickled.
    import pickle

    e = pickle.loads(pickle.dumps(OutOfBlocksError(5, 2)))
    assert isinstance(e, OutOfBlocksError) and (e.needed, e.free) == (5, 2)
    e = pickle.loads(pickle.dumps(InvalidRequestError("sampling_params.top_p", "too big")))
    assert isinstance(e, InvalidRequestError) and e.field == "sampling_params.top_p"
