"""Bringing a cluster up (cluster/launcher.py): engine configs per role, and a real 1 prefill +
1 decode cluster on the local Ray for each KV transport, whose greedy output must equal the
single-process engine and transformers token for token, through the P/D handoff."""

from __future__ import annotations

import pytest
import ray
from pd_util import GREEDY, PROMPTS, assert_clean, counters, drain, tokens

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.router import RouterRequest
from pdserve.cluster.spawn import engine_config
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams


# -- engine configs (no Ray) ----------------------------------------------------------------------
def test_engine_config_follows_the_role() -> None:
    cfg = ClusterConfig.from_dict({
        "block_size": 32, "seed": 7, "speculative_method": "ngram", "async_scheduling": False,
        "prefill": {"num_cpus": 3, "num_blocks": 100, "max_num_seqs": 4,
                    "max_num_batched_tokens": 512},
        "decode": {"num_cpus": 0.5, "num_blocks": 200, "max_num_seqs": 32}})
    p = engine_config(cfg, cfg.prefill, "prefill-0-x")
    d = engine_config(cfg, cfg.decode, "decode-0-x")
    assert (p.worker_id, p.block_size, p.seed) == ("prefill-0-x", 32, 7)
    assert (p.num_blocks, p.max_num_seqs, p.max_num_batched_tokens) == (100, 4, 512)
    assert (d.num_blocks, d.max_num_seqs) == (200, 32)
    assert (p.cpu_threads, d.cpu_threads) == (3, 1)  # at least one thread
    assert p.speculative_method is None and d.speculative_method == "ngram"
    assert p.async_scheduling is False and d.async_scheduling is False
    assert engine_config(ClusterConfig(), ClusterConfig().decode, "d").async_scheduling is None


@pytest.mark.parametrize("field, value", [("direct_max_tokens", -1), ("link_bytes_per_s", 0.0),
                                          ("transport", "carrier-pigeon"), ("lease_seconds", 0),
                                          ("async_scheduling", "yes"), ("kv_push", "yes")])
def test_bad_cluster_config_names_the_field(field: str, value) -> None:
    with pytest.raises(InvalidRequestError) as e:
        ClusterConfig.from_dict({field: value})
    assert e.value.field == f"config.{field}"


# -- a real 1P + 1D cluster per transport --------------------------------------------------------
@pytest.fixture(scope="module", params=["object_store", "grpc"])
def cluster(request: pytest.FixtureRequest, start_cluster):
    c = start_cluster(transport=request.param)
    yield c
    c.shutdown()


def test_cluster_is_up_with_named_workers_on_this_node(cluster) -> None:
    assert len(cluster.worker_ids("prefill")) == len(cluster.worker_ids("decode")) == 1
    node = ray.get_runtime_context().get_node_id()
    for wid, (role, actor) in cluster.workers.items():
        assert wid.startswith(f"{role}-0-")
        assert ray.get_actor(wid, namespace="pdserve-tests") is not None
        assert ray.get(actor.node_id.remote()) == node
    assert ray.get(cluster.router.ready.remote())
    info = ray.get(cluster.router.model_info.remote())
    assert info["block_size"] == 16 and info["vocab_size"] == 49152


def test_greedy_output_equals_the_single_engine(cluster, reference) -> None:
    before = counters(cluster)
    gens = {p: cluster.router.generate.remote(
        RouterRequest(f"eq-{cluster.config.transport}-{i}",
                      prompt_token_ids=tuple(reference.prompt_ids[p]), params=GREEDY))
        for i, p in enumerate(PROMPTS)}
    for p, gen in gens.items():
        chunks = drain(gen)
        reference.check(p, tokens(chunks))
        last = chunks[-1]
        assert last.finished and last.finish_reason == "length"
        assert last.usage.prompt_tokens == len(reference.prompt_ids[p])
        assert last.usage.completion_tokens == len(tokens(chunks))
    after = counters(cluster)
    # Every request went prefill -> handoff -> decode, none ran whole on the decode worker.
    assert after["pd"] - before["pd"] == len(PROMPTS)
    assert after["direct"] == before["direct"]
    assert after["handoffs"] - before["handoffs"] == len(PROMPTS)
    assert after["handoff_bytes"] > before["handoff_bytes"]
    (d,) = cluster.worker_ids("decode")
    log = {rid: (nbytes, recomputed) for rid, nbytes, _, recomputed in
           ray.get(cluster.actor(d).handoff_log.remote())}
    for i in range(len(PROMPTS)):
        nbytes, recomputed = log[f"eq-{cluster.config.transport}-{i}"]
        assert nbytes > 0 and not recomputed  # the KV was pulled, not recomputed
    assert_clean(cluster)


def test_text_prompts_are_tokenized_like_the_engine(cluster, reference) -> None:
    for p in PROMPTS[:2]:
        assert ray.get(cluster.router.tokenize.remote(p)) == reference.prompt_ids[p]
    chunks = drain(cluster.router.generate.remote(
        RouterRequest(f"text-{cluster.config.transport}", prompt=PROMPTS[1], params=GREEDY)))
    reference.check(PROMPTS[1], tokens(chunks))


def test_second_chat_turn_reports_cached_prompt_tokens(cluster) -> None:
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    turn1 = ({"role": "system", "content": "You are a concise geography tutor. Answer in one "
                                           "short sentence and never add unrelated facts."},
             {"role": "user", "content": "What is the capital of France?"})
    tr = cluster.config.transport
    first = drain(cluster.router.generate.remote(RouterRequest(f"chat1-{tr}", messages=turn1,
                                                               params=sp)))
    assert first[-1].usage.cached_tokens == 0
    answer = "".join(c.text for c in first)
    turn2 = (*turn1, {"role": "assistant", "content": answer},
             {"role": "user", "content": "And the capital of Germany?"})
    before = counters(cluster)
    second = drain(cluster.router.generate.remote(RouterRequest(f"chat2-{tr}", messages=turn2,
                                                                params=sp)))
    usage = second[-1].usage
    n_turn1 = len(ray.get(cluster.router.tokenize.remote(None, list(turn1))))
    # Turn 1's full blocks are cached on both workers, whichever serves turn 2.
    assert usage.cached_tokens >= n_turn1 // 16 * 16 > 0 and usage.cached_tokens % 16 == 0
    assert n_turn1 < usage.prompt_tokens and usage.cached_tokens < usage.prompt_tokens
    after = counters(cluster)
    assert after["pd"] + after["direct"] == before["pd"] + before["direct"] + 1
    assert_clean(cluster)


def test_a_channel_links_each_worker_only_to_the_other_role() -> None:
    from pdserve.cluster.spawn import handoff_peers

    workers = {"p0": ("prefill", None), "p1": ("prefill", None), "d0": ("decode", None)}
    ranks = {w: i for i, w in enumerate(workers)}
    assert handoff_peers(workers, ranks, "p0") == handoff_peers(workers, ranks, "p1") == {"d0": 2}
    assert handoff_peers(workers, ranks, "d0") == {"p0": 0, "p1": 1}


def test_the_link_estimate_learns_only_from_handoffs_of_a_mebibyte_or_more() -> None:
    from pdserve.cluster.router import LINK_SAMPLE_MIN_BYTES, Router

    router = Router(ClusterConfig(), "", {}, None)
    prior = router.link_bytes_per_s
    router._observe_handoff(LINK_SAMPLE_MIN_BYTES - 1, 0.03)  # mostly fixed costs: ignored
    assert router.link_bytes_per_s == prior
    assert router.counters["handoff_bytes"] == LINK_SAMPLE_MIN_BYTES - 1
    router._observe_handoff(4 * LINK_SAMPLE_MIN_BYTES, 0.002)
    assert router.link_bytes_per_s == 0.8 * prior + 0.2 * (4 * LINK_SAMPLE_MIN_BYTES / 0.002)
