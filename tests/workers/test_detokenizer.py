"""Tests of pdserve.workers.detokenizer: incremental text never splits a character; stop search."""

from __future__ import annotations

import pytest

from pdserve.workers.detokenizer import decode_new_text, find_stop, init_offsets, resume_point
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


class _OffsetsOnly:
    """The tokenizer without its Rust core: decode_new_text takes the offsets path."""

    def __init__(self, tok):
        self.decode = tok.decode


def _run(tok, prompt, out, skip, switch_at=None, tok2=None):
    """Deltas of ``out`` after ``prompt``; at ``switch_at`` the state moves to a fresh
    sequence carrying only the offsets (as a P/D handoff does), decoded with ``tok2``."""
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
    init_offsets(seq)
    deltas = []
    for i, t in enumerate(out):
        if i == switch_at:
            moved = Sequence("r", list(seq.token_ids), len(prompt), SamplingParams(), 0.0)
            moved.prefix_offset, moved.read_offset = seq.prefix_offset, seq.read_offset
            seq, tok = moved, tok2
        seq.token_ids.append(t)
        deltas.append(decode_new_text(tok, seq, skip_special_tokens=skip))
    return deltas


def test_stream_and_offsets_paths_give_the_same_text_across_handoffs(tokenizer):
    """The DecodeStream path (fast tokenizers) and the offsets path agree on random tokens,
    byte tokens and special tokens included, and a sequence handed over mid-way (offsets
    only) continues with either path without losing or repeating text."""
    import random

    rng = random.Random(7)
    slow = _OffsetsOnly(tokenizer)
    vocab = len(tokenizer)
    texts = ["naïve café 😀🤣 早上好 ok", "def f(x):\n    return x  # ü", "plain words here"]
    for trial in range(150):
        if trial % 2:
            ids = tokenizer.encode(rng.choice(texts) + rng.choice(texts), add_special_tokens=False)
        else:
            ids = [rng.randrange(vocab) for _ in range(40)]
        cut = rng.randrange(1, len(ids) - 1)
        prompt, out = ids[:cut], ids[cut:]
        skip = rng.random() < 0.5
        want = "".join(_run(slow, prompt, out, skip))
        assert "".join(_run(tokenizer, prompt, out, skip)) == want, (trial, prompt, out)
        switch = rng.randrange(len(out))
        for a, b in ((tokenizer, tokenizer), (tokenizer, slow), (slow, tokenizer)):
            assert "".join(_run(a, prompt, out, skip, switch, b)) == want, (trial, switch)


def test_stream_is_not_shared_by_a_copied_sequence(tokenizer):
    from dataclasses import replace

    prompt = tokenizer.encode("Hi")
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
    init_offsets(seq)
    seq.token_ids.append(tokenizer.encode(" there", add_special_tokens=False)[0])
    decode_new_text(tokenizer, seq, skip_special_tokens=True)
    assert seq.detok not in (None, False)
    child = replace(seq, token_ids=list(seq.token_ids))  # a fork (n > 1, beams)
    assert child.detok is None
    for s, word in ((seq, " one"), (child, " two")):
        s.token_ids.extend(tokenizer.encode(word, add_special_tokens=False))
        assert decode_new_text(tokenizer, s, skip_special_tokens=True) == word


def sentencepiece_like():
    """A Llama-2-style tokenizer built here (no download): SentencePiece's '▁' for spaces,
    byte fallback, and a decoder that drops the leading space of a decode's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in ("▁", "▁Say", ":", "▁Hello", "▁world", "▁!", "▁a", "▁b", "▁x"):
        vocab[w] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.mark.parametrize(("which", "text"), [
    ("smollm2", " 😀 a 🤣🙃 b 早上好 café"), ("smollm2", "x\ufffd y"),
    ("sentencepiece", "Hello world é ! 😀 a"),
])
def test_a_stream_resumed_from_its_tokens_alone_never_splits_a_character(tokenizer, which, text):
    """A stream cut after any token (the worker died or was drained) and resumed elsewhere
    from its tokens (the router's resume state): what was streamed plus what the new worker
    streams is the whole text, with no U+FFFD of a split character, also when the cut falls
    inside a character whose bytes span several tokens (or after a U+FFFD the model wrote,
    which both sides hold back until the next token)."""
    tokenizer = tokenizer if which == "smollm2" else sentencepiece_like()
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    out = tokenizer.encode(text, add_special_tokens=False)
    inside = 0
    whole = ""  # what one uncut stream gives
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
    init_offsets(seq)
    for t in out:
        seq.token_ids.append(t)
        whole += decode_new_text(tokenizer, seq, skip_special_tokens=True)
    assert whole.strip() == text.strip()
    for cut in range(1, len(out)):
        seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0.0)
        init_offsets(seq)
        streamed = ""
        for t in out[:cut]:
            seq.token_ids.append(t)
            streamed += decode_new_text(tokenizer, seq, skip_special_tokens=True)
        ids = prompt + out[:cut]
        resumed_text, prefix_offset, read_offset = resume_point(tokenizer, ids, len(prompt), True,
                                                                streamed)
        assert resumed_text == streamed and "\ufffd" not in resumed_text
        inside += read_offset < len(ids)
        resumed = Sequence("r", list(ids), len(prompt), SamplingParams(), 0.0)
        resumed.prefix_offset, resumed.read_offset = prefix_offset, read_offset
        rest = ""
        for t in out[cut:]:
            resumed.token_ids.append(t)
            rest += decode_new_text(tokenizer, resumed, skip_special_tokens=True)
        assert streamed + rest == whole, cut
    assert inside  # some cuts fell inside a character
