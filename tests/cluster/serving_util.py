"""Helpers of the serving-front tests (test_server, test_http_api, test_cli): one small cluster
shared by those modules, servers on loopback ports, test certificates, SSE reading.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pd_util import assert_clean

# The prompt must not fit in 512 tokens for the truncation tests; the cluster keeps enough
# blocks (160 x 16 tokens per worker) for a few of those at once.
SERVING_OVERRIDES = {"max_model_len": 512}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY_A, KEY_B = "test-key-a", "test-key-b"
_CLUSTER = pytest.StashKey[Any]()


def shared_cluster(request: pytest.FixtureRequest, start_cluster: Callable[..., Any]) -> Any:
    """One 1P+1D cluster for every serving test module of the session (a start costs ~30 s).

    Kept in the pytest config's stash: a session fixture imported into several modules would
    be a separate fixture (and cluster) per module.
    """
    stash = request.config.stash
    if _CLUSTER not in stash:
        cluster = start_cluster(**SERVING_OVERRIDES)
        stash[_CLUSTER] = cluster

        def shutdown() -> None:
            import ray

            if ray.is_initialized():  # else Ray's shutdown already took the actors
                cluster.shutdown()

        request.config.add_cleanup(shutdown)
    return stash[_CLUSTER]


@contextmanager
def serving(cluster: Any, **server: Any) -> Iterator[Any]:
    """gRPC + HTTP servers (free loopback ports) over ``cluster`` with ServerConfig ``server``."""
    from pdserve.cluster.app import BackgroundServing
    from pdserve.cluster.config import ServerConfig

    if "api_keys" in server:
        server["api_keys"] = tuple(server["api_keys"])
    bg = BackgroundServing(cluster.router, ServerConfig(**server))
    try:
        wait_ready(bg)
        yield bg
    finally:
        bg.stop()


def wait_ready(bg: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not bg.call(bg.front.ready()):
        assert time.monotonic() < deadline, "router never became ready"
        time.sleep(0.1)


def clean(cluster: Any, timeout: float = 30.0) -> dict[str, dict]:
    """Every worker back to all blocks free, no lease, no request (see pd_util.assert_clean)."""
    return assert_clean(cluster, timeout)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def sse_events(resp: requests.Response) -> Iterator[dict | str]:
    """The ``data:`` payloads of a server-sent-event stream: dicts, then the string "[DONE]"."""
    for line in resp.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        yield "[DONE]" if data == b"[DONE]" else json.loads(data)


def sse_text(resp: requests.Response) -> tuple[str, list]:
    events = list(sse_events(resp))
    assert events and events[-1] == "[DONE]", events[-3:]
    text = "".join(c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text", "")
                   for c in events[:-1] if isinstance(c, dict) and c.get("choices"))
    return text, events


# -- certificates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by a CA the server does not trust
    other_client_key: Path


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, pub: Any, issuer: str, signer: Any, ca: bool,
              usage: Any = None, sans: list | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    def write(stem: str, cert: x509.Certificate, k: Any = None) -> tuple[Path, Path | None]:
        c = folder / f"{stem}.crt"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is None:
            return c, None
        kp = folder / f"{stem}.key"
        kp.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        return c, kp

    ca_key, rogue_key = key(), key()
    ca = build("pdserve test CA", ca_key.public_key(), "pdserve test CA", ca_key, True)
    sk, ck, ok = key(), key(), key()
    server = build("localhost", sk.public_key(), "pdserve test CA", ca_key, False,
                   ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = build("client", ck.public_key(), "pdserve test CA", ca_key, False,
                   ExtendedKeyUsageOID.CLIENT_AUTH)
    other = build("other", ok.public_key(), "rogue CA", rogue_key, False,
                  ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = write("ca", ca)
    s_c, s_k = write("server", server, sk)
    c_c, c_k = write("client", client, ck)
    o_c, o_k = write("other", other, ok)
    return Certs(ca_path, s_c, s_k, c_c, c_k, o_c, o_k)  # type: ignore[arg-type]
