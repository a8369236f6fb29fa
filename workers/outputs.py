"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.workers.sampler import Logprobs


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)  # not frozen: one is made per row per step, and a frozen init costs 4x
class TokenChunk:
    """New tokens of one request since its previous chunk (a stream increment); not to be
    changed once made."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str  # text delta; stop strings are never in it
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: tuple[Logprobs, ...] = ()
    usage: Usage | None = None
    error: str | None = None
    index: int = 0  # which sample of an n > 1 request (a sample ends at its finish_reason)
    beams: tuple = ()  # beam search: BeamResult per returned beam, best first (final chunk)
    # the first chunk a decode worker streams after a P/D handoff: the KV bytes that reached
    # it (blocks it held in its prefix cache were not moved)
    handoff_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A finished request, as the offline API returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: tuple[Logprobs, ...]
    usage: Usage
    beams: tuple = ()  # beam search: every returned beam (BeamResult), best first
    choices: tuple[RequestOutput, ...] = ()  # n > 1: one output per sample, by index
