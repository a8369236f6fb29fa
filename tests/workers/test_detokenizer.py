"""Tests of pdserve.workers.detokenizer: incremental text never splits a character; stop search."""

from __future__ import annotations

import pytest

from pdserve.workers.detokenizer import decode_new_text, find_stop, init_offsets
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from pdserve.workers.engine import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.mark.parametrize("text", [
    "Hello world, plain ASCII.",
    " 😀 😃 emoji made of byte tokens 🤣🙃",
    "早上好，世界！ mixed 中文 and English",
    "naïve café — “quotes” and ümlauts",
    "  leading spaces\n\nand\ttabs  ",
])
def test_deltas_concatenate_to_the_full_decode_without_replacement_chars(tokenizer, text):
    prompt = tokenizer.encode("Prompt:")
    out = tokenizer.encode(text, add_special_tokens=False)
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
    init_offsets(seq)
    deltas = []
    for t in out:
        seq.token_ids.append(t)
        deltas.append(decode_new_text(tokenizer, seq, skip_special_tokens=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(out) == text
    if any(ord(ch) > 0xFFFF for ch in text):  # 4-byte characters span two tokens here
        assert "" in deltas


def test_special_tokens_are_skipped_or_kept(tokenizer):
    prompt = tokenizer.encode("Hi")
    for skip, expected in ((True, "ok"), (False, "ok<|im_end|>")):
        seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
        init_offsets(seq)
        text = ""
        for t in tokenizer.encode("ok", add_special_tokens=False) + [2]:
            seq.token_ids.append(t)
            text += decode_new_text(tokenizer, seq, skip_special_tokens=skip)
        assert text == expected


def test_find_stop_returns_the_earliest_stop_overlapping_new_text():
    assert find_stop("hello world", 6, ("world",)) == (6, "world")
    assert find_stop("hello world", 6, ("lo w",)) == (3, "lo w")  # began in old text, ends in new
    assert find_stop("hello world", 9, ("hello",)) is None  # entirely in old text: seen before
    assert find_stop("a STOP b END", 0, ("END", "STOP")) == (2, "STOP")
    assert find_stop("abc", 0, ()) is None
