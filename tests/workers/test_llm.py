"""Tests of pdserve.workers.llm: the offline API returns one output per input, in input order."""

from __future__ import annotations

import pytest

from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.llm import LLM
from pdserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# Longest first: with continuous batching the short ones finish first, yet come back in order.
TEXTS = ["A long opening prompt that goes on for quite a few words before it finally stops here",
         "Medium sized prompt text", "Hi"]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(model=str(tiny), num_blocks=64)


@pytest.fixture(scope="module")
def solo(engine_factory, tiny, run_engine):
    """Greedy tokens of one prompt (token ids) run alone on a separate engine."""
    eng = engine_factory(tiny, num_blocks=64)

    def run(ids: list[int], params: SamplingParams = GREEDY) -> tuple[int, ...]:
        eng.add_request("solo", prompt_token_ids=ids, params=params)
        return tuple(t for c in run_engine(eng)["solo"] for t in c.token_ids)

    return run


def test_generate_text_prompts_in_input_order(llm, solo):
    outs = llm.generate(TEXTS, GREEDY)
    assert len(outs) == 3 and len({o.request_id for o in outs}) == 3
    for text, out in zip(TEXTS, outs, strict=True):
        ids = llm.tokenizer.encode(text)
        assert out.prompt_token_ids == tuple(ids)
        assert out.token_ids == solo(ids)
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == "length" and out.usage.completion_tokens == 6
        assert out.usage.prompt_tokens == len(ids)


def test_generate_token_ids_and_per_prompt_params(llm, solo):
    prompts = [list(range(300, 340)), [7, 8, 9], list(range(500, 520))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (2, 9, 5)]
    outs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == [tuple(p) for p in prompts]
    assert [len(o.token_ids) for o in outs] == [2, 9, 5]
    for p, sp, o in zip(prompts, params, outs, strict=True):
        assert o.token_ids == solo(p, sp)


def test_a_single_prompt_gives_a_single_output(llm, solo):
    (by_text,) = llm.generate("Hi", GREEDY)
    (by_ids,) = llm.generate(llm.tokenizer.encode("Hi"), GREEDY)
    assert by_text.token_ids == by_ids.token_ids == solo(llm.tokenizer.encode("Hi"))


def test_chat_one_and_many_conversations_in_order(llm, solo):
    convs = [[{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Tell me everything you know about the ocean."}],
             [{"role": "user", "content": "Hello"}]]
    outs = llm.chat(convs, GREEDY)
    assert len(outs) == 2
    for conv, out in zip(convs, outs, strict=True):
        ids = llm.engine.apply_chat_template(conv)
        assert out.prompt_token_ids == tuple(ids) and out.token_ids == solo(ids)
    (single,) = llm.chat(convs[1], GREEDY)
    assert single.token_ids == outs[1].token_ids


def test_a_bad_prompt_fails_the_call_and_queues_nothing(llm, solo):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["fine", "", "also fine"], GREEDY)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        llm.chat([[{"role": "user", "content": "ok"}], [{"role": "robot", "content": "x"}]], GREEDY)
    assert e.value.field == "messages[0].role"
    assert not llm.engine.requests
    (out,) = llm.generate(["Hi"], GREEDY)  # the next call serves only its own prompt
    assert out.token_ids == solo(llm.tokenizer.encode("Hi"))
    assert not llm.engine.has_unfinished()
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == 64
