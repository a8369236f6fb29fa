"""The gRPC front (cluster/server.py) on a real 1P+1D cluster: streaming from another process,
auth on every RPC but health, TLS and mTLS, rate limits and the queue bound, bad inputs named
by field, and a client that leaves mid-stream freeing its blocks everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_util import (
    KEY_A,
    KEY_B,
    QUESTION,
    auth,
    clean,
    make_certs,
    serving,
    shared_cluster,
    sse_text,
)

from pdserve.cluster.api import pdserve_pb2 as pb
from pdserve.cluster.api import pdserve_pb2_grpc as pb_grpc
from pdserve.cluster.auth import fingerprint
from pdserve.cluster.grpc_client import Client, Target, chat_request, sampling, text_request

pytestmark = pytest.mark.timeout(300)
GENERATE = "/pdserve.v1.PdServe/Generate"
# A stream that outlives any test that does not read it to the end.
LONG = sampling(max_tokens=400, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, start_cluster: Any) -> Any:
    return shared_cluster(request, start_cluster)


@pytest.fixture(scope="module")
def server(cluster: Any) -> Any:
    with serving(cluster, api_keys=(KEY_A, KEY_B), max_message_bytes=1 << 20) as bg:
        yield bg


def md(key: str | None) -> tuple:
    return (("authorization", f"Bearer {key}"),) if key else ()


def client(port: int, key: str | None = KEY_A, **tls: Any) -> Client:
    return Client(Target(f"127.0.0.1:{port}" if not tls else f"localhost:{port}", key, **tls))


def code_of(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


CLIENT_SCRIPT = """
import sys
import grpc
from pdserve.cluster.api import pdserve_pb2 as pb, pdserve_pb2_grpc as pb_grpc

address, key = sys.argv[1:3]
stub = pb_grpc.PdServeStub(grpc.insecure_channel(address))
req = pb.GenerateRequest(
    chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=sys.argv[3])]),
    sampling_params=pb.SamplingParams(max_tokens=24, temperature=0.0))
n = 0
for r in stub.Generate(req, metadata=[("authorization", "Bearer " + key)], timeout=120):
    sys.stdout.write(r.text)
    sys.stdout.flush()
    n += 1
loaded = [m for m in ("ray", "torch", "pdserve.workers") if m in sys.modules]
assert not loaded, loaded
print("\\n#responses", n)
"""


def test_stub_only_client_in_another_process_matches_http_sse(server: Any, tmp_path: Any) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), f"127.0.0.1:{server.grpc_port}", KEY_A,
                          QUESTION[0]["content"]], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    grpc_text, _, count = out.stdout.rpartition("\n#responses ")
    grpc_text = grpc_text.rstrip("\n")
    assert int(count) > 2 and "Paris" in grpc_text  # streamed, token by token

    resp = requests.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
                         headers=auth(KEY_A), stream=True, timeout=120,
                         json={"messages": QUESTION, "max_tokens": 24, "temperature": 0,
                               "stream": True})
    assert resp.status_code == 200
    http_text, _ = sse_text(resp)
    assert http_text == grpc_text


def test_every_rpc_but_health_needs_a_valid_key(server: Any, cluster: Any) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = pb_grpc.PdServeStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = pb.GenerateRequest(text="hello", sampling_params=pb.SamplingParams(max_tokens=2))
    calls = {
        "Generate": lambda m: list(stub.Generate(req, metadata=m, timeout=30)),
        "Abort": lambda m: stub.Abort(pb.AbortRequest(request_id="x"), metadata=m, timeout=30),
        "Tokenize": lambda m: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=m, timeout=30),
        "ModelInfo": lambda m: stub.ModelInfo(pb.ModelInfoRequest(), metadata=m, timeout=30),
        "Reflection": lambda m: list(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=m,
            timeout=30)),
    }
    for name, call in calls.items():
        for bad in ((), md("wrong-key"), (("authorization", KEY_A),)):  # no "Bearer"
            code, details = code_of(lambda c=call, b=bad: c(b))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, bad, code, details)
        call(md(KEY_B))  # and with a valid key it works
    # health answers anyone, and says SERVING once the router is ready
    r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    r = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.PdServe"), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for resp in calls["Reflection"](md(KEY_A))
             for s in resp.list_services_response.service}
    assert {"pdserve.v1.PdServe", "grpc.health.v1.Health"} <= names
    channel.close()
    clean(cluster)


def test_tls_and_mutual_tls(cluster: Any, tmp_path: Any) -> None:
    certs = make_certs(tmp_path)
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    with serving(cluster, **tls) as bg:
        with client(bg.grpc_port, None, ca_cert=str(certs.ca)) as c:
            assert c.model_info().max_model_len == 512
        with client(bg.grpc_port, None) as c:  # in clear text against a TLS port
            assert code_of(c.model_info)[0] == grpc.StatusCode.UNAVAILABLE
        r = requests.get(f"https://localhost:{bg.http_port}/v1/models", verify=str(certs.ca),
                         timeout=30)
        assert r.status_code == 200
    with serving(cluster, tls_client_ca=str(certs.ca), **tls) as bg:
        ok = {"ca_cert": str(certs.ca), "client_cert": str(certs.client_cert),
              "client_key": str(certs.client_key)}
        with client(bg.grpc_port, None, **ok) as c:
            text = "".join(r.text for r in c.generate(text_request("Hello", sampling(max_tokens=3))))
            assert text
        with client(bg.grpc_port, None, ca_cert=str(certs.ca)) as c:  # no client certificate
            assert code_of(c.model_info)[0] == grpc.StatusCode.UNAVAILABLE
        rogue = {"ca_cert": str(certs.ca), "client_cert": str(certs.other_client_cert),
                 "client_key": str(certs.other_client_key)}
        with client(bg.grpc_port, None, **rogue) as c:  # a certificate of an untrusted CA
            assert code_of(c.model_info)[0] == grpc.StatusCode.UNAVAILABLE
        url = f"https://localhost:{bg.http_port}/v1/models"
        assert requests.get(url, verify=str(certs.ca), timeout=30,
                            cert=(str(certs.client_cert), str(certs.client_key))).status_code == 200
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=str(certs.ca), timeout=30)
    clean(cluster)


def test_rate_limits_are_per_key(cluster: Any) -> None:
    with serving(cluster, api_keys=(KEY_A, KEY_B), rate_limit_rps=0.1) as bg:
        a, b = client(bg.grpc_port, KEY_A), client(bg.grpc_port, KEY_B)
        assert a.tokenize("one")
        code, details = code_of(lambda: a.tokenize("two"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests/s" in details
        assert b.tokenize("three")  # the other key is unaffected
        code, _ = code_of(lambda: list(a.generate(text_request("Hi", sampling(max_tokens=2)))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with serving(cluster, api_keys=(KEY_A, KEY_B), rate_limit_tps=4.0) as bg:
        a, b = client(bg.grpc_port, KEY_A), client(bg.grpc_port, KEY_B)
        req = text_request("The three primary colors are", sampling(max_tokens=4, temperature=0))
        assert len([r for r in a.generate(req)]) >= 1  # admitted; its tokens put A in debt
        code, details = code_of(lambda: list(a.generate(req)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens/s" in details
        assert list(b.generate(req))[-1].finished
    clean(cluster)


def test_queue_bound_refuses_with_resource_exhausted(cluster: Any) -> None:
    with serving(cluster, max_queued_requests=1) as bg:
        c = client(bg.grpc_port, None)
        stream = c.generate(text_request("Count to a thousand:", LONG))
        first = next(stream)
        assert first.token_ids
        code, details = code_of(lambda: list(c.generate(text_request("Hi", sampling(max_tokens=2)))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests" in details
        stream.cancel()
        clean(cluster)
        assert list(c.generate(text_request("Hi", sampling(max_tokens=2))))[-1].finished


def _bad_sampling() -> list[tuple[dict, str]]:
    return [({"max_tokens": 0}, "sampling_params.max_tokens"),
            ({"temperature": -1.0}, "sampling_params.temperature"),
            ({"temperature": float("nan")}, "sampling_params.temperature"),
            ({"top_k": 0}, "sampling_params.top_k"),
            ({"top_p": 0.0}, "sampling_params.top_p"),
            ({"min_p": 2.0}, "sampling_params.min_p"),
            ({"repetition_penalty": 0.0}, "sampling_params.repetition_penalty"),
            ({"presence_penalty": 3.0}, "sampling_params.presence_penalty"),
            ({"frequency_penalty": -3.0}, "sampling_params.frequency_penalty"),
            ({"seed": -1}, "sampling_params.seed"),
            ({"min_tokens": 9, "max_tokens": 4}, "sampling_params.min_tokens"),
            ({"logprobs": 30}, "sampling_params.logprobs"),
            ({"n": 0}, "sampling_params.n"),
            ({"n": 3, "best_of": 2}, "sampling_params.best_of"),
            ({"stop": [""]}, "sampling_params.stop[0]"),
            ({"stop_token_ids": [5, 10**7]}, "sampling_params.stop_token_ids[1]"),
            ({"max_tokens": 600}, "sampling_params.max_tokens")]


def test_bad_inputs_are_invalid_argument_naming_the_field(server: Any, cluster: Any) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                                    options=[("grpc.max_send_message_length", 8 << 20)])
    raw = channel.unary_stream(GENERATE, request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)

    def send(msg: pb.GenerateRequest | bytes) -> tuple[grpc.StatusCode, str, str | None]:
        data = msg if isinstance(msg, bytes) else msg.SerializeToString()
        with pytest.raises(grpc.RpcError) as e:
            list(raw(data, metadata=md(KEY_A), timeout=60))
        field = dict(e.value.trailing_metadata() or ()).get("pdserve-field")
        return e.value.code(), e.value.details(), field

    def chat(content: str, **kw: Any) -> pb.GenerateRequest:
        return chat_request([{"role": "user", "content": content}], sampling(**kw))

    cases: list[tuple[Any, str]] = [
        (text_request("Hello", sampling(**fields)), field) for fields, field in _bad_sampling()]
    long_chat = chat_request([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "tell me more " * 300}],
                             sampling(max_tokens=8))
    utf8 = chat("XXXX").SerializeToString().replace(b"XXXX", b"\xff\xfe\xfd\xfc")
    utf8_text = text_request("XXXX", sampling()).SerializeToString().replace(b"XXXX", b"a\xc3(b")
    cases += [
        (text_request("", sampling()), "prompt"),
        (text_request("word " * 2000, sampling(max_tokens=8)), "prompt"),
        (long_chat, "messages"),
        (pb.GenerateRequest(sampling_params=sampling()), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 49152])), "prompt_token_ids[1]"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt_token_ids"),
        (chat_request([{"role": "wizard", "content": "hi"}], sampling()), "messages[0].role"),
        (pb.GenerateRequest(text="hi", truncation=7), "truncation"),
        (pb.GenerateRequest(text="hi", request_id="x" * 500), "request_id"),
        (pb.GenerateRequest(text="hi", cache_salt=""), "cache_salt"),
        (utf8, "messages[0].content"),
        (utf8_text, "prompt"),
        (b"\x0a\xff\xff\xff", "request"),  # not a protobuf message at all
    ]
    for msg, field in cases:
        code, details, got = send(msg)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert got == field and details.startswith(field), (field, got, details)
    # a payload over max_message_bytes (1 MiB here) never reaches the handler
    code, _, _ = send(text_request("x" * (2 << 20), sampling()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # and the server keeps serving
    with client(server.grpc_port) as c:
        assert list(c.generate(text_request("Hello", sampling(max_tokens=2))))[-1].finished
    channel.close()
    clean(cluster)


@pytest.mark.parametrize("how", ["cancel", "deadline", "abort"])
def test_client_leaving_mid_stream_frees_blocks_everywhere(server: Any, cluster: Any,
                                                           how: str) -> None:
    before = clean(cluster)
    with client(server.grpc_port) as c:
        req = text_request("Once upon a time, in a land far away,", LONG, request_id=f"leave-{how}")
        stream = c.generate(req, timeout=2.0 if how == "deadline" else 120)
        got, times = [], []
        for _ in range(4):
            got.append(next(stream))
            times.append(time.monotonic())
        assert all(r.token_ids for r in got)
        itl = (times[-1] - times[1]) / (len(times) - 2)
        if how == "cancel":
            stream.cancel()
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        elif how == "deadline":
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            with client(server.grpc_port, KEY_B) as other:  # not B's request
                assert other.abort(f"leave-{how}") is False
            assert c.abort(f"leave-{how}") is True
            rest = list(stream)
            assert rest[-1].finished and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
            assert len(got) + len(rest) < 400
    # Had the request gone on, its remaining tokens would take about this long; it must be
    # gone in well under that.
    remaining_s = itl * 400 - (time.monotonic() - times[0])
    assert remaining_s > 1.0, "decoding too fast for this test to tell an abort from the end"
    after = clean(cluster, timeout=remaining_s / 2)
    for wid, s in after.items():
        assert s["free_blocks"] == before[wid]["free_blocks"] == s["total_blocks"], (wid, s)
        assert s["leases"] == 0 and s["requests"] == 0


def test_auto_truncation_keeps_the_system_prompt_and_recent_turns(server: Any) -> None:
    history = [{"role": "system", "content": "You are a terse assistant."}]
    for i in range(12):
        history += [{"role": "user", "content": f"Tell me fact number {i} about rivers. " * 4},
                    {"role": "assistant", "content": f"Fact {i}: rivers flow downhill. " * 4}]
    history.append({"role": "user", "content": "What is the capital of France?"})
    with client(server.grpc_port) as c:
        code, details = code_of(lambda: list(c.generate(chat_request(history, sampling(max_tokens=16)))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("messages")
        full = len(c.stub.Tokenize(pb.TokenizeRequest(chat=chat_request(history, sampling()).chat),
                                   metadata=md(KEY_A)).token_ids)
        out = list(c.generate(chat_request(history, sampling(max_tokens=16, temperature=0),
                                           truncation="auto")))
    first, last = out[0], out[-1]
    assert first.truncated_prompt_tokens > 0
    assert first.prompt_tokens + first.truncated_prompt_tokens == full
    assert first.prompt_tokens + 16 <= 512
    assert last.usage.prompt_tokens == first.prompt_tokens
    assert last.usage.truncated_prompt_tokens == first.truncated_prompt_tokens


def test_concurrent_streams_share_the_server(server: Any, cluster: Any) -> None:
    results: dict[int, str] = {}

    def run(i: int) -> None:
        with client(server.grpc_port, KEY_A if i % 2 else KEY_B) as c:
            req = chat_request(QUESTION, sampling(max_tokens=12, temperature=0))
            results[i] = "".join(r.text for r in c.generate(req, timeout=120))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 4 and len(set(results.values())) == 1, results
    assert time.monotonic() - t0 < 120
    clean(cluster)


# -- a router with no worker, without Ray -------------------------------------------------------
class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class _Refusing:
    """A router stream whose first item raises, as a router with no live worker does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __aiter__(self) -> _Refusing:
        return self

    async def __anext__(self) -> Any:
        raise self.error


class NoWorkerRouter:
    """Duck-types the router actor's handle: ready() is False and generate() is refused."""

    def __init__(self, model_path: Any) -> None:
        from pdserve.workers.errors import UnavailableError

        async def value(v: Any) -> Any:
            return v

        info = {"model": "m", "path": str(model_path), "vocab_size": 49152,
                "max_model_len": 512, "block_size": 16}
        self.model_info = _Method(lambda: value(info))
        self.ready = _Method(lambda: value(False))
        self.abort = _Method(lambda rid: value(False))
        self.seen: list[Any] = []  # the RouterRequests it was sent

        def generate(req: Any) -> _Refusing:
            self.seen.append(req)
            return _Refusing(UnavailableError("no worker is available"))

        self.generate = _Method(generate)
        self.worker_stats = _Method(lambda: value({}))
        self.stats = _Method(lambda: value({}))
        self.request_timings = _Method(lambda: value([]))


def test_no_worker_is_unavailable_and_health_not_serving(smollm2_path: Any) -> None:
    from pdserve.cluster.app import BackgroundServing
    from pdserve.cluster.config import ServerConfig

    router = NoWorkerRouter(smollm2_path)
    bg = BackgroundServing(router, ServerConfig(api_keys=(KEY_A,)))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{bg.grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while True:  # the health watcher's first poll
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with client(bg.grpc_port) as c:
            code, details = code_of(lambda: list(c.generate(text_request("hi", sampling()))))
            assert code == grpc.StatusCode.UNAVAILABLE and "no worker" in details
            # what reached the router: token ids tokenized by the front, the session scoped
            # to the caller, a cluster-unique id derived from the caller's
            req = chat_request(QUESTION, sampling(max_tokens=3), request_id="mine")
            req.session_id = "s1"
            assert code_of(lambda: list(c.generate(req)))[0] == grpc.StatusCode.UNAVAILABLE
        sent = router.seen[-1]
        assert sent.session_id == f"{fingerprint(KEY_A.encode())}/s1"
        assert sent.request_id.startswith("mine-") and sent.messages is None
        assert list(sent.prompt_token_ids) == bg.front.prompts.apply_chat_template(QUESTION)
        assert sent.params.max_tokens == 3
        base = f"http://127.0.0.1:{bg.http_port}"
        assert requests.get(f"{base}/health", timeout=10).status_code == 503
        r = requests.post(f"{base}/v1/completions", headers=auth(KEY_A), timeout=10,
                          json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert bg.front.admission.in_flight == 0  # the refused requests left no slot behind
        channel.close()
    finally:
        bg.stop()
