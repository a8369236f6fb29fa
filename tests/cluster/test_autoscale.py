"""Autoscaling (cluster/autoscale.py and the router): the rule alone, the config's checks, and
a real 1 prefill + 1..2 decode cluster on the local Ray that grows under load, serves on the
added worker, and shrinks back when idle; the output stays exact and nothing leaks."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from pd_util import (
    GREEDY,
    PROMPTS,
    assert_clean,
    counters,
    drain,
    live_workers,
    router_stats,
    tokens,
)

from pdserve.cluster.autoscale import RoleScaler
from pdserve.cluster.config import ClusterConfig, RoleConfig
from pdserve.cluster.router import RouterRequest
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams


# -- the rule -------------------------------------------------------------------------------------
def test_the_role_wants_ongoing_over_target_workers_within_its_bounds() -> None:
    s = RoleScaler(RoleConfig(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=8))
    assert s.enabled
    assert [s.desired(n) for n in (0, 1, 8, 9, 24, 25, 1000)] == [1, 1, 1, 2, 3, 4, 4]
    assert not RoleScaler(RoleConfig(replicas=3)).enabled  # no bounds: a fixed count


def test_a_move_waits_for_its_delay_and_one_worker_moves_at_a_time() -> None:
    s = RoleScaler(RoleConfig(replicas=1, max_replicas=3, target_ongoing_requests=2,
                              upscale_delay_s=5, downscale_delay_s=30))
    assert s.decide(6, 1, now=0.0) == 0  # wants 3, but only since now
    assert s.decide(6, 1, now=4.9) == 0
    assert s.decide(6, 1, now=5.0) == 1  # one worker, not two
    assert s.decide(6, 2, now=6.0) == 0  # the next move waits a full delay again
    assert s.decide(6, 2, now=10.0) == 1
    assert s.decide(1, 3, now=11.0) == 0  # a lull: shrinking waits longer
    assert s.decide(6, 3, now=12.0) == 0  # a burst in between resets it
    assert s.decide(1, 3, now=13.0) == 0
    assert s.decide(1, 3, now=42.9) == 0
    assert s.decide(1, 3, now=43.0) == -1
    assert s.decide(2, 1, now=100.0) == 0  # at the wish: nothing


@pytest.mark.parametrize("role, values, field", [
    ("decode", {"replicas": 2, "min_replicas": 3}, "decode.min_replicas"),
    ("decode", {"replicas": 1, "min_replicas": 0}, "decode.min_replicas"),
    ("prefill", {"replicas": 2, "max_replicas": 1}, "prefill.max_replicas"),
    ("prefill", {"target_ongoing_requests": 0}, "prefill.target_ongoing_requests"),
    ("decode", {"downscale_delay_s": -1}, "decode.downscale_delay_s"),
    ("decode", {"upscale_delay_s": float("nan")}, "decode.upscale_delay_s"),
    # a role with no worker has no load to grow from
    ("prefill", {"replicas": 0, "max_replicas": 2}, "prefill.min_replicas"),
])
def test_bad_autoscaling_bounds_name_the_field(role: str, values: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        ClusterConfig.from_dict({role: values})
    assert e.value.field == f"config.{field}"
    with pytest.raises(InvalidRequestError) as e:
        ClusterConfig.from_dict({"drain_timeout_s": -1})
    assert e.value.field == "config.drain_timeout_s"


def test_a_drain_waits_for_requests_bound_for_the_worker_and_for_a_fresh_load() -> None:
    """The router's idle test for a draining worker: a request placed on it but still in its
    prefill elsewhere keeps it (the prefill will push to it), and so does a load polled
    before the drain began."""
    from pdserve.cluster.router import Router, _Active, _WorkerRef
    from pdserve.workers.worker import WorkerLoad

    router = Router(ClusterConfig(), "", {}, None)
    empty = WorkerLoad("d1", "decode", 0, 0, 0, 10, 10, 0, 1.0, 0.01, 1, 0.0)
    d1, p0 = _WorkerRef("d1", "decode", None, empty, polled_at=5.0), _WorkerRef("p0", "prefill", None)
    assert router._idle(d1, since=4.0)
    assert not router._idle(d1, since=6.0)  # that load may predate the drain
    router.active["r"] = _Active(holder=p0, target=d1)  # prefilling on p0, bound for d1
    assert not router._idle(d1, since=4.0)
    router.active["r"] = _Active(holder=p0, lease=(d1, "lease-1"))
    assert not router._idle(d1, since=4.0)
    del router.active["r"]
    busy = WorkerLoad("d1", "decode", 1, 0, 0, 9, 10, 0, 1.0, 0.01, 1, 0.0)
    assert not router._idle(_WorkerRef("d1", "decode", None, busy, polled_at=5.0), since=4.0)


def test_a_lull_cancels_a_worker_still_starting_before_it_retires_a_serving_one() -> None:
    """The router's moves on a bare Router (no Ray): growth starts a worker; a lull while it
    is still starting (here: held pending for good, an injected fault) cancels that start
    rather than retiring a serving worker; a later lull retires the least busy worker,
    marked draining at once."""
    import asyncio

    from pdserve.cluster.router import Router, _WorkerRef
    from pdserve.workers.worker import WorkerLoad

    def load(wid: str, running: int) -> WorkerLoad:
        return WorkerLoad(wid, "decode", running, 0, 0, 10, 10, 0, 1.0, 0.01, 1, 0.0)

    async def go() -> None:
        cfg = ClusterConfig.from_dict({"decode": {
            "replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 0}})
        router = Router(cfg, "", {}, None)
        started, retired = [], []

        async def pending_forever(role: str) -> None:  # as a start Ray holds pending
            router._starting[role] += 1
            try:
                started.append(role)
                await asyncio.sleep(3600)
            finally:
                router._starting[role] -= 1

        async def retire(w: _WorkerRef) -> None:
            retired.append(w.worker_id)

        router._scale_up, router._retire = pending_forever, retire
        d0 = router.workers["d0"] = _WorkerRef("d0", "decode", None, load("d0", 2))
        router.autoscale(0.0)
        await asyncio.sleep(0)
        assert started == ["decode"] and len(router._adding["decode"]) == 1
        d0.load = load("d0", 0)
        router.autoscale(1.0)  # the lull: the start goes, d0 stays
        await asyncio.sleep(0)
        assert not router._adding["decode"] and router._starting["decode"] == 0
        assert retired == [] and not d0.draining
        router.workers["d1"] = _WorkerRef("d1", "decode", None, load("d1", 0))
        router.autoscale(2.0)  # two idle in service, one wanted: the newest goes
        assert d0.in_service and router.workers["d1"].draining
        await asyncio.sleep(0)
        assert retired == ["d1"]

    asyncio.run(go())


def test_a_start_cancelled_while_its_channel_forms_unlinks_the_peers_once_it_ends(
        monkeypatch) -> None:
    """A worker start cancelled (a lull, a shutdown) while its KV channel forms: the
    formation runs on in its thread, where the peers may link to the new rank, which the
    caller then kills. When the formation ends (not before: that would race it) the live
    peers are told to forget the worker. Bare Router; the slow formation is an injected
    fault."""
    import asyncio

    from pdserve.cluster import router as router_mod
    from pdserve.cluster.router import Router, _WorkerRef
    from pdserve.workers.worker import WorkerLoad

    forgot: list[tuple[str, str]] = []

    class Handle:  # a worker's actor handle, as far as forget_peer goes
        def __init__(self, wid: str) -> None:
            self.forget_peer = type("M", (), {"remote": lambda _, peer: forgot.append((wid, peer))})()

    began, release = threading.Event(), threading.Event()

    def slow_formation(config, members) -> bool:
        assert list(members) == ["d9", "p0"]  # the new worker is rank 0
        began.set()
        assert release.wait(30)
        return True

    monkeypatch.setattr(router_mod, "form_channel", slow_formation)

    async def go() -> None:
        router = Router(ClusterConfig.from_dict({"transport": "collective"}), "", {}, None)
        load = WorkerLoad("p0", "prefill", 0, 0, 0, 10, 10, 0, 1.0, 0.01, 1, 0.0)
        router.workers["p0"] = _WorkerRef("p0", "prefill", Handle("p0"), load)
        loop = asyncio.get_running_loop()
        task = loop.create_task(router._join_channel("d9", "decode", Handle("d9")))
        assert await loop.run_in_executor(None, began.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert forgot == []  # the formation still runs
        release.set()
        for _ in range(200):
            if forgot:
                break
            await asyncio.sleep(0.01)
        assert forgot == [("p0", "d9")]
        assert router.counters["channels_formed"] == 0

    asyncio.run(go())


def test_a_channel_formation_that_failed_on_a_member_dead_meanwhile_is_formed_again(
        monkeypatch) -> None:
    """Two deaths at once: a replacement's channel formation includes a peer that died
    before the router found out, and fails on it, before any load poll. The router asks the
    members for their load, finds the dead one, and forms the channel again with the rest
    (the replacement gets a channel, not the object store for good); the replacement
    forgets the dead one. Bare Router; the dead member and the failing formation are
    injected faults."""
    import asyncio

    from pdserve.cluster import router as router_mod
    from pdserve.cluster.router import Router, _WorkerRef
    from pdserve.workers.worker import WorkerLoad

    forgot: list[tuple[str, str]] = []

    from ray.exceptions import ActorDiedError

    def load(wid: str) -> WorkerLoad:
        return WorkerLoad(wid, "prefill", 0, 0, 0, 10, 10, 0, 1.0, 0.01, 1, 0.0)

    class Handle:
        def __init__(self, wid: str, dead: bool = False) -> None:
            self.forget_peer = type("M", (), {"remote": lambda _, peer: forgot.append((wid, peer))})()

            async def answer() -> WorkerLoad:
                if dead:
                    raise ActorDiedError()
                return load(wid)

            self.load = type("M", (), {"remote": lambda _: answer()})()

    router = Router(ClusterConfig.from_dict({"transport": "collective",
                                             "replace_dead_workers": False}), "", {}, None)
    for wid in ("p0", "p1"):  # p1 is dead, and no poll has found out yet
        router.workers[wid] = _WorkerRef(wid, "prefill", Handle(wid, dead=wid == "p1"), load(wid))
    formations: list[list[str]] = []

    def formation(config, members) -> bool:
        formations.append(list(members))
        return "p1" not in members  # p1's rank never joins: the formation fails

    monkeypatch.setattr(router_mod, "form_channel", formation)
    asyncio.run(router._join_channel("d9", "decode", Handle("d9")))
    assert formations == [["d9", "p0", "p1"], ["d9", "p0"]]
    assert not router.workers["p1"].alive  # the probe after the failure found it dead
    # p0 and the replacement forget it (p0 as after any death)
    assert router.counters["channels_formed"] == 1 and sorted(forgot) == [("d9", "p1"), ("p0", "p1")]
    # a formation that fails with every member alive is not tried again (object store)
    monkeypatch.setattr(router_mod, "form_channel", lambda c, m: (formations.append(list(m)), False)[1])
    formations.clear()
    asyncio.run(router._join_channel("d10", "decode", Handle("d10")))
    assert formations == [["d10", "p0"]] and router.counters["channels_formed"] == 1


def test_the_router_keeps_only_the_newest_gone_workers() -> None:
    from pdserve.cluster.router import KEEP_GONE, Router, _WorkerRef

    router = Router(ClusterConfig(), "", {}, None)
    for i in range(KEEP_GONE + 10):
        router.workers[f"gone-{i}"] = _WorkerRef(f"gone-{i}", "decode", None, alive=False)
    router.workers["live"] = _WorkerRef("live", "decode", None)
    router._forget_gone()
    assert "live" in router.workers and len(router.workers) == KEEP_GONE + 1
    assert "gone-9" not in router.workers and f"gone-{KEEP_GONE + 9}" in router.workers


def test_metrics_show_workers_by_role_and_state_and_the_changes() -> None:
    from prometheus_client import generate_latest

    from pdserve.cluster.metrics import Metrics

    m = Metrics()
    m.cluster.update({}, {"alive": {"p0": True, "d0": True, "d1": True, "d2": False},
                          "roles": {"p0": "prefill", "d0": "decode", "d1": "decode",
                                    "d2": "decode"},
                          "draining": ["d1"],
                          "counters": {"replacements": 1, "scale_ups": 2, "scale_downs": 1}})
    text = generate_latest(m.registry).decode()
    for line in ('pdserve:workers{role="prefill",state="serving"} 1.0',
                 'pdserve:workers{role="decode",state="serving"} 1.0',
                 'pdserve:workers{role="decode",state="draining"} 1.0',
                 'pdserve:router_worker_changes_total{kind="scale_up"} 2.0',
                 'pdserve:router_worker_changes_total{kind="replacement"} 1.0'):
        assert line in text, line


# -- a real cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(start_cluster):
    c = start_cluster(
        decode={"replicas": 1, "num_cpus": 1, "num_blocks": 160, "min_replicas": 1,
                "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                "downscale_delay_s": 4},
        drain_timeout_s=60)
    yield c
    c.shutdown()


def run_one(cluster, i: int) -> tuple[str, list[int]]:
    prompt = PROMPTS[i % len(PROMPTS)]
    req = RouterRequest(f"as-{i}-{time.monotonic_ns()}", prompt=prompt, params=GREEDY)
    return prompt, tokens(drain(cluster.router.generate.remote(req)))


def added_decode_workers(cluster) -> list[str]:
    return [w for w in live_workers(cluster, "decode") if "-up" in w]


def test_decode_grows_under_load_serves_on_the_new_worker_and_shrinks_when_idle(
        cluster, reference) -> None:
    # 1. Three requests in flight at a time (3 ongoing, target 1 a worker): one worker is added.
    stop, results, n = threading.Event(), [], iter(range(10**6))

    def keep_busy() -> None:
        while not stop.is_set():
            results.append(run_one(cluster, next(n)))

    with ThreadPoolExecutor(3) as pool:
        loops = [pool.submit(keep_busy) for _ in range(3)]
        deadline = time.monotonic() + 120
        while not added_decode_workers(cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        for f in loops:
            f.result(timeout=180)
    (added,) = added_decode_workers(cluster)
    assert counters(cluster)["scale_ups"] == 1
    # 2. With two decode workers in service, a round of requests uses the added one too.
    served = len(ray.get(cluster.actor(added).handoffs.remote(), timeout=30))
    with ThreadPoolExecutor(4) as pool:
        results += list(pool.map(lambda i: run_one(cluster, i), range(8)))
    assert len(ray.get(cluster.actor(added).handoffs.remote(), timeout=30)) > served
    for prompt, got in results:
        reference.check(prompt, got)
    # 3. Idle: after the delay the least busy (the newest) is retired, drained and stopped.
    deadline = time.monotonic() + 90
    while added in live_workers(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = router_stats(cluster)
    assert not stats["alive"][added] and stats["counters"]["scale_downs"] == 1
    assert len(live_workers(cluster, "decode")) == 1 and not stats["draining"]
    assert stats["counters"]["replacements"] == 0  # retired, not replaced
    assert ray.get(cluster.index.snapshot.remote(added)) == set()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(cluster.actor(added).load.remote(), timeout=30)
    # the cluster it leaves is whole: exact, and every block back
    for i in range(len(PROMPTS)):
        reference.check(*run_one(cluster, i))
    assert_clean(cluster)


@pytest.fixture(scope="module")
def fixed(start_cluster):
    """1 prefill + 2 decode workers, no autoscaling, KV over the collective channel (gloo)."""
    c = start_cluster(decode={"replicas": 2, "num_cpus": 1, "num_blocks": 160},
                      transport="collective", direct_max_tokens=0)
    yield c
    c.shutdown()


def test_draining_a_busy_worker_resumes_its_stream_elsewhere_and_replace_starts_one_first(
        fixed, smol_engine, reference) -> None:
    """An operator drains the decode worker running a stream (timeout 0): the stream resumes
    on the other one, token for token. The last decode worker can only be drained with a
    replacement, which enters service first, linked to the prefill worker by a channel of
    its own. The cluster ends whole and clean."""
    engine = smol_engine()
    sp = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    ids = engine.encode_prompt(PROMPTS[1])
    engine.add_request("drain-ref", prompt_token_ids=ids, params=sp)
    want = []
    while engine.has_unfinished():
        want += [t for c in engine.step() for t in c.token_ids]
    before = counters(fixed)
    gen = fixed.router.generate.remote(RouterRequest("drain-me", prompt_token_ids=tuple(ids),
                                                     params=sp))
    head = [ray.get(next(gen))]
    busy = None
    while busy is None:  # the decode worker streaming it
        info = ray.get(fixed.router.inflight.remote()).get("drain-me")
        busy = info["holder"] if info and info["role"] == "decode" else None
    assert ray.get(fixed.router.drain_worker.remote(busy, False, 0.0), timeout=60) is None
    assert tokens(head + drain(gen)) == want
    after = counters(fixed)
    assert after["drains"] == before["drains"] + 1 and after["recomputed"] > before["recomputed"]
    assert after["replacements"] == before["replacements"]  # drained, not replaced
    assert not router_stats(fixed)["alive"][busy]
    assert ray.get(fixed.index.snapshot.remote(busy)) == set()

    (last,) = live_workers(fixed, "decode")
    with pytest.raises(InvalidRequestError) as e:  # nothing would be left in service
        ray.get(fixed.router.drain_worker.remote(last), timeout=30)
    assert e.value.field == "worker_id"
    with pytest.raises(InvalidRequestError):
        ray.get(fixed.router.drain_worker.remote("no-such-worker", True), timeout=30)
    new = ray.get(fixed.router.drain_worker.remote(last, True), timeout=180)
    assert live_workers(fixed, "decode") == [new] and counters(fixed)["replacements"] == 1
    for i in range(len(PROMPTS)):  # the cluster it leaves is whole
        reference.check(*run_one(fixed, i))
    vias = ray.get(fixed.actor(new).handoffs.remote(), timeout=30)
    assert len(vias) == len(PROMPTS) and {st.via for _, st in vias} == {"collective"}
    assert_clean(fixed)


def test_the_cli_lists_the_workers_and_drains_one_through_ray(fixed, reference, capsys) -> None:
    """``pdserve workers`` and ``pdserve drain`` attach to the running cluster through Ray
    (the router found by name, in any namespace): the table shows each worker's role and
    state; a refused drain exits 2 naming the field; a drain with ``--replace`` starts the new
    worker first and says which it is."""
    from pdserve.cluster import cli

    suffix = fixed.worker_ids("prefill")[0].rsplit("-", 1)[1]
    flags = ["--router", f"pdserve-router-{suffix}"]

    def table() -> dict[str, list[str]]:
        assert cli.main(["workers", *flags]) == 0
        known = set(router_stats(fixed)["alive"])
        return {cells[0]: cells[1:3] for cells in map(str.split, capsys.readouterr().out.splitlines())
                if cells and cells[0] in known}

    decoders = live_workers(fixed, "decode")
    decode = decoders[0]
    rows = table()
    assert rows[decode] == ["decode", "serving"]
    assert rows[fixed.worker_ids("prefill")[0]] == ["prefill", "serving"]
    assert cli.main(["drain", "no-such-worker", *flags]) == 2
    assert "worker_id" in capsys.readouterr().err
    assert cli.main(["drain", decode, "--replace", "--timeout", "-1", *flags]) == 2
    assert "timeout_s" in capsys.readouterr().err
    assert live_workers(fixed, "decode") == decoders  # refused before anything started
    assert cli.main(["drain", decode, "--replace", "--timeout", "5", *flags]) == 0
    after = live_workers(fixed, "decode")
    (new,) = set(after) - set(decoders)
    assert len(after) == len(decoders) and decode not in after
    assert f"{decode} drained and stopped; {new} took its place" in capsys.readouterr().out
    rows = table()
    assert rows[decode] == ["decode", "gone"] and rows[new] == ["decode", "serving"]
    with pytest.raises(SystemExit, match="0 routers"):
        cli.main(["workers", "--router", "pdserve-router-none"])
    reference.check(*run_one(fixed, 0))
    assert_clean(fixed)
