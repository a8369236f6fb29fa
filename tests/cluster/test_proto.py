"""The public contract (proto/pdserve/v1/pdserve.proto) and its committed stubs: they match a
fresh generation, the sampling message mirrors SamplingParams, and the wire walker
(cluster/wire.py) names the field that is not UTF-8.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from pdserve.cluster.api import pdserve_pb2 as pb
from pdserve.cluster.wire import invalid_utf8_field
from pdserve.workers.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "cluster" / "api"
GENERATED = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")
# protoc names its own version; a different grpcio-tools may write other numbers there.
VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:\s+.*\n)*?\))$", re.M)


def normalize(text: str) -> str:
    return VERSION_LINES.sub("<version>", text)


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (API / name).read_text()
        assert normalize(fresh) == normalize(committed), (
            f"cluster/api/{name} is stale: run `python scripts/gen_proto.py`")
    grpc_stub = (API / "pdserve_pb2_grpc.py").read_text()
    assert "from pdserve.cluster.api import pdserve_pb2" in grpc_stub
    assert "from pdserve.v1 import" not in grpc_stub


def test_sampling_message_mirrors_sampling_params() -> None:
    ours = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
    wire = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert wire == ours
    for f in pb.SamplingParams.DESCRIPTOR.fields:  # unset must be distinguishable from 0
        assert f.is_repeated or f.has_presence, f.name


def test_generate_request_carries_the_whole_request() -> None:
    fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"request_id", "text", "token_ids", "chat", "sampling_params", "priority",
            "cache_salt", "truncation"} <= fields
    oneof = pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"text", "token_ids", "chat"}
    usage = set(pb.Usage.DESCRIPTOR.fields_by_name)
    assert {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"} <= usage
    service = pb.DESCRIPTOR.services_by_name["PdServe"]
    assert {m.name for m in service.methods} == {"Generate", "Abort", "Tokenize", "ModelInfo"}
    assert service.methods_by_name["Generate"].server_streaming  # type: ignore[attr-defined]


def test_wire_walker_names_the_field_that_is_not_utf8() -> None:
    msgs = [pb.ChatMessage(role="user", content="fine"), pb.ChatMessage(role="user", content="QQQQ")]
    req = pb.GenerateRequest(request_id="r", chat=pb.ChatMessages(messages=msgs),
                             sampling_params=pb.SamplingParams(max_tokens=3, stop=["ok", "ZZ"]))
    good = req.SerializeToString()
    assert invalid_utf8_field(pb.GenerateRequest.DESCRIPTOR, good) is None
    bad = good.replace(b"QQQQ", b"Q\xffQQ")
    assert invalid_utf8_field(pb.GenerateRequest.DESCRIPTOR, bad) == "chat.messages[1].content"
    bad = good.replace(b"ZZ", b"\xc3(")
    assert invalid_utf8_field(pb.GenerateRequest.DESCRIPTOR, bad) == "sampling_params.stop[1]"
    for junk in (b"\xff", b"\x0a\x7f", good[:-3]):  # truncated or malformed: no field, no crash
        invalid_utf8_field(pb.GenerateRequest.DESCRIPTOR, junk)
