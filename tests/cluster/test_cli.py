"""The ``pdserve`` command (cluster/cli.py, bench.py): chat and generate as gRPC clients in
their own processes, bench over HTTP and gRPC, and serve joining a running Ray cluster and
shutting down cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from serving_util import KEY_A, QUESTION, auth, clean, serving, shared_cluster, sse_text

pytestmark = pytest.mark.timeout(300)
PDSERVE = str(Path(sys.executable).with_name("pdserve"))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, start_cluster: Any) -> Any:
    return shared_cluster(request, start_cluster)


@pytest.fixture(scope="module")
def server(cluster: Any) -> Any:
    with serving(cluster, api_keys=(KEY_A,)) as bg:
        yield bg


def pdserve(*args: str, stdin: str | None = None, timeout: float = 180,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PDSERVE, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_chat_streams_two_turns_and_matches_http(server: Any, cluster: Any) -> None:
    address = f"127.0.0.1:{server.grpc_port}"
    out = pdserve("chat", "--address", address, "--max-tokens", "24", "--temperature", "0",
                  "--usage", stdin=QUESTION[0]["content"] + "\nAnd of Germany?\n",
                  env={"PDSERVE_API_KEY": KEY_A})
    assert out.returncode == 0, out.stderr[-2000:]
    first, second, *_ = out.stdout.split("\n")
    assert "Paris" in first and "Berlin" in second
    usage = re.findall(r"\[prompt (\d+) \(cached (\d+)\), completion (\d+)\]", out.stderr)
    assert len(usage) == 2 and int(usage[1][0]) > int(usage[0][0])  # the history grew
    assert int(usage[1][1]) >= 32  # and the first turn's blocks were reused
    r = requests.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
                      headers=auth(KEY_A), stream=True, timeout=120,
                      json={"messages": QUESTION, "max_tokens": 24, "temperature": 0,
                            "stream": True})
    assert sse_text(r)[0] == first
    clean(cluster)


def test_generate_is_a_pure_grpc_client(server: Any) -> None:
    address = f"127.0.0.1:{server.grpc_port}"
    code = ("import sys; from pdserve.cluster import cli; "
            f"rc = cli.main(['generate', '--address', '{address}', '--api-key', '{KEY_A}', "
            "'--max-tokens', '5', '--temperature', '0', '--usage', 'The capital of France is']); "
            "heavy = [m for m in ('ray', 'torch', 'pdserve.workers') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() and "completion 5]" in out.stderr
    denied = pdserve("generate", "--address", address, "hello", env={"PDSERVE_API_KEY": ""})
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def test_bench_over_http_and_grpc(server: Any, cluster: Any, tmp_path: Path) -> None:
    common = ["--api-key", KEY_A, "--num-prompts", "6", "--random-output-len", "6",
              "--goodput", "ttft:60000", "tpot:60000", "--disable-progress"]
    http = tmp_path / "http.json"
    out = pdserve("bench", "--backend", "openai-chat", "--base-url",
                  f"http://127.0.0.1:{server.http_port}", "--dataset", "random",
                  "--random-input-len", "24", "--random-range-ratio", "0.5",
                  "--request-rate", "20", "--burstiness", "0.5", "--result-file", str(http),
                  "--plot", str(tmp_path / "http.png"), *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Request throughput" in out.stdout and "TTFT" in out.stdout
    r = json.loads(http.read_text())
    assert r["completed"] == 6 and r["failed"] == 0
    outs = [q["output_tokens"] for q in r["requests"]]
    assert all(3 <= n <= 9 for n in outs) and r["total_output_tokens"] == sum(outs)  # +-50%
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert set(r[m]) == {"mean", "median", "std", "p50", "p90", "p99"}
        assert 0 < r[m]["p50"] <= r[m]["p99"]
    assert r["goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "http.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in out.stderr

    before = _cluster_hits(server)
    grpc_json = tmp_path / "grpc.json"
    out = pdserve("bench", "--backend", "grpc", "--address", f"127.0.0.1:{server.grpc_port}",
                  "--dataset", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "48",
                  "--suffix-len", "8", "--max-concurrency", "2", "--result-file",
                  str(grpc_json), *common)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(grpc_json.read_text())
    assert r["completed"] == 6 and r["total_output_tokens"] == 36
    assert r["total_input_tokens"] == 6 * 56
    assert _cluster_hits(server) - before >= 4 * 48  # 4 of 6 prompts reuse a cached prefix
    clean(cluster)


def _cluster_hits(server: Any) -> float:
    text = requests.get(f"http://127.0.0.1:{server.http_port}/metrics", headers=auth(KEY_A),
                        timeout=30).text
    return float(re.search(r"^pdserve:cluster_prefix_cache_hits_total (\S+)$", text, re.M)[1])


def test_serve_joins_a_running_cluster_and_stops_on_sigterm(ray_session: Any,
                                                            tmp_path: Path) -> None:
    gcs = ray_session.get_runtime_context().gcs_address
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [PDSERVE, "serve", "--address", gcs, "--prefill", "0", "--decode", "1",
             "--num-blocks", "64", "--grpc-port", "0", "--http-port", "0",
             "--api-key-env", "PDSERVE_TEST_KEYS"],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PDSERVE_TEST_KEYS": "k1,k2"})
    try:
        deadline = time.monotonic() + 150
        ports = None
        while ports is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            ports = re.search(r"gRPC on [\d.]+:(\d+), HTTP on [\d.]+:(\d+)", log.read_text())
            time.sleep(0.5)
        grpc_port, http_port = ports.groups()
        while requests.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        out = pdserve("generate", "--address", f"127.0.0.1:{grpc_port}", "--api-key", "k2",
                      "--max-tokens", "4", "--temperature", "0", "Hello")
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
        denied = pdserve("generate", "--address", f"127.0.0.1:{grpc_port}", "--api-key", "k3",
                         "Hello")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        assert "shutting down" in log.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{http_port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_config_from_yaml_flags_and_key_env(tmp_path: Path, monkeypatch: Any) -> None:
    from pdserve.cluster import cli

    cfg_file = tmp_path / "pdserve.yaml"
    cfg_file.write_text("decode: {replicas: 2, num_cpus: 2}\n"
                        "server: {http_port: 9000, api_keys: [from-file], rate_limit_rps: 5}\n")
    args = cli.parser().parse_args(["serve", "--config", str(cfg_file), "--prefill", "0",
                                    "--num-blocks", "64", "--address", "auto", "--grpc-port",
                                    "0", "--api-key-env", "PDSERVE_KEYS_UNDER_TEST"])
    monkeypatch.setenv("PDSERVE_KEYS_UNDER_TEST", " k1, k2 ,")
    cfg = cli.build_config(args)
    assert cfg.ray_address == "auto" and cfg.prefill.replicas == 0
    assert cfg.decode.replicas == 2 and cfg.decode.num_cpus == 2 and cfg.decode.num_blocks == 64
    s = cfg.server
    assert (s.http_port, s.grpc_port, s.rate_limit_rps) == (9000, 0, 5)
    assert s.api_keys == ("from-file", "k1", "k2") and s.host == "127.0.0.1"
    monkeypatch.setenv("PDSERVE_KEYS_UNDER_TEST", "")
    with pytest.raises(SystemExit, match="empty"):  # asked for keys, got none: do not serve open
        cli.build_config(args)
