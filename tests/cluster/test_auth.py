"""API keys, token buckets and the queue bound (cluster/auth.py), without servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.auth import (
    ANONYMOUS,
    Admission,
    ApiKeys,
    RateLimiter,
    UnauthenticatedError,
    fingerprint,
    load_tls,
)
from pdserve.workers.errors import InvalidRequestError, QueueFullError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_keys_identify_callers_by_fingerprint() -> None:
    keys = ApiKeys(["alpha", "beta", ""])
    assert keys.enabled
    assert keys.identify("Bearer alpha") == fingerprint(b"alpha") != keys.identify("bearer  beta")
    for bad in (None, "", "alpha", "Bearer", "Bearer gamma", "Basic alpha", "Bearer alph"):
        with pytest.raises(UnauthenticatedError):
            keys.identify(bad)
    assert "alpha" not in fingerprint(b"alpha")
    assert ApiKeys([]).identify(None) == ANONYMOUS  # no keys configured: open


def test_request_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    rl = RateLimiter(2.0, None, clock)
    rl.admit("a")
    rl.admit("a")  # capacity: one second's worth
    with pytest.raises(QueueFullError, match="requests/s"):
        rl.admit("a")
    rl.admit("b")  # per caller
    clock.t += 0.5
    rl.admit("a")  # one more after half a second
    with pytest.raises(QueueFullError):
        rl.admit("a")
    clock.t += 100
    for _ in range(2):
        rl.admit("a")  # refilled up to the capacity, not beyond
    with pytest.raises(QueueFullError):
        rl.admit("a")


def test_token_bucket_lets_a_big_request_through_then_makes_it_wait() -> None:
    clock = Clock()
    rl = RateLimiter(None, 10.0, clock)
    rl.admit("a")
    rl.charge_tokens("a", 35)  # in debt by 25 tokens
    with pytest.raises(QueueFullError, match="tokens/s"):
        rl.admit("a")
    rl.admit("b")
    clock.t += 2.4
    with pytest.raises(QueueFullError):
        rl.admit("a")
    clock.t += 0.2  # debt paid back after 2.5 s
    rl.admit("a")
    with pytest.raises(ValueError):
        RateLimiter(0.0, None)


def test_admission_bounds_requests_in_flight() -> None:
    adm = Admission(2)
    adm.enter()
    adm.enter()
    with pytest.raises(QueueFullError, match="max_queued_requests"):
        adm.enter()
    adm.leave()
    adm.enter()
    assert adm.in_flight == 2


def test_tls_configuration_is_all_or_nothing(tmp_path: Path) -> None:
    assert load_tls(None, None, None) is None
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    with pytest.raises(InvalidRequestError) as e:
        load_tls(str(tmp_path / "c.pem"), None, None)
    assert e.value.field == "config.server.tls_cert"
    with pytest.raises(InvalidRequestError) as e:
        load_tls(None, None, str(tmp_path / "c.pem"))  # mTLS without a server certificate
    assert e.value.field == "config.server.tls_cert"
    with pytest.raises(InvalidRequestError) as e:
        load_tls(str(tmp_path / "c.pem"), str(tmp_path / "missing.pem"), None)
    assert e.value.field == "config.server.tls_key"
    files = load_tls(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), None)
    assert files is not None and files.cert == b"cert" and files.client_ca is None
