"""End to end on a 2 prefill + 2 decode cluster over the Ray object store: exact greedy output,
a corrupted handoff, a prompt every decode worker refuses, then failures. Killing a prefill
worker in the middle of a request, and a decode worker in the middle of its streams, must
neither hang nor give a wrong answer, and the cluster must keep serving; the router replaces
the dead workers, and a cluster whose every worker died heals. The tests run in file order:
the last ones destroy workers.
"""

from __future__ import annotations

import time

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
    router_stats,
    tokens,
    worker_stats,
)

from pdserve.cluster.router import RouterRequest
from pdserve.workers.errors import UnavailableError
from pdserve.workers.sampling_params import SamplingParams

DECODE_BLOCKS = 64


@pytest.fixture(scope="module")
def cluster(start_cluster):
    role = {"replicas": 2, "num_cpus": 1}
    # Small prefill steps (chunked prefill) keep a long prompt on its prefill worker for a
    # while; decode workers smaller than prefill workers can refuse a long prompt.
    c = start_cluster(transport="object_store",
                      prefill={**role, "num_blocks": 160, "max_num_batched_tokens": 96},
                      decode={**role, "num_blocks": DECODE_BLOCKS})
    yield c
    c.shutdown()


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def holder_of(cluster, rid: str, role: str) -> str | None:
    info = ray.get(cluster.router.inflight.remote()).get(rid)
    return info["holder"] if info and info["role"] == role else None


def engine_tokens(engine, rid: str, params: SamplingParams, prompt: str | None = None,
                  ids: list[int] | None = None) -> list[int]:
    """Greedy reference from the single-process engine."""
    engine.add_request(rid, prompt, params, prompt_token_ids=ids)
    out = []
    while engine.has_unfinished():
        out += [t for c in engine.step() for t in c.token_ids]
    return out


def test_greedy_output_equals_the_single_engine_2p2d_object_store(cluster, reference) -> None:
    check_greedy_2p2d(cluster, reference)


def test_a_corrupted_block_in_the_object_store_is_caught(cluster, reference) -> None:
    prefill = [cluster.actor(w) for w in cluster.worker_ids("prefill")]
    before = sum(s["corrupt_pulls"] for s in worker_stats(cluster, "decode").values())
    ray.get([a.inject_fault.remote("corrupt_export", 1) for a in prefill])
    try:
        chunks = drain(cluster.router.generate.remote(
            RouterRequest("corrupt", prompt=PROMPTS[2], params=GREEDY)))
    finally:
        ray.get([a.inject_fault.remote("corrupt_export", 0) for a in prefill])
    reference.check(PROMPTS[2], tokens(chunks))
    after = sum(s["corrupt_pulls"] for s in worker_stats(cluster, "decode").values())
    assert after == before + 1
    assert_clean(cluster)


def test_a_prompt_no_decode_worker_has_room_for_fails_cleanly(cluster) -> None:
    """Every decode worker refuses the handoff: a clear, retryable error, and the prefill's
    lease is released by the router at once (not when it times out)."""
    ids = tuple(range(1000, 1000 + DECODE_BLOCKS * 16 + 20))
    before = worker_stats(cluster, "prefill")
    with pytest.raises(UnavailableError, match="refused"):
        drain(cluster.router.generate.remote(RouterRequest(
            "too-long", prompt_token_ids=ids, params=SamplingParams(max_tokens=4))))
    stats = assert_clean(cluster, timeout=10)  # well within lease_seconds (30 s)
    for w, s in before.items():
        assert stats[w]["expired_leases"] == s["expired_leases"]
    assert sum(stats[w]["prefix_queries"] - s["prefix_queries"] for w, s in before.items()) \
        == len(ids)  # it was prefilled, then refused


def test_killing_a_prefill_worker_mid_request(cluster, smol_engine) -> None:
    engine = smol_engine()
    text = " ".join(f"Paragraph {i}: the committee met again to discuss the budget of the "
                    f"harbour, the repairs of pier {i} and the new timetable of the ferry."
                    for i in range(12))
    ids = engine.encode_prompt(text)
    assert len(ids) > 3 * 96  # several chunked-prefill steps
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    want = engine_tokens(engine, "kill-p-ref", sp, ids=ids)

    before = counters(cluster)
    gen = cluster.router.generate.remote(RouterRequest("kill-p", prompt_token_ids=tuple(ids),
                                                       params=sp))
    victim = wait_for(lambda: holder_of(cluster, "kill-p", "prefill"), what="the prefill")
    # Kill it between two of its chunked-prefill steps (the load is read between steps).
    wait_for(lambda: ray.get(cluster.actor(victim).load.remote()).num_running, what="prefill")
    ray.kill(cluster.actor(victim))
    try:
        chunks = drain(gen, timeout=120)
    except UnavailableError:  # allowed: a clear, retryable error (never a hang)
        chunks = None
    assert chunks is not None, "a second prefill worker was alive: the retry should succeed"
    assert tokens(chunks) == want
    after = counters(cluster)
    assert after["retries"] > before["retries"]
    assert not router_stats(cluster)["alive"][victim]
    # The cluster keeps serving, and forgot the dead worker's blocks.
    chunks = drain(cluster.router.generate.remote(RouterRequest("after-kill-p",
                                                                prompt=PROMPTS[3], params=GREEDY)))
    assert tokens(chunks) == engine_tokens(engine, "after-kill-p-ref", GREEDY, PROMPTS[3])
    assert ray.get(cluster.index.snapshot.remote(victim)) == set()
    assert_clean(cluster)


def test_killing_a_decode_worker_mid_stream(cluster, reference) -> None:
    before = counters(cluster)
    gens = {f"kill-d-{i}": cluster.router.generate.remote(RouterRequest(
        f"kill-d-{i}", prompt_token_ids=tuple(reference.prompt_ids[p]), params=GREEDY))
        for i, p in enumerate(PROMPTS)}
    # Read two chunks of kill-d-2 (its decode worker is streaming), then kill that worker.
    first = gens["kill-d-2"]
    head = []
    while len(head) < 2:
        ready, _ = ray.wait([first], timeout=60)
        assert ready, "no token streamed"
        head.append(ray.get(next(first)))
    victim = wait_for(lambda: holder_of(cluster, "kill-d-2", "decode"), what="the decode")
    ray.kill(cluster.actor(victim))

    outcomes = {}
    for i, p in enumerate(PROMPTS):
        rid = f"kill-d-{i}"
        try:
            chunks = drain(gens[rid], timeout=120)
        except (UnavailableError, ray.exceptions.RayActorError) as e:  # a clear error
            outcomes[rid] = type(e).__name__
            continue
        got = tokens(head + chunks) if rid == "kill-d-2" else tokens(chunks)
        reference.check(p, got)
        outcomes[rid] = "ok"
    # The router resumes a stream elsewhere by recomputing what was already streamed.
    assert outcomes["kill-d-2"] == "ok", outcomes
    after = counters(cluster)
    assert after["recomputed"] > before["recomputed"] and after["retries"] > before["retries"]
    assert not router_stats(cluster)["alive"][victim]

    chunks = drain(cluster.router.generate.remote(RouterRequest("after-kill-d",
                                                                prompt=PROMPTS[1], params=GREEDY)))
    reference.check(PROMPTS[1], tokens(chunks))


def replaced_cluster(cluster, replacements: int, timeout: float = 240.0) -> list[str]:
    """Wait until the router runs two workers of each role again, ``replacements`` of them
    started in place of dead ones; returns the live ids."""
    def full():
        alive, roles = live_workers(cluster), router_stats(cluster)["roles"]
        n_new = sum("~" in w for w in alive)
        ok = sorted(roles[w] for w in alive) == ["decode"] * 2 + ["prefill"] * 2
        return alive if ok and n_new == replacements else None

    return wait_for(full, timeout=timeout, what=f"{replacements} replacement workers")


def test_dead_workers_are_replaced_and_the_index_matches_every_worker(cluster) -> None:
    alive = replaced_cluster(cluster, 2)  # one per kill above
    assert counters(cluster)["replacements"] == 2
    assert_clean(cluster)
    ray.get([cluster.actor(w).flush_events.remote() for w in alive])
    for w in alive:
        assert ray.get(cluster.index.snapshot.remote(w)) == set(
            ray.get(cluster.actor(w).cached_hashes.remote()))
    for w in set(cluster.workers) - set(alive):
        assert ray.get(cluster.index.snapshot.remote(w)) == set()


def test_a_cluster_whose_every_worker_died_heals_and_stays_exact(cluster, reference) -> None:
    """Kill every worker the cluster started with that is still alive: the router replaces
    them, and the P/D path runs on replacements alone, token for token as before."""
    for w in live_workers(cluster):
        if "~" not in w:
            ray.kill(cluster.actor(w))
    alive = replaced_cluster(cluster, 4)
    assert all("~" in w for w in alive) and counters(cluster)["replacements"] == 4
    assert check_greedy_2p2d(cluster, reference)["direct"] == 0
