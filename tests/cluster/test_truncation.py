"""Fitting prompts into the context (cluster/truncation.py) with SmolLM2's real chat template."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.cluster.truncation import fit_chat, fit_tokens, turn_starts
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.prompt import PromptProcessor


@pytest.fixture(scope="module")
def encode(smollm2_path: Path):
    from pdserve.workers.engine import load_tokenizer

    prompts = PromptProcessor(load_tokenizer(smollm2_path), 49152, 512)
    return prompts.apply_chat_template


def chat(turns: int, system: bool = True, words: int = 12) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a careful assistant. " * 3}] if system else []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question {i} " + "about rivers " * words})
        msgs.append({"role": "assistant", "content": f"answer {i} " + "water flows " * words})
    msgs.append({"role": "user", "content": "And the capital of France?"})
    return msgs


def test_a_chat_that_fits_is_untouched(encode) -> None:
    msgs = chat(2)
    f = fit_chat(msgs, 512, 16, "disabled", encode)
    assert f.messages == msgs and f.token_ids == encode(msgs)
    assert f.dropped_tokens == 0 and f.dropped_messages == 0


def test_a_chat_that_does_not_fit_is_refused_by_default(encode) -> None:
    with pytest.raises(InvalidRequestError) as e:
        fit_chat(chat(20), 512, 16, "disabled", encode)
    assert e.value.field == "messages" and "truncation" in e.value.message


@pytest.mark.parametrize("turns,max_tokens,system", [(20, 16, True), (9, 200, True),
                                                      (30, 1, False), (12, 100, True)])
def test_auto_keeps_the_system_prompt_and_the_most_recent_turns_that_fit(
        encode, turns: int, max_tokens: int, system: bool) -> None:
    msgs = chat(turns, system)
    full = encode(msgs)
    f = fit_chat(msgs, 512, max_tokens, "auto", encode)
    assert len(f.token_ids) + max_tokens <= 512
    assert f.token_ids == encode(f.messages)
    assert f.dropped_tokens == len(full) - len(f.token_ids) > 0
    head = 1 if system else 0
    assert f.messages[:head] == msgs[:head]  # the system prompt stays
    kept = f.messages[head:]
    assert kept == msgs[len(msgs) - len(kept):]  # a suffix of the conversation...
    assert kept[0]["role"] == "user"  # ...that starts at a whole turn
    assert f.dropped_messages == len(msgs) - len(f.messages)
    # maximal: the next older turn would not have fit
    starts = turn_starts(msgs, head)
    i = starts.index(len(msgs) - len(kept))
    if i > 0:
        bigger = msgs[:head] + msgs[starts[i - 1]:]
        assert len(encode(bigger)) + max_tokens > 512


def test_auto_refuses_when_even_the_last_turn_does_not_fit(encode) -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "tell me more " * 200}]
    with pytest.raises(InvalidRequestError) as e:
        fit_chat(msgs, 512, 16, "auto", encode)
    assert e.value.field == "messages" and "last turn" in e.value.message


def test_bad_modes_and_max_tokens_are_named(encode) -> None:
    with pytest.raises(InvalidRequestError) as e:
        fit_chat(chat(1), 512, 16, "sometimes", encode)
    assert e.value.field == "truncation"
    with pytest.raises(InvalidRequestError) as e:
        fit_chat(chat(1), 512, 512, "auto", encode)
    assert e.value.field == "sampling_params.max_tokens"
    with pytest.raises(InvalidRequestError) as e:  # invalid messages are the template's to name
        fit_chat([{"role": "wizard", "content": "x"}], 512, 16, "auto", encode)
    assert e.value.field == "messages[0].role"


def test_text_prompts_keep_their_last_tokens() -> None:
    ids = list(range(100, 700))
    with pytest.raises(InvalidRequestError) as e:
        fit_tokens(ids, 512, 12, "disabled", "prompt")
    assert e.value.field == "prompt"
    f = fit_tokens(ids, 512, 12, "auto", "prompt_token_ids")
    assert f.token_ids == ids[-500:] and f.dropped_tokens == 100
    assert fit_tokens(ids[:10], 512, 12, "disabled", "prompt").token_ids == ids[:10]


def test_random_conversations_fit_maximally(encode) -> None:
    rng = random.Random(7)
    truncated = 0
    for _ in range(8):
        msgs = [{"role": "system", "content": "sys " * rng.randint(1, 40)}]
        for _ in range(rng.randint(1, 25)):
            msgs.append({"role": "user", "content": "u " * rng.randint(1, 60)})
            if rng.random() < 0.8:
                msgs.append({"role": "assistant", "content": "a " * rng.randint(1, 60)})
        msgs.append({"role": "user", "content": "last " * rng.randint(1, 30)})
        max_tokens = rng.randint(1, 200)
        try:
            f = fit_chat(msgs, 512, max_tokens, "auto", encode)
        except InvalidRequestError as e:
            assert e.field == "messages"
            assert len(encode([msgs[0], msgs[-1]])) + max_tokens > 512
            continue
        assert len(f.token_ids) + max_tokens <= 512
        assert f.messages[0] == msgs[0] and f.messages[-1] == msgs[-1]
        truncated += f.dropped_messages > 0
    assert truncated >= 3  # the cases exercised truncation, not just fitting
