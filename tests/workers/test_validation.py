"""Request validation at the engine's door: every bad input is refused with the field it names,
nothing of it stays behind, and the engine serves the next valid request exactly."""

from __future__ import annotations

import pytest

from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams

VOCAB = 49152
GOOD = dict(prompt_token_ids=[504, 3575, 282, 4649, 314], params=SamplingParams(max_tokens=8,
                                                                                 temperature=0.0))

# (kwargs for add_request, expected field); "prompt" etc. replace GOOD's prompt.
BAD = [
    (dict(params=SamplingParams(temperature=-1.0)), "sampling_params.temperature"),
    (dict(params=SamplingParams(top_p=0.0)), "sampling_params.top_p"),
    (dict(params=SamplingParams(top_p=1.5)), "sampling_params.top_p"),
    (dict(params=SamplingParams(top_k=0)), "sampling_params.top_k"),
    (dict(params=SamplingParams(top_k=-2)), "sampling_params.top_k"),
    (dict(params=SamplingParams(max_tokens=0)), "sampling_params.max_tokens"),
    (dict(params=SamplingParams(stop_token_ids=(VOCAB,))), "sampling_params.stop_token_ids[0]"),
    # The context is 8192 tokens: a prompt that fills it, or max_tokens that overflows it.
    (dict(prompt_token_ids=[1] * 8192), "prompt"),
    (dict(params=SamplingParams(max_tokens=8190)), "sampling_params.max_tokens"),
    # Within the context but more KV blocks than this worker has (256 x 16 tokens).
    (dict(params=SamplingParams(max_tokens=5000)), "sampling_params.max_tokens"),
    (dict(prompt_token_ids=[1, VOCAB]), "prompt_token_ids[1]"),
    (dict(prompt_token_ids=[-1, 5]), "prompt_token_ids[0]"),
    (dict(prompt_token_ids=[5, 2.0]), "prompt_token_ids[1]"),
    (dict(prompt_token_ids=[True]), "prompt_token_ids[0]"),
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=None, prompt=""), "prompt"),
    (dict(prompt_token_ids=None, prompt=b"bytes"), "prompt"),
    (dict(prompt_token_ids=None), "prompt"),  # none of prompt / ids / messages
    (dict(prompt="also text"), "prompt"),  # two of them
    (dict(prompt_token_ids=7), "prompt_token_ids"),
    (dict(prompt_token_ids=None, messages=[]), "messages"),
    (dict(prompt_token_ids=None, messages="hello"), "messages"),
    (dict(prompt_token_ids=None, messages=[{"role": "user"}]), "messages[0]"),
    (dict(prompt_token_ids=None, messages=[{"role": "user", "content": 3}]), "messages[0]"),
    (dict(prompt_token_ids=None, messages=[{"role": "user", "content": "hi"}, "hi"]), "messages[1]"),
    (dict(prompt_token_ids=None, messages=[{"role": "wizard", "content": "hi"}]),
     "messages[0].role"),
    (dict(priority="high"), "priority"),
    (dict(cache_salt=5), "cache_salt"),
]


@pytest.fixture(scope="module")
def engine(smol_engine):
    return smol_engine()


@pytest.fixture(scope="module")
def reference(engine, run_engine) -> list[int]:
    engine.add_request("ref", **GOOD)
    return [t for c in run_engine(engine)["ref"] for t in c.token_ids]


def serve_good(engine, run_engine, rid: str = "good") -> list[int]:
    engine.add_request(rid, **GOOD)
    return [t for c in run_engine(engine)[rid] for t in c.token_ids]


@pytest.mark.parametrize(("kwargs", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_input_names_its_field_and_leaves_nothing_behind(engine, run_engine, reference,
                                                             kwargs, field):
    free = engine.block_manager.num_free_blocks
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", **{**GOOD, **kwargs})
    assert e.value.field == field, e.value
    assert "bad" not in engine.requests and not engine.has_unfinished()
    assert engine.scheduler.num_waiting == 0 and engine.block_manager.num_free_blocks == free
    assert serve_good(engine, run_engine, "bad") == reference  # the id is free to reuse


def test_bad_request_ids(engine):
    for rid in ("", None, 5):
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(rid, **GOOD)
        assert e.value.field == "request_id"


def test_duplicate_request_id_is_refused_while_the_first_runs(engine, run_engine, reference):
    engine.add_request("dup", **GOOD)
    engine.step()
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("dup", prompt="something else entirely")
    assert e.value.field == "request_id"
    assert engine.requests["dup"].prompt_token_ids == GOOD["prompt_token_ids"]
    out = run_engine(engine)
    # The first request is untouched: its own first token, then the rest, exactly.
    assert [t for c in out["dup"] for t in c.token_ids] == reference[1:]
    assert serve_good(engine, run_engine, "dup") == reference


def test_a_burst_of_bad_requests_then_a_good_batch(engine, run_engine, reference):
    for i, (kwargs, _) in enumerate(BAD):
        with pytest.raises(InvalidRequestError):
            engine.add_request(f"burst{i}", **{**GOOD, **kwargs})
    for i in range(3):
        engine.add_request(f"ok{i}", **GOOD)
    out = run_engine(engine)
    assert {rid: [t for c in cs for t in c.token_ids] for rid, cs in out.items()} == \
        {f"ok{i}": reference for i in range(3)}
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
