"""OpenAI request bodies -> :class:`FrontRequest` (no I/O).

Strict: an unknown field, a wrong type, invalid UTF-8 or an unsupported option is a 400 naming
the field, rather than being ignored. The responses are in openai_responses.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.frontend import FrontRequest
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams

# Body field -> SamplingParams field, passed through (SamplingParams.validate checks them).
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repetition_penalty": "repetition_penalty", "seed": "seed", "n": "n",
            "best_of": "best_of", "min_tokens": "min_tokens", "stop": "stop",
            "stop_token_ids": "stop_token_ids", "length_penalty": "length_penalty"}
FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "use_beam_search",
         "early_stopping")
COMMON = {"model", "stream", "stream_options", "max_tokens", "user", "logit_bias", "priority",
          "cache_salt", "truncation", "request_id", "session_id", *SAMPLING, *FLAGS}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "response_format", "tools", "tool_choice", "parallel_tool_calls"}


@dataclass(frozen=True, slots=True)
class Options:
    """How to answer: streamed or not, usage in the stream, which logprobs shape."""

    chat: bool
    stream: bool
    include_usage: bool


def _bad(name: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(name, msg)


def _typed(body: dict, name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _bad(name, f"must be {what}")
    if not isinstance(v, kinds):
        raise _bad(name, f"must be {what}, got {type(v).__name__}")
    return v


def _common(body: dict, allowed: set[str], model: str) -> tuple[dict, Options]:
    for key in body:
        if key not in allowed:
            raise _bad(key, "unknown field")
    name = _typed(body, "model", str, "a string")
    if name is not None and name != model:
        raise _bad("model", f"model {name!r} is not served here; this server serves {model!r}")
    _typed(body, "user", str, "a string")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "is not supported")
    stream = bool(_typed(body, "stream", bool, "a boolean"))
    so = _typed(body, "stream_options", dict, "an object") or {}
    for key in so:
        if key != "include_usage":
            raise _bad(f"stream_options.{key}", "unknown field")
    if so and not stream:
        raise _bad("stream_options", "is only allowed with stream: true")
    include_usage = bool(_typed(so, "include_usage", bool, "a boolean")) if so else False
    kwargs = {SAMPLING[k]: body[k] for k in SAMPLING if body.get(k) is not None}
    for flag in FLAGS:
        if (v := _typed(body, flag, bool, "a boolean")) is not None:
            kwargs[flag] = v
    if isinstance(kwargs.get("stop_token_ids"), list):
        kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
    elif "stop_token_ids" in kwargs:
        raise _bad("stop_token_ids", "must be a list of token ids")
    if isinstance(kwargs.get("stop"), list):
        kwargs["stop"] = tuple(kwargs["stop"])
    elif "stop" in kwargs and not isinstance(kwargs["stop"], str):
        raise _bad("stop", "must be a string or a list of strings")
    front = {"request_id": _typed(body, "request_id", str, "a string") or "",
             "priority": _typed(body, "priority", int, "an integer") or 0,
             "cache_salt": _typed(body, "cache_salt", str, "a string"),
             "truncation": _typed(body, "truncation", str, "a string") or "disabled",
             "session_id": _typed(body, "session_id", str, "a string")}
    return {"kwargs": kwargs, "front": front}, Options(False, stream, include_usage)


def _max_tokens(body: dict, *names: str) -> int | None:
    for name in names:
        v = body.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(name, f"must be an integer, got {type(v).__name__}")
            return v
    return None


def parse_completion(body: dict, model: str) -> tuple[FrontRequest, Options]:
    parts, opts = _common(body, COMPLETION_FIELDS, model)
    if body.get("echo"):
        raise _bad("echo", "is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "is not supported")
    kwargs = parts["kwargs"]
    lp = _typed(body, "logprobs", int, "an integer")
    if lp is not None:
        kwargs["logprobs"] = lp
    mt = _max_tokens(body, "max_tokens")
    if mt is not None:
        kwargs["max_tokens"] = mt
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    params = _params(kwargs)
    if isinstance(prompt, str):
        return FrontRequest(prompt=prompt, params=params, **parts["front"]), opts
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return FrontRequest(prompt_token_ids=tuple(prompt), params=params, **parts["front"]), opts
    if prompt is None:
        raise _bad("prompt", "is required")
    raise _bad("prompt", "must be a string or a list of token ids (one prompt per request)")


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", "only {'type': 'text', 'text': str} parts")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: dict, model: str) -> tuple[FrontRequest, Options]:
    parts, opts = _common(body, CHAT_FIELDS, model)
    kwargs = parts["kwargs"]
    if body.get("tools"):
        raise _bad("tools", "tool calling is not supported")
    if body.get("tool_choice") not in (None, "none"):
        raise _bad("tool_choice", "tool calling is not supported")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _bad("response_format", "only {'type': 'text'} is supported")
    logprobs = _typed(body, "logprobs", bool, "a boolean")
    top = _typed(body, "top_logprobs", int, "an integer")
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    if logprobs:
        kwargs["logprobs"] = top or 0
    mt = _max_tokens(body, "max_completion_tokens", "max_tokens")
    if mt is not None:
        kwargs["max_tokens"] = mt
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        for key in m:
            if key not in ("role", "content", "name"):
                raise _bad(f"messages[{i}].{key}", "unknown field")
        if not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}].role", "must be a string")
        messages.append({"role": m["role"], "content": _content(i, m.get("content"))})
    return (FrontRequest(messages=tuple(messages), params=_params(kwargs),
                         fill_max_tokens=mt is None, **parts["front"]),
            Options(True, opts.stream, opts.include_usage))


def _params(kwargs: dict) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:  # e.g. an unhashable stop list
        raise _bad("stop", str(e)) from e


def http_field(name: str) -> str:
    """The body field an internal field path refers to (``sampling_params.top_p`` -> ``top_p``,
    ``prompt_token_ids[3]`` -> ``prompt[3]``)."""
    name = name.removeprefix("sampling_params.")
    if name.startswith("prompt_token_ids"):
        return "prompt" + name[len("prompt_token_ids"):]
    return name


def find_invalid_utf8(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a surrogate escape (bytes that were not UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if (found := find_invalid_utf8(k, path)) is not None:
                return found
            sub = f"{path}.{k}" if path else str(k)
            if (found := find_invalid_utf8(v, sub)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := find_invalid_utf8(v, f"{path}[{i}]")) is not None:
                return found
    return None


def parse_body(raw: bytes) -> dict:
    """JSON object of a request body; invalid UTF-8 is refused naming the field it is in."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="surrogateescape")
        try:
            where = find_invalid_utf8(json.loads(text))
        except ValueError:
            where = None
        raise _bad(where or "body", "is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise InvalidRequestError("body", f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    return body
