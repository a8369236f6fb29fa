"""Fitting a prompt into the context: a clear error by default, or (mode "auto") dropping the
oldest chat turns (never the system prompt) or the oldest tokens of a text prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.workers.errors import InvalidRequestError

MODES = ("disabled", "auto")


@dataclass(frozen=True, slots=True)
class Fitted:
    """A prompt that fits: its token ids and what was dropped to get there."""

    token_ids: list[int]
    messages: list[dict] | None = None  # the kept messages (chat prompts only)
    dropped_messages: int = 0
    dropped_tokens: int = 0
    cached_tokens: int = 0  # set by cache-aware truncation: leading tokens cached somewhere


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidRequestError("truncation", f"must be one of {MODES}, got {mode!r}")


def _budget(max_model_len: int, max_tokens: int) -> int:
    if max_tokens >= max_model_len:
        raise InvalidRequestError(
            "sampling_params.max_tokens",
            f"{max_tokens} leaves no room for a prompt in the model's context of {max_model_len}")
    return max_model_len - max_tokens


def fit_tokens(ids: list[int], max_model_len: int, max_tokens: int, mode: str,
               field: str) -> Fitted:
    """A text or token-id prompt; "auto" keeps its last tokens that fit."""
    check_mode(mode)
    budget = _budget(max_model_len, max_tokens)
    if len(ids) <= budget:
        return Fitted(ids)
    if mode != "auto":
        raise InvalidRequestError(
            field, f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} the context "
                   f"of {max_model_len} leaves room for {budget} (or set truncation to 'auto')")
    return Fitted(ids[len(ids) - budget:], dropped_tokens=len(ids) - budget)


def turn_starts(messages: Sequence[dict], first: int) -> list[int]:
    """Indices from ``first`` on where a turn begins (a user message opens a turn)."""
    starts = [first]
    starts += [i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user"]
    return starts


def fit_chat(messages: list[dict], max_model_len: int, max_tokens: int, mode: str,
             encode: Callable[[list[dict]], list[int]]) -> Fitted:
    """Chat messages; "auto" keeps the leading system messages and the most recent whole
    turns that fit. ``encode`` applies the chat template (it validates the messages).
    """
    check_mode(mode)
    budget = _budget(max_model_len, max_tokens)
    ids = encode(messages)
    if len(ids) <= budget:
        return Fitted(ids, list(messages))
    if mode != "auto":
        raise InvalidRequestError(
            "messages", f"the chat is {len(ids)} tokens; with max_tokens={max_tokens} the "
                        f"context of {max_model_len} leaves room for {budget}; shorten it or "
                        "set truncation to 'auto'")
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    starts = turn_starts(messages, head)

    def kept(start: int) -> list[dict]:
        return list(messages[:head]) + list(messages[start:])

    # Fewer turns never need more tokens, so find the earliest start that fits by bisection.
    lo, hi = 0, len(starts) - 1
    best: tuple[int, list[int]] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        mid_ids = encode(kept(starts[mid])) if starts[mid] < len(messages) else []
        if mid_ids and len(mid_ids) <= budget:
            best, hi = (mid, mid_ids), mid - 1
        else:
            lo = mid + 1
    if best is None:
        last = encode(kept(starts[-1])) if starts[-1] < len(messages) else ids
        raise InvalidRequestError(
            "messages", f"even the system prompt and the last turn alone are {len(last)} "
                        f"tokens; with max_tokens={max_tokens} the context of {max_model_len} "
                        f"leaves room for {budget}")
    start = starts[best[0]]
    return Fitted(best[1], kept(start), dropped_messages=start - head,
                  dropped_tokens=len(ids) - len(best[1]))


def later_cuts(messages: list[dict], fitted: Fitted, encode: Callable[[list[dict]], list[int]],
               limit: int = 8) -> list[Fitted]:
    """``fitted`` (the cut keeping the most turns) and up to ``limit - 1`` later turn
    boundaries, each a prompt that also fits: the candidates of cache-aware truncation."""
    if not fitted.dropped_messages or fitted.messages is None:
        return [fitted]
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    first = head + fitted.dropped_messages
    total = len(encode(messages))
    out = [fitted]
    for start in turn_starts(messages, first)[1:limit]:
        kept = list(messages[:head]) + list(messages[start:])
        ids = encode(kept)
        out.append(Fitted(ids, kept, dropped_messages=start - head, dropped_tokens=total - len(ids)))
    return out


def prefer_cached(candidates: list[Fitted], cached: list[int], block_size: int) -> Fitted:
    """Cache-aware truncation: among cuts that fit, keep the one whose prompt has the most
    leading tokens already cached in the cluster; on a tie (or a gain under one block) keep
    more context. A cut that keeps a cached prefix saves its whole prefill."""
    best, best_cached = candidates[0], cached[0]
    for cand, c in zip(candidates[1:], cached[1:], strict=True):
        if c >= best_cached + block_size:
            best, best_cached = cand, c
    return Fitted(best.token_ids, best.messages, best.dropped_messages, best.dropped_tokens,
                  cached_tokens=best_cached)
