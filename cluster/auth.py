"""Who may call the servers and how fast: API keys, TLS files, per-key token buckets and the
bound on queued requests."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pdserve.workers.errors import InvalidRequestError, PdserveError, QueueFullError

ANONYMOUS = "anonymous"  # the caller's identity when the server has no API keys


class UnauthenticatedError(PdserveError):
    """Missing or unknown API key."""


class ApiKeys:
    """The accepted keys. ``identify`` compares in constant time against every key."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str:
        """The caller's identity (a key fingerprint) from an ``authorization`` header value.

        Raises :class:`UnauthenticatedError` when keys are configured and none matches.
        """
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            raise UnauthenticatedError("missing 'authorization: Bearer <key>'")
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise UnauthenticatedError("authorization must be 'Bearer <key>'")
        candidate = given.strip().encode()
        match = None
        for key in self._keys:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(candidate, key):
                match = key
        if match is None:
            raise UnauthenticatedError("unknown API key")
        return fingerprint(match)


def fingerprint(key: bytes) -> str:
    """A short, non-reversible name for a key, safe for logs and metric labels."""
    return "key-" + hashlib.sha256(key).hexdigest()[:10]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` units per second, holding at most ``capacity``; may go into debt.

    Debt lets one request cost more than the capacity (a long prompt) and still pass
    once, while later requests wait until the debt has been paid back.
    """

    rate: float
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def try_take(self, amount: float, now: float) -> bool:
        self.refill(now)
        if self.level < amount:
            return False
        self.level -= amount
        return True

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)


class RateLimiter:
    """Per-identity request and token buckets (requests/s, tokens/s); ``None`` disables one."""

    def __init__(self, requests_per_s: float | None, tokens_per_s: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, v in (("rate_limit_rps", requests_per_s), ("rate_limit_tps", tokens_per_s)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        self.requests_per_s = requests_per_s
        self.tokens_per_s = tokens_per_s
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _bucket(self, table: dict[str, TokenBucket], who: str, rate: float,
                now: float) -> TokenBucket:
        b = table.get(who)
        if b is None:
            cap = max(1.0, rate)  # one second's worth, and at least one request
            b = table[who] = TokenBucket(rate, cap, cap, now)
        return b

    def admit(self, who: str) -> None:
        """Take one request from ``who``'s request bucket; refuse if either bucket is empty."""
        now = self._clock()
        if self.tokens_per_s is not None:
            tb = self._bucket(self._tokens, who, self.tokens_per_s, now)
            tb.refill(now)
            if tb.level <= 0:
                raise QueueFullError(
                    f"token rate limit of {self.tokens_per_s:g} tokens/s exceeded; retry in "
                    f"{tb.seconds_until(1):.1f} s")
        if self.requests_per_s is not None:
            rb = self._bucket(self._requests, who, self.requests_per_s, now)
            if not rb.try_take(1, now):
                raise QueueFullError(
                    f"rate limit of {self.requests_per_s:g} requests/s exceeded; retry in "
                    f"{rb.seconds_until(1):.1f} s")

    def charge_tokens(self, who: str, n: int) -> None:
        """Count ``n`` prompt or generated tokens against ``who`` (the bucket may go negative)."""
        if self.tokens_per_s is None or n <= 0:
            return
        now = self._clock()
        tb = self._bucket(self._tokens, who, self.tokens_per_s, now)
        tb.refill(now)
        tb.level -= n


class Admission:
    """Bounds the requests this front has accepted and not yet finished."""

    def __init__(self, max_queued: int) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued}")
        self.max_queued = max_queued
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.max_queued:
            raise QueueFullError(
                f"{self.in_flight} requests are queued or running (max_queued_requests="
                f"{self.max_queued}); retry later")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM bytes of the server's certificate chain and key, and of the client CA (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def load_tls(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
    """None when TLS is off; refuses half a configuration rather than serving in clear."""
    if not cert and not key and not client_ca:
        return None
    if not cert or not key:
        raise InvalidRequestError("config.server.tls_cert", "tls_cert and tls_key go together")

    def read(name: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise InvalidRequestError(f"config.server.{name}", f"cannot read {path}: {e}") from e

    return TlsFiles(read("tls_cert", cert), read("tls_key", key),
                    read("tls_client_ca", client_ca) if client_ca else None)
