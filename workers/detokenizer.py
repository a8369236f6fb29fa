"""Incremental detokenization that never splits a multi-byte character, and stop strings.

Two paths with the same text: a ``tokenizers`` ``DecodeStream`` (Rust, one call per token)
where the tokenizer is a fast one, and otherwise the prefix/read offsets below (two Python
``decode`` calls per token, ~5x slower: at 256 rows a step, ~1 ms of host time per step).
"""

from __future__ import annotations

from typing import Any

from pdserve.workers.sequence import Sequence

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - transformers requires tokenizers
    _RustTokenizer = DecodeStream = None

# Decoding restarts this many tokens before the new ones so that tokenizers that
# drop a leading space on the first token (SentencePiece) still give the right delta.
_CONTEXT = 5


def init_offsets(seq: Sequence) -> None:
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(0, seq.num_prompt_tokens - _CONTEXT)


def _open_stream(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> Any:
    """A DecodeStream primed with the context before ``read_offset``, or False where the
    tokenizer is not a fast one, cleans up spaces after decoding (transformers does that in
    Python, the stream does not), or the context ends inside a character (the stream would
    then emit the context's last bytes as new text: the offsets handle that case)."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if (DecodeStream is None or not isinstance(rust, _RustTokenizer)
            or getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return False
    stream = DecodeStream(skip_special_tokens=skip_special_tokens)
    context = seq.token_ids[seq.prefix_offset:seq.read_offset]
    if context and stream.step(rust, context) is None:
        return False
    seq.detok_fed = seq.read_offset
    return stream


def decode_new_text(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> str:
    """Text added by the tokens after ``seq.read_offset``; '' while a character is incomplete."""
    ids = seq.token_ids
    stream = seq.detok
    if stream is None:
        stream = seq.detok = _open_stream(tokenizer, seq, skip_special_tokens)
    if stream is not False:
        n, fed = len(ids), seq.detok_fed
        seq.detok_fed = n
        text = stream.step(tokenizer._tokenizer, ids[fed] if n == fed + 1 else ids[fed:])
        if text is None:
            return ""
        # the offsets move as the other path moves them: a handoff (disagg_engine) carries
        # them, and the receiver picks up from read_offset with either path
        seq.prefix_offset, seq.read_offset = seq.read_offset, n
        return text
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset],
                              skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return full[len(prefix):]
    return ""


def resume_point(tokenizer: Any, token_ids: list[int], num_prompt_tokens: int,
                 skip_special_tokens: bool, streamed: str) -> tuple[str, int, int]:
    """Where a stream picks up from its tokens alone (another worker recomputes it after a
    death or a drain): the outputs' text up to their last whole character, and the
    (prefix, read) offsets after it. Outputs that end inside a character stay unread, so
    the next token completes it there instead of the resumed text starting with U+FFFD and
    losing that character.

    The text is decoded as decode_new_text decodes it, after a few tokens of context
    (SentencePiece tokenizers drop the leading space of a decode's first token).
    ``streamed``: what the client got; the text must begin with it (it may go on with text
    held back for stop strings). Where this tokenizer's decode of the whole range does not,
    the resume goes on from what was streamed."""
    p, n = num_prompt_tokens, len(token_ids)
    c = max(0, p - _CONTEXT)
    base = tokenizer.decode(token_ids[c:p], skip_special_tokens=skip_special_tokens)

    def text_to(end: int) -> str | None:  # None: the context's text is not a prefix
        full = tokenizer.decode(token_ids[c:end], skip_special_tokens=skip_special_tokens)
        return full[len(base):] if full.startswith(base) else None

    k = n
    text = text_to(k)
    # A character's bytes span at most 4 tokens. A U+FFFD the model wrote itself is held
    # back too, as decode_new_text holds it back until the next token.
    while text is not None and k > max(p, n - 3) and text.endswith("\ufffd"):
        k -= 1
        text = text_to(k)
    if text is None or not text.startswith(streamed):
        text, k = streamed, n
    return text, max(0, k - _CONTEXT), k


def find_stop(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that overlaps text[new_from:]: (index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
