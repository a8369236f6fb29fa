"""The router (cluster/router.py) on a real 2 prefill + 2 decode cluster over the gRPC KV
transport: exact greedy output through the P/D path, validation, routing a chat's next turn to
the prefill worker that holds its prefix, prefix import between workers, corrupted transfers,
a burst of requests cancelled at every stage, and the prefix index agreeing with every worker.

The cluster's placement is made predictable: ``direct_max_tokens=0`` (every request takes the
P/D path) and a fixed, slow ``link_bytes_per_s`` (moving a block costs more than computing it,
so the router never imports a prefix by itself; the import test pins its plan instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import pytest
import ray
from pd_util import (
    GREEDY,
    PROMPTS,
    assert_clean,
    check_greedy_2p2d,
    counters,
    drain,
    live_workers,
    tokens,
    worker_stats,
)
from ray.exceptions import TaskCancelledError

from pdserve.cluster.placement import Placement
from pdserve.cluster.router import Router, RouterRequest
from pdserve.workers.block_manager import hash_prompt_blocks
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams

BS = 16
STAGES = ("placing", "prefill", "handoff", "decode")


@pytest.fixture(scope="module")
def cluster(start_cluster):
    role = {"num_cpus": 1, "num_blocks": 160}
    c = start_cluster(transport="grpc", direct_max_tokens=0, link_bytes_per_s=2e7,
                      prefill={**role, "replicas": 2, "max_num_seqs": 2},
                      decode={**role, "replicas": 2})
    yield c
    c.shutdown()


def run(cluster, rid: str, **request) -> list:
    return drain(cluster.router.generate.remote(RouterRequest(rid, **request)))


def test_greedy_output_equals_the_single_engine_2p2d_grpc(cluster, reference) -> None:
    assert check_greedy_2p2d(cluster, reference)["direct"] == 0


@pytest.mark.parametrize("request_kw, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "prompt_token_ids": (1, 2)}, "prompt"),
    ({"prompt_token_ids": (1, 10**6)}, "prompt_token_ids[1]"),
    ({"prompt": "hi", "params": SamplingParams(temperature=-1.0)}, "sampling_params.temperature"),
    ({"prompt": "hi", "params": SamplingParams(max_tokens=10**6)}, "sampling_params.max_tokens"),
    ({"messages": ({"role": "wizard", "content": "x"},)}, "messages[0].role"),
])
def test_invalid_requests_are_refused_with_the_field(cluster, request_kw, field) -> None:
    with pytest.raises(InvalidRequestError) as e:
        run(cluster, "bad", **request_kw)
    assert e.value.field == field
    assert ray.get(cluster.router.stats.remote())["active"] == 0


def test_a_running_request_id_cannot_be_reused(cluster) -> None:
    long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    gen = cluster.router.generate.remote(RouterRequest("dup", prompt=PROMPTS[0], params=long))
    deadline = time.monotonic() + 30
    while "dup" not in ray.get(cluster.router.inflight.remote()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(InvalidRequestError) as e:
        run(cluster, "dup", prompt=PROMPTS[1], params=GREEDY)
    assert e.value.field == "request_id"
    assert ray.get(cluster.router.abort.remote("dup"))
    assert drain(gen)[-1].finish_reason == "abort"
    assert not ray.get(cluster.router.abort.remote("dup"))  # no longer running
    assert_clean(cluster)


def _long_system_prompt() -> str:
    rules = [f"Rule {i}: the reading room closes {i % 5 + 1} hours after the lending desk, "
             f"and item {i} may be borrowed for {i % 3 + 2} weeks." for i in range(20)]
    return "You are the assistant of a public library. " + " ".join(rules)


def test_next_chat_turn_goes_to_the_prefill_worker_holding_its_prefix(cluster) -> None:
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    turn1 = ({"role": "system", "content": _long_system_prompt()},
             {"role": "user", "content": "How long may I keep item 4?"})
    n1 = len(ray.get(cluster.router.tokenize.remote(None, list(turn1))))
    assert n1 > 20 * BS
    s0 = worker_stats(cluster, "prefill")
    first = run(cluster, "turn-1", messages=turn1, params=sp)
    s1 = worker_stats(cluster, "prefill")
    (holder,) = [w for w in s1 if s1[w]["prefix_queries"] > s0[w]["prefix_queries"]]

    turn2 = (*turn1, {"role": "assistant", "content": "".join(c.text for c in first)},
             {"role": "user", "content": "And item 5?"})
    c1 = counters(cluster)
    second = run(cluster, "turn-2", messages=turn2, params=sp)
    s2 = worker_stats(cluster, "prefill")
    c2 = counters(cluster)
    assert c2["pd"] == c1["pd"] + 1 and c2["prefix_imports"] == c1["prefix_imports"]
    # Only the holder saw the second turn, and it served the first turn's blocks from cache.
    for w in s2:
        if w != holder:
            assert s2[w]["prefix_queries"] == s1[w]["prefix_queries"]
    hits = s2[holder]["prefix_hits"] - s1[holder]["prefix_hits"]
    assert hits >= (n1 // BS - 1) * BS
    assert second[-1].usage.cached_tokens == hits
    assert_clean(cluster)


class PinnedRouter(Router):
    """The real router logic, run in this process, with the next placements dictated."""

    plans: list[Placement]

    async def _place(self, req):
        if self.plans:
            return self.plans.pop(0), []
        return await super()._place(req)


@contextlib.asynccontextmanager
async def pinned(cluster, plans: list[Placement]):
    """A started PinnedRouter over the cluster's workers, its next placements ``plans``."""
    router = PinnedRouter(cluster.config, cluster.model_path, cluster.workers, cluster.index)
    router.plans = plans
    await router.start()
    try:
        yield router
    finally:
        await router.shutdown()


def test_a_prefix_computed_on_one_worker_is_imported_by_another(cluster, smol_engine) -> None:
    p_a, p_b = cluster.worker_ids("prefill")
    d_a, d_b = cluster.worker_ids("decode")
    engine = smol_engine()
    base = engine.encode_prompt("Import test. " + _long_system_prompt()[:400])
    ids = base + engine.encode_prompt(" Which rule covers item 7?")
    k = len(base) // BS
    engine.add_request("import-ref", prompt_token_ids=ids, params=GREEDY)
    want = []
    while engine.has_unfinished():
        want += [t for c in engine.step() for t in c.token_ids]

    async def scenario():
        async with pinned(cluster, [Placement("pd", p_a, d_a, None, 0, 0, 0.0),
                                    Placement("pd", p_b, d_b, p_a, k, 0, 0.0)]) as router:
            async def go(rid, prompt):
                req = RouterRequest(rid, prompt_token_ids=tuple(prompt), params=GREEDY)
                return [c async for c in router.generate(req)]

            await go("import-warm", base)
            before = await cluster.actor(p_b).stats.remote()
            out = await go("import-use", ids)
            after = await cluster.actor(p_b).stats.remote()
            return out, before, after, dict(router.counters)

    out, before, after, ctr = asyncio.run(scenario())
    assert tokens(out) == want
    assert ctr["prefix_imports"] == 1 and ctr["pd"] == 2
    assert after["prefix_hits"] - before["prefix_hits"] == k * BS  # imported, not computed
    cached = set(ray.get(cluster.actor(p_b).cached_hashes.remote()))
    assert set(hash_prompt_blocks(base, BS)[:k]) <= cached
    assert out[-1].usage.cached_tokens == k * BS
    assert_clean(cluster)


def test_a_handoff_moves_and_counts_only_the_blocks_the_decode_worker_lacks(cluster,
                                                                            smol_engine) -> None:
    """The decode worker that served a prompt holds its full blocks: a longer prompt on the
    same prefix, handed to it from the other prefill worker, moves only the rest, and the
    router's byte count (and link estimate) takes what moved, not the whole lease."""
    p_a, p_b = cluster.worker_ids("prefill")
    d_a, _ = cluster.worker_ids("decode")
    engine = smol_engine()
    base = engine.encode_prompt("Handoff bytes test. " + _long_system_prompt()[:300])
    ids = base + engine.encode_prompt(" Which rule covers item 9?")
    k = len(base) // BS

    async def scenario():
        async with pinned(cluster, [Placement("pd", p_a, d_a, None, 0, 0, 0.0),
                                    Placement("pd", p_b, d_a, None, 0, 0, 0.0)]) as router:
            seen = []
            for rid, prompt in (("bytes-base", base), ("bytes-longer", ids)):
                req = RouterRequest(rid, prompt_token_ids=tuple(prompt), params=GREEDY)
                before = (await cluster.actor(d_a).stats.remote())["handoff_bytes"]
                out = [c async for c in router.generate(req)]
                after = (await cluster.actor(d_a).stats.remote())["handoff_bytes"]
                seen.append((out, router.counters["handoff_bytes"], after - before))
            return seen

    (out1, moved1, d1), (out2, total, d2) = asyncio.run(scenario())
    n1, n2 = -(-len(base) // BS), -(-len(ids) // BS)
    block_bytes, rest = divmod(moved1, n1)
    assert rest == 0 and block_bytes > 0 and d1 == moved1
    tagged = [[c.handoff_bytes for c in out if c.handoff_bytes is not None] for out in (out1, out2)]
    assert tagged[0] == [moved1]  # on the decode worker's first chunk only
    assert total - moved1 == d2 == (n2 - k) * block_bytes  # not n2 blocks: k were cached there
    assert tagged[1] == [d2] and len(tokens(out2)) == GREEDY.max_tokens
    assert_clean(cluster)


def test_a_corrupted_transfer_is_detected_and_the_output_stays_exact(cluster, reference) -> None:
    prefill = [cluster.actor(w) for w in cluster.worker_ids("prefill")]

    def corrupt_pulls() -> int:
        return sum(s["corrupt_pulls"] for s in worker_stats(cluster, "decode").values())

    try:
        # One corrupted export: caught by the block checksums, pulled again.
        for i, p in enumerate(PROMPTS[2:]):
            ray.get([a.inject_fault.remote("corrupt_export", 1) for a in prefill])
            before = corrupt_pulls()
            reference.check(p, tokens(run(cluster, f"corrupt-{i}", prompt=p, params=GREEDY)))
            assert corrupt_pulls() == before + 1
        # Every pull corrupted: the decode worker recomputes the prompt instead.
        ray.get([a.inject_fault.remote("corrupt_export", 2) for a in prefill])
        before = corrupt_pulls()
        reference.check(PROMPTS[0], tokens(run(cluster, "corrupt-2x", prompt=PROMPTS[0],
                                               params=GREEDY)))
        assert corrupt_pulls() == before + 2
        logs = [e for d in cluster.worker_ids("decode")
                for e in ray.get(cluster.actor(d).handoff_log.remote())]
        assert [recomputed for rid, *_, recomputed in logs if rid == "corrupt-2x"] == [True]
    finally:
        ray.get([a.inject_fault.remote("corrupt_export", 0) for a in prefill])
    assert_clean(cluster)


def _stage(info: dict) -> str:
    if info["holder"] is None:
        return "placing"
    if info["role"] == "prefill":
        return "prefill"  # queued on the prefill worker, or running there
    return "handoff" if info["lease"] is not None else "decode"


def test_burst_with_cancels_at_every_stage_leaks_nothing(cluster) -> None:
    """16 requests; most are cancelled (router.abort, ray.cancel of the stream, or the stream
    dropped) once they reach a chosen stage. Exports are slowed so that the handoff stage
    lasts long enough to be seen. Afterwards every block is free and no lease is left."""
    router = cluster.router
    prefill = [cluster.actor(w) for w in cluster.worker_ids("prefill")]
    assert_clean(cluster)
    rng = random.Random(7)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    targets = [*STAGES * 3, None, None, "decode", "prefill"]  # None: let it finish
    methods = ["abort", "cancel"] * 8
    methods[5] = methods[10] = "drop"
    rng.shuffle(targets)
    plan = {f"burst-{i}": (t, m) for i, (t, m) in enumerate(zip(targets, methods, strict=True))}
    ray.get([a.inject_fault.remote("delay_export", len(plan)) for a in prefill])
    try:
        gens = {rid: router.generate.remote(RouterRequest(
            rid, prompt=f"Request {i}: {PROMPTS[i % len(PROMPTS)]}", params=sp))
            for i, rid in enumerate(plan)}
        pending = {rid: tm for rid, tm in plan.items() if tm[0] is not None}
        seen: set[str] = set()
        hit: Counter[str] = Counter()

        def cancel(rid: str, stage: str) -> None:
            method = pending.pop(rid)[1]
            hit[stage] += 1
            if method == "abort":
                ray.get(router.abort.remote(rid))
            elif method == "cancel":
                ray.cancel(gens[rid])
            else:
                gens.pop(rid)  # dropped: the router streams it to the end on its own

        for rid, (target, method) in list(pending.items()):  # before the router even sees it
            if target == "placing" and method == "cancel":
                cancel(rid, "placing")
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            info = ray.get(router.inflight.remote())
            for rid in list(pending):
                if rid not in info:
                    if rid in seen:  # finished before its stage came: nothing to cancel
                        pending.pop(rid)
                    continue
                seen.add(rid)
                stage, target = _stage(info[rid]), pending[rid][0]
                if STAGES.index(stage) >= STAGES.index(target):
                    cancel(rid, stage)
            time.sleep(0.005)
        assert not pending

        outcomes = Counter()
        for rid, gen in gens.items():
            target, method = plan[rid]
            try:
                last = drain(gen, timeout=90)[-1]
                outcomes[last.finish_reason] += 1
                assert last.finished
                assert last.finish_reason == "length" or (method == "abort" and target)
            except TaskCancelledError:
                assert method == "cancel"
                outcomes["cancelled"] += 1
    finally:
        ray.get([a.inject_fault.remote("delay_export", 0) for a in prefill])

    assert set(hit) == set(STAGES), f"stages reached: {dict(hit)}"
    assert outcomes["abort"] and outcomes["cancelled"] and outcomes["length"], outcomes
    stats = assert_clean(cluster, timeout=90)
    assert ray.get(router.inflight.remote()) == {}
    assert sum(s["expired_leases"] for s in stats.values()) == 0  # released, not timed out


def test_index_agrees_with_every_worker_after_quiescence(cluster) -> None:
    assert_clean(cluster)
    workers = live_workers(cluster)
    ray.get([cluster.actor(w).flush_events.remote() for w in workers])
    total = 0
    for w in workers:
        held = set(ray.get(cluster.actor(w).cached_hashes.remote()))
        assert ray.get(cluster.index.snapshot.remote(w)) == held, w
        total += len(held)
    assert total, "no worker caches anything: the check would be vacuous"


def test_killing_a_decode_worker_during_the_handoff(cluster, reference) -> None:
    """Last in this module: it destroys a worker. The decode worker dies while it pulls the
    prompt's blocks; the request is resumed on the other one, and the router releases the
    prefill's lease at once (it does not wait for the lease to time out)."""
    prefill = [cluster.actor(w) for w in cluster.worker_ids("prefill")]
    before = worker_stats(cluster, "prefill")
    ray.get([a.inject_fault.remote("delay_export", 1) for a in prefill])
    try:
        gen = cluster.router.generate.remote(RouterRequest(
            "kill-in-handoff", prompt_token_ids=tuple(reference.prompt_ids[PROMPTS[2]]),
            params=GREEDY))
        deadline = time.monotonic() + 60
        while True:
            info = ray.get(cluster.router.inflight.remote()).get("kill-in-handoff")
            if info is not None and _stage(info) == "handoff":
                break
            assert time.monotonic() < deadline, "never saw the handoff"
            time.sleep(0.005)
        ray.kill(cluster.actor(info["holder"]))
        reference.check(PROMPTS[2], tokens(drain(gen)))
    finally:
        ray.get([a.inject_fault.remote("delay_export", 0) for a in prefill])
    assert not ray.get(cluster.router.stats.remote())["alive"][info["holder"]]
    stats = assert_clean(cluster, timeout=10)  # well within lease_seconds (30 s)
    for w, s in stats.items():
        if w in before:
            assert s["expired_leases"] == before[w]["expired_leases"], w
