"""OpenAI response bodies and server-sent events from a request's chunks (no I/O)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.workers.outputs import TokenChunk, Usage


def usage_json(usage: Usage | None, truncated: int, fallback: tuple[int, int]) -> dict:
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else fallback
    out = {"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": usage.cached_tokens if usage else 0}}
    if truncated:
        out["truncated_prompt_tokens"] = truncated
    return out


def logprobs_json(chunk: TokenChunk, chat: bool, token_text: Callable[[int], str],
                  offset: int = 0) -> dict | None:
    if not chunk.logprobs:
        return None
    if chat:
        def entry(tid: int, lp: float) -> dict:
            s = token_text(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in chunk.logprobs]}
    tokens = [token_text(lp.token_id) for lp in chunk.logprobs]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in chunk.logprobs],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in chunk.logprobs],
            "text_offset": offsets}


@dataclass(slots=True)
class Choice:
    """One sample's text and logprobs gathered for a non-streamed reply."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    length: int = 0


def merge_logprobs(parts: list[dict], chat: bool) -> dict | None:
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def completion_response(kind: str, rid: str, created: int, model: str, chunks: list[TokenChunk],
                        prompt_tokens: int, truncated: int,
                        token_text: Callable[[int], str]) -> dict:
    """The non-streamed reply of ``kind`` "chat" or "completion" from all of a request's chunks."""
    chat = kind == "chat"
    choices: dict[int, Choice] = {}
    usage, generated = None, 0
    beams = ()
    for c in chunks:
        ch = choices.setdefault(c.index, Choice())
        ch.text.append(c.text)
        lp = logprobs_json(c, chat, token_text, ch.length)
        if lp is not None:
            ch.logprobs.append(lp)
        ch.length += len(c.text)
        generated += len(c.token_ids)
        if c.finish_reason is not None:
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
        usage = c.usage or usage
        beams = c.beams or beams
    if beams:  # beam search: the returned beams are the choices, best first
        choices = {i: Choice([b.text], [], "stop") for i, b in enumerate(beams)}
    out = []
    for i, ch in sorted(choices.items()):
        text = "".join(ch.text)
        body: dict[str, Any] = {"index": i}
        if chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        body.update(logprobs=merge_logprobs(ch.logprobs, chat), finish_reason=ch.finish_reason,
                    stop_reason=ch.stop_reason)
        out.append(body)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": out,
            "usage": usage_json(usage, truncated, (prompt_tokens, generated))}


def stream_event(kind: str, rid: str, created: int, model: str, choices: list[dict],
                 usage: dict | None = None, with_usage: bool = False) -> bytes:
    chat = kind == "chat"
    obj: dict[str, Any] = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
                           "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": model, "choices": choices}
    if with_usage:
        obj["usage"] = usage
    return sse_data(obj)


def sse_data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def stream_choice(chunk: TokenChunk, chat: bool, first: bool, token_text: Callable[[int], str],
                  offset: int) -> dict:
    body: dict[str, Any] = {"index": chunk.index}
    if chat:
        body["delta"] = ({"role": "assistant", "content": chunk.text} if first
                         else {"content": chunk.text})
    else:
        body["text"] = chunk.text
    body.update(logprobs=logprobs_json(chunk, chat, token_text, offset),
                finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason)
    return body


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
