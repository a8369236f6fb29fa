"""The OpenAI-compatible HTTP front (cluster/http_api.py, openai_protocol.py) and /metrics on
a real 1P+1D cluster: completions and chat (SSE), the error envelope with the right status
and field, auth, per-key 429s, disconnects freeing blocks, and metrics that move.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import pytest
import requests
from serving_util import KEY_A, KEY_B, QUESTION, auth, clean, serving, shared_cluster, sse_text

from pdserve.cluster.openai_protocol import http_field, parse_body, parse_chat, parse_completion
from pdserve.workers.errors import InvalidRequestError

pytestmark = pytest.mark.timeout(300)
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, start_cluster: Any) -> Any:
    return shared_cluster(request, start_cluster)


@pytest.fixture(scope="module")
def server(cluster: Any) -> Any:
    with serving(cluster, api_keys=(KEY_A, KEY_B), max_message_bytes=1 << 20) as bg:
        yield bg


def url(server: Any, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def post(server: Any, path: str, body: Any, key: str | None = KEY_A, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url(server, path), data=data, timeout=120,
                         headers={**auth(key), "Content-Type": "application/json"}, **kw)


def test_chat_streams_with_usage_and_cached_tokens(server: Any, cluster: Any) -> None:
    messages = [{"role": "system", "content": "You answer in one short sentence. " * 3},
                *QUESTION]
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    texts, usages = [], []
    for _ in range(2):  # the second time, the prompt's full blocks are in a prefix cache
        r = post(server, "/v1/chat/completions", body, stream=True)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        text, events = sse_text(r)
        chunks = [e for e in events if isinstance(e, dict)]
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
        texts.append(text)
        usages.append(chunks[-1]["usage"])
    assert texts[0] == texts[1] and "Paris" in texts[0]
    u0, u1 = usages
    assert u0["prompt_tokens"] == u1["prompt_tokens"] > 32
    assert u0["total_tokens"] == u0["prompt_tokens"] + u0["completion_tokens"]
    assert u1["prompt_tokens_details"]["cached_tokens"] >= 32  # two full 16-token blocks
    # the same answer without streaming
    r = post(server, "/v1/chat/completions", {**body, "stream": False, "stream_options": None})
    assert r.status_code == 200
    reply = r.json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": texts[0]}
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
    clean(cluster)


def test_completions_with_token_ids_logprobs_and_stop(server: Any) -> None:
    r = post(server, "/v1/completions", {"prompt": "The three primary colors are",
                                         "max_tokens": 6, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == c["text"] and lp["text_offset"][0] == 0
    assert all(len(t) <= 2 and max(t.values()) <= 0.0 for t in lp["top_logprobs"])
    ids = requests.post(url(server, "/v1/completions"), headers=auth(KEY_A), timeout=60, json={
        "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 4, "temperature": 0}).json()
    assert ids["usage"]["prompt_tokens"] == 5 and ids["usage"]["completion_tokens"] == 4
    r = post(server, "/v1/completions", {"prompt": "The three primary colors are",
                                         "max_tokens": 40, "temperature": 0, "stop": [","],
                                         "stream": True})
    text, events = sse_text(r)
    assert "," not in text and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"][0]["stop_reason"] == ","


def test_models_health_and_auth(server: Any) -> None:
    assert requests.get(url(server, "/health"), timeout=30).status_code == 200  # no key needed
    models = requests.get(url(server, "/v1/models"), headers=auth(KEY_B), timeout=30).json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 512
    calls = [("GET", "/v1/models", None), ("GET", "/metrics", None),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
             ("POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1}),
             ("GET", "/no/such/path", None)]
    for method, path, body in calls:
        for headers in ({}, auth("wrong"), {"Authorization": KEY_A}, {"Authorization": "Basic x"}):
            r = requests.request(method, url(server, path), json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    r = requests.get(url(server, "/no/such/path"), headers=auth(KEY_A), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


BAD_FIELDS = [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "many"}, "max_tokens"),
              ({"temperature": -0.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
              ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"),
              ({"min_p": -1}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
              ({"presence_penalty": 2.5}, "presence_penalty"),
              ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"seed": -3}, "seed"),
              ({"n": 0}, "n"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
              ({"stop": [""]}, "stop[0]"), ({"stop": 5}, "stop"),
              ({"stop_token_ids": [99999999]}, "stop_token_ids[0]"),
              ({"ignore_eos": "yes"}, "ignore_eos"), ({"priority": 1.5}, "priority"),
              ({"truncation": "sometimes"}, "truncation"), ({"logit_bias": {"5": 1}}, "logit_bias"),
              ({"stream_options": {"include_usage": True}}, "stream_options"),
              ({"model": "gpt-4"}, "model"), ({"frobnicate": 1}, "frobnicate"),
              ({"max_tokens": 600}, "max_tokens")]


def test_bad_inputs_get_400_naming_the_field(server: Any, cluster: Any) -> None:
    base = {"prompt": "Hello", "max_tokens": 4}
    cases: list[tuple[str, Any, str | None]] = [
        ("/v1/completions", {**base, **fields}, param) for fields, param in BAD_FIELDS]
    chat = {"messages": QUESTION, "max_tokens": 4}
    cases += [
        ("/v1/completions", {**base, "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"max_tokens": 4}, "prompt"),
        ("/v1/completions", {**base, "prompt": ""}, "prompt"),
        ("/v1/completions", {**base, "prompt": "word " * 2000}, "prompt"),
        ("/v1/completions", {**base, "prompt": [5, -1]}, "prompt[1]"),
        ("/v1/completions", {**base, "prompt": [5, 49152]}, "prompt[1]"),
        ("/v1/completions", {**base, "prompt": [[1], [2]]}, "prompt"),
        ("/v1/completions", {**base, "echo": True}, "echo"),
        ("/v1/chat/completions", {**chat, "messages": []}, "messages"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user"}]}, "messages[0].content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]},
         "messages[0].role"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x", "age": 3}]},
         "messages[0].age"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "tell me more " * 300}]},
         "messages"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": -1}, "max_tokens"),
        ("/v1/completions", b'{"prompt": "Hello", "max_tokens": 4', None),  # malformed JSON
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", b'{"prompt": "a\xc3(b", "max_tokens": 4}', "prompt"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}',
         "messages[0].content"),
    ]
    for path, body, param in cases:
        r = post(server, path, body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        assert param is None or err["message"].startswith(param)
    r = post(server, "/v1/completions", {**base, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(server, "/v1/completions", base)  # and the server keeps serving
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    clean(cluster)


def test_rate_limit_is_429_for_that_key_only(cluster: Any) -> None:
    with serving(cluster, api_keys=(KEY_A, KEY_B), rate_limit_rps=0.1) as bg:
        body = {"prompt": "Hi", "max_tokens": 2}
        assert post(bg, "/v1/completions", body, KEY_A).status_code == 200
        r = post(bg, "/v1/completions", body, KEY_A)
        assert r.status_code == 429 and r.headers["Retry-After"]
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert post(bg, "/v1/completions", body, KEY_B).status_code == 200
        metrics = requests.get(url(bg, "/metrics"), headers=auth(KEY_B), timeout=30).text
        assert metric(metrics, 'pdserve:request_failure_total{code="resource_exhausted"}') == 1


def test_disconnect_mid_stream_frees_blocks(server: Any, cluster: Any) -> None:
    before = clean(cluster)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                       "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    seen, times, buf = 0, [], b""
    while seen < 5:
        buf += sock.recv(65536)
        while b"data: " in buf and b"\n\n" in buf.split(b"data: ", 1)[1]:
            buf = buf.split(b"data: ", 1)[1].split(b"\n\n", 1)[1]
            seen += 1
            times.append(time.monotonic())
    sock.close()  # the client goes away mid-stream
    itl = (times[-1] - times[1]) / (len(times) - 2)
    remaining_s = itl * 400 - (time.monotonic() - times[0])
    assert remaining_s > 1.0
    after = clean(cluster, timeout=remaining_s / 2)
    for wid, s in after.items():
        assert s["free_blocks"] == before[wid]["free_blocks"] == s["total_blocks"], (wid, s)


def test_auto_truncation_is_reported(server: Any) -> None:
    history = [{"role": "system", "content": "You are terse."}]
    for i in range(10):
        history += [{"role": "user", "content": f"Question {i} about mountains. " * 6},
                    {"role": "assistant", "content": f"Answer {i} about mountains. " * 6}]
    history.append({"role": "user", "content": "Name a mountain."})
    body = {"messages": history, "max_tokens": 8, "temperature": 0}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(server, "/v1/chat/completions", {**body, "truncation": "auto"})
    assert r.status_code == 200, r.text
    dropped = int(r.headers["X-Pdserve-Truncated-Tokens"])
    usage = r.json()["usage"]
    assert dropped > 0 and usage["truncated_prompt_tokens"] == dropped
    assert usage["prompt_tokens"] + 8 <= 512


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, exactly); 0 if absent."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def metric_sum(text: str, prefix: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(prefix)}(?:{{[^}}]*}})? ([0-9.e+-]+)$",
                                            text, re.M))


def test_metrics_move_as_requests_run(server: Any, cluster: Any) -> None:
    def scrape() -> str:
        r = requests.get(url(server, "/metrics"), headers=auth(KEY_A), timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.text

    m0 = scrape()
    prompt = "A long shared preamble about the history of the river Thames. " * 4
    for _ in range(2):
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200
    m1 = scrape()
    delta = {name: metric(m1, name) - metric(m0, name) for name in (
        "pdserve:time_to_first_token_seconds_count", "pdserve:e2e_request_latency_seconds_count",
        "pdserve:request_time_per_output_token_seconds_count",
        'pdserve:request_success_total{finished_reason="length"}',
        "pdserve:generation_tokens_total", "pdserve:cluster_prefix_cache_queries_total",
        "pdserve:cluster_prefix_cache_hits_total", "pdserve:prompt_tokens_cached_total")}
    assert delta["pdserve:time_to_first_token_seconds_count"] == 2
    assert delta["pdserve:e2e_request_latency_seconds_count"] == 2
    assert delta["pdserve:request_time_per_output_token_seconds_count"] == 2
    assert delta['pdserve:request_success_total{finished_reason="length"}'] == 2
    assert delta["pdserve:generation_tokens_total"] == 10
    assert delta["pdserve:cluster_prefix_cache_queries_total"] > 0
    assert delta["pdserve:cluster_prefix_cache_hits_total"] >= 32  # the second request's blocks
    assert delta["pdserve:prompt_tokens_cached_total"] >= 32
    assert metric_sum(m1, "pdserve:prefix_cache_hits_total") == metric(
        m1, "pdserve:cluster_prefix_cache_hits_total")
    assert metric(m1, "pdserve:time_to_first_token_seconds_sum") > metric(
        m0, "pdserve:time_to_first_token_seconds_sum")
    for name in ("pdserve:kv_cache_usage_perc", "pdserve:num_requests_running",
                 "pdserve:num_requests_waiting", "pdserve:num_preemptions_total",
                 "pdserve:kv_handoff_bytes_total", "pdserve:kv_handoff_time_seconds_count",
                 "pdserve:request_queue_time_seconds_count",
                 "pdserve:request_prefill_time_seconds_count",
                 "pdserve:request_decode_time_seconds_count",
                 "pdserve:inter_token_latency_seconds_count", "pdserve:num_requests_in_flight"):
        assert re.search(rf"^{re.escape(name)}(\{{|\s)", m1, re.M), name
    assert metric(m1, "pdserve:kv_handoff_bytes_total") > 0  # P/D requests handed off KV
    assert metric(m1, "pdserve:num_requests_in_flight") == 0
    clean(cluster)


# -- request parsing without a server -----------------------------------------------------------
def test_parsing_maps_openai_fields_onto_sampling_params() -> None:
    req, opts = parse_chat({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3, "stop": "x",
        "stream": True, "stream_options": {"include_usage": True}, "seed": 4,
        "truncation": "auto", "user": "u1"}, MODEL)
    assert req.messages == ({"role": "user", "content": "Hi there"},)
    p = req.params
    assert (p.max_tokens, p.logprobs, p.stop, p.seed) == (7, 3, ("x",), 4)
    assert opts.chat and opts.stream and opts.include_usage and req.truncation == "auto"
    assert not req.fill_max_tokens
    req, _ = parse_chat({"messages": QUESTION}, MODEL)
    assert req.fill_max_tokens  # no max_tokens on a chat: up to the context
    req, opts = parse_completion({"prompt": ["Hello"], "max_tokens": None, "top_k": 5}, MODEL)
    assert req.prompt == "Hello" and req.params.max_tokens == 16 and req.params.top_k == 5
    assert not opts.stream and not opts.chat
    assert http_field("sampling_params.top_p") == "top_p"
    assert http_field("prompt_token_ids[3]") == "prompt[3]"
    with pytest.raises(InvalidRequestError) as e:
        parse_body(b'{"a": {"b": ["ok", "\xc3\x28"]}}')
    assert e.value.field == "a.b[1]"
