"""Advanced decoding through the P/D cluster on Ray: speculative decoding on the decode
worker, beam search and n > 1 over the handoff, and an int8-quantized model with an int8 KV
cache serving end to end."""

from __future__ import annotations

import pytest
from pd_util import assert_clean, counters, drain, tokens, worker_stats

from pdserve.cluster.router import RouterRequest
from pdserve.workers.config import EngineConfig
from pdserve.workers.engine import LLMEngine
from pdserve.workers.llm import collect
from pdserve.workers.sampling_params import SamplingParams

MSGS = ({"role": "user", "content": "Name three colors of the rainbow."},)


def _single(path, params: SamplingParams, **cfg):
    eng = LLMEngine(EngineConfig(num_blocks=160, **cfg), model_path=path)
    eng.add_request("ref", messages=list(MSGS), params=params)
    chunks = []
    while eng.has_unfinished():
        chunks += eng.step()
    return collect("ref", (), chunks)


@pytest.fixture(scope="module")
def cluster(start_cluster):
    c = start_cluster(speculative_method="ngram", direct_max_tokens=0)
    yield c
    c.shutdown()


def test_speculative_decoding_on_the_decode_worker(cluster, smollm2_path):
    params = SamplingParams(max_tokens=32, temperature=0)
    msgs = ({"role": "user", "content": "Repeat exactly: red green blue, red green blue."},)
    got = tokens(drain(cluster.router.generate.remote(RouterRequest("adv-spec", messages=msgs,
                                                                    params=params))))
    eng = LLMEngine(EngineConfig(num_blocks=160), model_path=smollm2_path)
    eng.add_request("r", messages=list(msgs), params=params)
    ref = []
    while eng.has_unfinished():
        ref += [t for c in eng.step() for t in c.token_ids]
    assert got == ref
    assert_clean(cluster)
    decode = worker_stats(cluster, "decode")
    assert sum(s["spec_proposed"] for s in decode.values()) > 0


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, use_beam_search=True, n=4, temperature=0),
    SamplingParams(max_tokens=12, use_beam_search=True, n=2, temperature=0, length_penalty=0.5),
    SamplingParams(max_tokens=10, n=3, temperature=0.8, seed=5),
], ids=["beam4", "beam2-lp0.5", "n3-seeded"])
def test_beams_and_samples_through_the_cluster(cluster, smollm2_path, params):
    """The prefill worker computes the prompt's KV (all but the last token), the decode worker
    pulls it and forks the beams / samples over the received blocks: the same beams, scores
    and samples as one engine, with every block back afterwards."""
    before = counters(cluster)["pd"]
    chunks = drain(cluster.router.generate.remote(RouterRequest(f"adv-{params.n}-{params.seed}",
                                                                messages=MSGS, params=params)))
    got = collect("x", (), chunks)
    ref = _single(smollm2_path, params, speculative_method="ngram")  # configured as the decode
    assert counters(cluster)["pd"] == before + 1
    if params.use_beam_search:
        assert [b.token_ids for b in got.beams] == [b.token_ids for b in ref.beams]
        assert [b.score for b in got.beams] == pytest.approx([b.score for b in ref.beams], abs=1e-4)
    else:
        assert [c.token_ids for c in got.choices] == [c.token_ids for c in ref.choices]
    assert_clean(cluster)


def test_int8_model_and_kv_cache_serve_through_the_cluster(start_cluster, smollm2_path):
    params = SamplingParams(max_tokens=12, temperature=0)
    c = start_cluster(quantization="int8", kv_cache_dtype="int8", direct_max_tokens=0)
    try:
        got = tokens(drain(c.router.generate.remote(RouterRequest("adv-q", messages=MSGS,
                                                                  params=params))))
        assert counters(c)["pd"] >= 1  # the int8 KV (with its scales) crossed the handoff
        assert_clean(c)
    finally:
        c.shutdown()
    ref = _single(smollm2_path, params, quantization="int8", kv_cache_dtype="int8")
    assert got == list(ref.token_ids)
