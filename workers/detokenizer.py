"""Incremental detokenization that never splits a multi-byte character, and stop strings."""

from __future__ import annotations

from typing import Any

from pdserve.workers.sequence import Sequence

# Decoding restarts this many tokens before the new ones so that tokenizers that
# drop a leading space on the first token (SentencePiece) still give the right delta.
_CONTEXT = 5


def init_offsets(seq: Sequence) -> None:
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(0, seq.num_prompt_tokens - _CONTEXT)


def decode_new_text(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> str:
    """Text added by the tokens after ``seq.read_offset``; '' while a character is incomplete."""
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset],
                              skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return full[len(prefix):]
    return ""


def find_stop(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that overlaps text[new_from:]: (index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
