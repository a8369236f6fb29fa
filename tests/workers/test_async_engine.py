"""Tests of pdserve.workers.async_engine: streaming, multi-byte text, aborts, errors to the caller.

The engine runs on the AsyncEngine's own thread; the tests only reach it through the
AsyncEngine (``acall``) while that thread is alive.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from pdserve.workers.async_engine import AsyncEngine
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
NUM_BLOCKS = 96


@pytest.fixture(scope="module")
def prompts(smol_engine) -> dict[str, list[int]]:
    eng = smol_engine(num_blocks=NUM_BLOCKS)
    return {
        "capital": eng.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                             "France? Answer in one short sentence."}]),
        "emoji": eng.tokenizer.encode("Emoji list: 😀 😃 😄 😁 😆 😅 😂 🤣 😊 😇 🙂 🙃 😉 😌 😍"),
        "chinese": eng.apply_chat_template([{"role": "user", "content": "Translate 'good morning' to "
                                             "Chinese. Reply with only the translation."}]),
        "story": eng.tokenizer.encode("Tell me a long story about a lighthouse keeper."),
    }


@pytest.fixture(scope="module")
def reference(smol_engine, run_engine, prompts) -> dict[str, list[int]]:
    """Greedy tokens of each prompt, from the same engine run synchronously."""
    eng = smol_engine(num_blocks=NUM_BLOCKS)
    for name, ids in prompts.items():
        eng.add_request(name, prompt_token_ids=ids, params=GREEDY)
    return {rid: [t for c in cs for t in c.token_ids] for rid, cs in run_engine(eng).items()}


@pytest.fixture(scope="module")
def aengine(smol_engine, reference):
    eng = smol_engine(num_blocks=NUM_BLOCKS)
    a = AsyncEngine(eng)
    yield a
    a.shutdown()
    assert not a._thread.is_alive()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(a: AsyncEngine, rid: str, ids: list[int], params=GREEDY):
    return [c async for c in a.generate(rid, prompt_token_ids=ids, params=params)]


async def wait_idle(a: AsyncEngine) -> None:
    """Until the engine holds no request and every block is free again; then check integrity."""
    def state(e):
        e.check_integrity()
        return list(e.requests), e.block_manager.num_free_blocks, e.has_unfinished()

    for _ in range(200):
        reqs, free, busy = await a.acall(state)
        if not reqs and free == NUM_BLOCKS and not busy:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: requests {reqs}, {free}/{NUM_BLOCKS} blocks free")


def test_streams_one_token_per_chunk_with_text_deltas(aengine, prompts, reference):
    chunks = run(collect(aengine, "cap", prompts["capital"]))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference["capital"]
    assert all(len(c.token_ids) == 1 for c in chunks)
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == len(tokens)
    text = "".join(c.text for c in chunks)
    assert text == "The capital of France is Paris."
    assert sum(1 for c in chunks if c.text) >= 5  # streamed word by word, not at the end


@pytest.mark.parametrize("name", ["emoji", "chinese"])
def test_multibyte_characters_split_across_tokens_stream_intact(aengine, prompts, reference, name):
    tok = aengine.engine.tokenizer
    chunks = run(collect(aengine, name, prompts[name]))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference[name]
    # The model really emits byte tokens that are not characters on their own ...
    assert any("\ufffd" in tok.decode([t]) for t in tokens)
    assert any(c.text == "" for c in chunks[:-1])  # ... so some chunks hold their text back
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == tok.decode(tokens, skip_special_tokens=True)


def test_output_cut_inside_a_character_drops_the_partial_bytes(aengine, prompts):
    tok = aengine.engine.tokenizer
    cut_inside = 0
    for n in range(1, 7):  # the reply is 3-byte characters, one byte token each
        params = SamplingParams(max_tokens=n, temperature=0.0)
        chunks = run(collect(aengine, f"cut{n}", prompts["chinese"], params))
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == n and chunks[-1].finish_reason == "length"
        text = "".join(c.text for c in chunks)
        full = tok.decode(tokens)
        cut_inside += full.endswith("\ufffd")
        assert "\ufffd" not in text and full.rstrip("\ufffd") == text
    assert cut_inside >= 3


def test_breaking_out_of_the_stream_aborts_and_frees_blocks(aengine, prompts):
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=0, ignore_eos=True)

    async def main():
        got = []
        async for c in aengine.generate("walk-away", prompt_token_ids=prompts["story"], params=params):
            got.append(c)
            if len(got) == 3:
                break
        assert all(not c.finished for c in got)
        await wait_idle(aengine)

        # The same through an explicit close, mid-stream.
        agen = aengine.generate("closed", prompt_token_ids=prompts["story"], params=params)
        async with contextlib.aclosing(agen):
            await agen.__anext__()
        await wait_idle(aengine)

    run(main())


def test_a_consumer_whose_loop_closed_does_not_stall_the_engine(aengine, prompts, reference):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    leaked = []

    async def walk_away():
        agen = aengine.generate("orphan", prompt_token_ids=prompts["story"], params=params)
        leaked.append(agen)  # never closed by us: asyncio.run finalizes it, then closes the loop
        await agen.__anext__()

    asyncio.run(walk_away())
    chunks = run(collect(aengine, "after", prompts["capital"]), timeout=30)
    assert [t for c in chunks for t in c.token_ids] == reference["capital"]
    run(wait_idle(aengine))


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(temperature=-1.0), "sampling_params.temperature"),
    (SamplingParams(top_p=1.5), "sampling_params.top_p"),
    (SamplingParams(top_k=0), "sampling_params.top_k"),
    (SamplingParams(max_tokens=0), "sampling_params.max_tokens"),
])
def test_invalid_params_raise_to_the_caller(aengine, params, field):
    async def main():
        with pytest.raises(InvalidRequestError) as e:
            async for _ in aengine.generate("bad", "Hello", params):
                pass
        assert e.value.field == field
        with pytest.raises(InvalidRequestError) as e:
            async for _ in aengine.generate("bad", prompt=""):
                pass
        assert e.value.field == "prompt"
        await wait_idle(aengine)

    run(main())


def test_duplicate_request_id_fails_without_disturbing_the_first(aengine, prompts, reference):
    async def main():
        first = aengine.generate("twin", prompt_token_ids=prompts["capital"], params=GREEDY)
        got = [await first.__anext__()]
        with pytest.raises(InvalidRequestError) as e:
            async for _ in aengine.generate("twin", prompt_token_ids=prompts["story"], params=GREEDY):
                pass
        assert e.value.field == "request_id"
        got += [c async for c in first]
        return [t for c in got for t in c.token_ids]

    assert run(main(), timeout=30) == reference["capital"]


def test_concurrent_streams_match_their_solo_runs(aengine, prompts, reference):
    async def main():
        names = list(prompts)
        outs = await asyncio.gather(*(collect(aengine, f"c-{n}", prompts[n]) for n in names))
        return {n: [t for c in o for t in c.token_ids] for n, o in zip(names, outs, strict=True)}

    assert run(main()) == reference
    run(wait_idle(aengine))
