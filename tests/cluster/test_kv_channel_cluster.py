"""The collective KV transport on a real local Ray: a 1 prefill + 1 decode cluster whose
workers hand blocks over the persistent channel (gloo on CPU, NCCL on GPUs), with exact greedy
output, the transport the handoffs took, and the fall-backs to the object store when a
transfer is corrupted or out of step, and a replacement of a dead decode worker forming a
channel of its own (closed when that one dies too). Tests run in file order: one breaks the
channel's only pair, the next kills its decode worker.
"""

from __future__ import annotations

import random
import time

import pytest
import ray
import torch
from pd_util import (
    GREEDY,
    PROMPTS,
    assert_clean,
    counters,
    drain,
    handoff_vias,
    live_workers,
    router_stats,
    tiny_random_model,
    tokens,
    worker_stats,
)

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.launcher import PDCluster
from pdserve.cluster.router import RouterRequest
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.worker import GenerateRequest


@pytest.fixture(scope="module")
def cluster(start_cluster):
    c = start_cluster(transport="collective", direct_max_tokens=0)
    yield c
    c.shutdown()


def run(cluster, rid: str, prompt: str, reference) -> None:
    chunks = drain(cluster.router.generate.remote(RouterRequest(
        rid, prompt_token_ids=tuple(reference.prompt_ids[prompt]), params=GREEDY)))
    reference.check(prompt, tokens(chunks))


def decode_stats(cluster) -> dict:
    (stats,) = worker_stats(cluster, "decode").values()
    return stats


def test_config_auto_picks_the_channel_only_when_every_worker_has_a_gpu() -> None:
    def resolved(**kw) -> str:
        return ClusterConfig.from_dict(kw).resolved_transport()

    gpu = {"replicas": 1, "num_gpus": 1}
    assert resolved(device="cuda", prefill=gpu, decode=gpu) == "collective"
    assert resolved(device="cuda", prefill={**gpu, "num_gpus": 0.5}, decode=gpu) == "object_store"
    assert resolved(device="cuda", prefill={"replicas": 0}, decode=gpu) == "object_store"
    assert resolved(prefill=gpu, decode=gpu) == "object_store"  # CPU workers
    assert resolved(transport="grpc", device="cuda", prefill=gpu, decode=gpu) == "grpc"
    assert ClusterConfig(transport="collective").channel_backend() == "gloo"


def test_greedy_output_equals_the_single_engine_over_the_channel(cluster, reference) -> None:
    """Concurrent handoffs over one pair, each pushed by the prefill worker as its prefill
    ends and taken by the decode worker by transfer id, in whatever order they come."""
    before = counters(cluster)
    pushed = decode_stats(cluster)["pushed_handoffs"]
    gens = {p: cluster.router.generate.remote(RouterRequest(
        f"ch-{i}", prompt_token_ids=tuple(reference.prompt_ids[p]), params=GREEDY))
        for i, p in enumerate(PROMPTS)}
    for p, gen in gens.items():  # concurrent handoffs over the one pair
        reference.check(p, tokens(drain(gen)))
    assert counters(cluster)["handoffs"] - before["handoffs"] == len(PROMPTS)
    vias = handoff_vias(cluster)
    assert [vias[f"ch-{i}"] for i in range(len(PROMPTS))] == ["collective"] * len(PROMPTS)
    (d,) = cluster.worker_ids("decode")
    log = {rid: (nbytes, recomputed) for rid, nbytes, _, recomputed in
           ray.get(cluster.actor(d).handoff_log.remote())}
    for i in range(len(PROMPTS)):
        nbytes, recomputed = log[f"ch-{i}"]
        assert nbytes > 0 and not recomputed
    assert decode_stats(cluster)["channel_failures"] == 0
    assert decode_stats(cluster)["pushed_handoffs"] - pushed == len(PROMPTS)
    assert_clean(cluster)


def test_a_corrupted_transfer_falls_back_to_the_object_store(cluster, reference) -> None:
    (p,) = cluster.worker_ids("prefill")
    before = decode_stats(cluster)
    ray.get(cluster.actor(p).inject_fault.remote("corrupt_channel", 1))
    run(cluster, "ch-corrupt", PROMPTS[2], reference)
    after = decode_stats(cluster)
    assert after["corrupt_pulls"] == before["corrupt_pulls"] + 1
    assert after["channel_failures"] == before["channel_failures"] + 1
    # Every byte had arrived: the pair is still in step, and the next handoff uses it.
    run(cluster, "ch-after-corrupt", PROMPTS[1], reference)
    vias = handoff_vias(cluster)
    assert (vias["ch-corrupt"], vias["ch-after-corrupt"]) == ("object_store", "collective")
    assert_clean(cluster)


def test_a_header_out_of_step_breaks_the_pair_and_handoffs_go_on(cluster, reference) -> None:
    (p,) = cluster.worker_ids("prefill")
    (d,) = cluster.worker_ids("decode")
    ray.get(cluster.actor(p).inject_fault.remote("channel_header", 1))
    run(cluster, "ch-header", PROMPTS[0], reference)
    # The decode worker broke the pair on its side and told the prefill worker, which stops
    # pushing to it at once (else its next push would wait out kv_channel_timeout_s, then
    # close its whole channel).
    deadline = time.monotonic() + 10
    while ray.get(cluster.actor(p).stats.remote())["channel_broken"] != [d]:
        assert time.monotonic() < deadline, "the prefill worker was not told"
        time.sleep(0.05)
    assert ray.get(cluster.actor(d).stats.remote())["channel_broken"] == [p]
    run(cluster, "ch-after-header", PROMPTS[3], reference)
    vias = handoff_vias(cluster)
    assert (vias["ch-header"], vias["ch-after-header"]) == ("object_store", "object_store")
    assert decode_stats(cluster)["channel_failures"] >= 2  # the second was refused at once
    assert_clean(cluster)


def test_a_replaced_decode_worker_forms_its_own_channel(cluster, reference) -> None:
    """Kill the decode worker (whose pair the test above broke): its replacement forms a new
    channel with the prefill worker before it takes requests, and handoffs are pushed over
    it again, exact."""
    (d,) = cluster.worker_ids("decode")
    before = counters(cluster)
    ray.kill(cluster.actor(d))
    deadline = time.monotonic() + 240
    while not [w for w in live_workers(cluster, "decode") if "~" in w]:
        assert time.monotonic() < deadline, "no replacement decode worker"
        time.sleep(0.2)
    assert counters(cluster)["channels_formed"] == before["channels_formed"] + 1
    pushed = decode_stats(cluster)["pushed_handoffs"]
    for i, p in enumerate(PROMPTS):
        run(cluster, f"ch-new-{i}", p, reference)
    vias = handoff_vias(cluster)
    assert [vias[f"ch-new-{i}"] for i in range(len(PROMPTS))] == ["collective"] * len(PROMPTS)
    assert decode_stats(cluster)["pushed_handoffs"] - pushed == len(PROMPTS)
    assert decode_stats(cluster)["channel_failures"] == 0
    assert_clean(cluster)


def test_a_channel_formed_for_a_replacement_is_closed_when_it_dies(cluster, reference) -> None:
    """The replacement dies too: its peers forget it and close the channel formed for it
    (its process group would otherwise outlive its members); the next replacement forms
    another, and the prefill worker holds one channel, not three (the start-up one went
    with the first decode worker: no peer of it was left)."""
    (p,) = cluster.worker_ids("prefill")
    (d1,) = live_workers(cluster, "decode")
    peers = ray.get(cluster.actor(p).stats.remote())
    assert peers["channel_peers"] == [d1] and peers["channels"] == 1  # the dead first one forgotten
    ray.kill(cluster.actor(d1))
    deadline = time.monotonic() + 240
    while not (new := [w for w in live_workers(cluster, "decode") if w != d1]):
        assert time.monotonic() < deadline, "no second replacement"
        time.sleep(0.2)
    run(cluster, "ch-second", PROMPTS[2], reference)
    assert handoff_vias(cluster)["ch-second"] == "collective"
    peers = ray.get(cluster.actor(p).stats.remote())
    assert peers["channel_peers"] == new and peers["channels"] == 1
    assert_clean(cluster)


def test_both_workers_dying_at_once_are_replaced_and_joined_by_a_channel(cluster,
                                                                        reference) -> None:
    """Kill the prefill and the decode worker together: whichever replacement is up first
    has no live peer to join; the second forms a channel with it, and handoffs between the
    two replacements go over it again."""
    before = counters(cluster)
    old = live_workers(cluster)
    for w in old:
        ray.kill(cluster.actor(w))
    deadline = time.monotonic() + 300
    while len([w for w in live_workers(cluster) if w not in old]) < 2:
        assert time.monotonic() < deadline, "not both replaced"
        time.sleep(0.2)
    assert counters(cluster)["channels_formed"] == before["channels_formed"] + 1
    for i, prompt in enumerate(PROMPTS[:2]):
        run(cluster, f"ch-both-{i}", prompt, reference)
    vias = handoff_vias(cluster)
    assert [vias["ch-both-0"], vias["ch-both-1"]] == ["collective"] * 2
    stats = worker_stats(cluster)
    assert sorted(s["channels"] for s in stats.values()) == [1, 1]  # the dead ones' closed
    assert_clean(cluster)


def test_a_channel_formed_again_for_pairs_already_linked_is_closed(cluster, reference) -> None:
    """A formation tried again (a member died while the first one formed) can join pairs
    the first one already linked: each side keeps its link and closes the new channel at
    once, rather than keeping a process group that nothing uses."""
    from pdserve.cluster.spawn import form_channel

    roles = router_stats(cluster)["roles"]
    assert sorted(s["channels"] for s in worker_stats(cluster).values()) == [1, 1]
    members = {w: (roles[w], cluster.actor(w)) for w in live_workers(cluster)}
    assert form_channel(cluster.config, members)
    stats = worker_stats(cluster)
    assert sorted(s["channels"] for s in stats.values()) == [1, 1]
    run(cluster, "ch-again", PROMPTS[0], reference)
    assert handoff_vias(cluster)["ch-again"] == "collective"
    assert_clean(cluster)


# -- GPU: NCCL between two GPUs (skipped on CPU CI) ------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_gpu_handoff_over_nccl_equals_a_colocated_run(ray_session, tmp_path, kv_cache_dtype) -> None:
    """P/D over NCCL against the decode worker running the same requests whole (its own
    prefill), on the same kind of GPU: the transferred KV must give the same tokens."""
    folder = tiny_random_model(tmp_path / "model", vocab_size=1024, num_hidden_layers=6,
                               num_key_value_heads=4, hidden_size=256)
    gpu = {"replicas": 1, "num_cpus": 1, "num_gpus": 1, "num_blocks": 512}
    cfg = ClusterConfig.from_dict({"device": "cuda", "dtype": "bfloat16", "direct_max_tokens": 0,
                                   "kv_cache_dtype": kv_cache_dtype, "enable_prefix_caching": False,
                                   "prefill": gpu, "decode": gpu})
    assert cfg.resolved_transport() == "collective" and cfg.channel_backend() == "nccl"
    cluster = PDCluster.start(cfg, model_path=folder)
    try:
        rng = random.Random(0)
        (d,) = cluster.worker_ids("decode")
        sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        for i, n in enumerate((5, 16, 100, 700)):
            ids = tuple(rng.randrange(3, 1024) for _ in range(n))
            pd = tokens(drain(cluster.router.generate.remote(RouterRequest(
                f"gpu-{i}", prompt_token_ids=ids, params=sp))))
            whole = [t for ref in cluster.actor(d).generate.remote(GenerateRequest(
                f"gpu-whole-{i}", ids, sp)) for t in ray.get(ref).token_ids]
            assert pd == whole and len(pd) == 24, (n, pd, whole)
        vias = handoff_vias(cluster)
        assert all(vias[f"gpu-{i}"] == "collective" for i in range(4)), vias
        assert_clean(cluster)
        if kv_cache_dtype is None:  # a replacement forms its own NCCL channel on the freed GPU
            ray.kill(cluster.actor(d))
            deadline = time.monotonic() + 300
            while not (new := [w for w in live_workers(cluster, "decode") if "~" in w]):
                assert time.monotonic() < deadline, "no replacement decode worker"
                time.sleep(0.2)
            assert counters(cluster)["channels_formed"] == 1
            for i, n in enumerate((16, 700)):
                ids = tuple(rng.randrange(3, 1024) for _ in range(n))
                pd = tokens(drain(cluster.router.generate.remote(RouterRequest(
                    f"gpu-new-{i}", prompt_token_ids=ids, params=sp))))
                whole = [t for ref in cluster.actor(new[0]).generate.remote(GenerateRequest(
                    f"gpu-new-whole-{i}", ids, sp)) for t in ray.get(ref).token_ids]
                assert pd == whole and len(pd) == 24, (n, pd, whole)
            vias = handoff_vias(cluster)
            assert [vias[f"gpu-new-{i}"] for i in range(2)] == ["collective"] * 2, vias
            assert_clean(cluster)
    finally:
        cluster.shutdown()
