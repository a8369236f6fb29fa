"""The one root configuration of a pdserve cluster, loadable from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pdserve.workers.config import KV_CACHE_DTYPES, QUANTIZATIONS
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.eviction import check_cache_options

# How a decode worker pulls a prefill's KV blocks: the Ray object store, gRPC frames (a peer
# outside the cluster), or the collective channel (workers/kv_channel.py: NCCL between GPUs,
# gloo between CPU workers), which falls back to the object store when it fails. "auto":
# collective when every worker has a GPU of its own, else the object store.
TRANSPORTS = ("auto", "object_store", "grpc", "collective")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _bad(name: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"config.{name}", msg)


@dataclass(frozen=True)
class RoleConfig:
    """How many workers of one role run, and what each one reserves from Ray."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources, e.g. {"prefill": 1}, so a role lands on its node group.
    resources: dict[str, float] = field(default_factory=dict)
    num_blocks: int | None = None  # KV blocks per worker; None: sized from memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Autoscaling (cluster/autoscale.py), Ray Serve's rule: the router keeps about
    # ``target_ongoing_requests`` (running + queued) per worker of the role, between
    # ``min_replicas`` and ``max_replicas`` (None: ``replicas``; both None: a fixed count),
    # once the wish has held for the delay; it adds or retires one worker at a time.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas; equal when the role does not autoscale."""
        lo = self.replicas if self.min_replicas is None else self.min_replicas
        hi = self.replicas if self.max_replicas is None else self.max_replicas
        return lo, hi


@dataclass(frozen=True)
class ServerConfig:
    """Network front (gRPC + OpenAI HTTP + metrics)."""

    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    api_keys: tuple[str, ...] = ()
    api_key_env: str | None = None  # name of an env var holding comma-separated keys
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set for mutual TLS
    max_message_bytes: int = 16 * 1024 * 1024
    max_queued_requests: int = 1024
    rate_limit_rps: float | None = None
    rate_limit_tps: float | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """Everything a pdserve cluster needs; read once at start-up and passed down."""

    model: str | None = None  # local HF folder; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    quantization: str | None = None  # every worker's weights: "int8" | "int4"; None: dtype
    # Every worker's KV cache ("int8" halves/quarters handoff bytes); prefill and decode
    # must agree, so it is one cluster-wide setting. None: the same as dtype.
    kv_cache_dtype: str | None = None
    device: str = "cpu"
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Every worker's prefix cache: eviction policy ("lru", "lfu", "ttl", "cost"), the idle
    # time of the "ttl" policy, a cap of cached blocks per tenant (cache salt), and how long
    # an idle chat session keeps its blocks pinned (None: until the room is needed).
    eviction_policy: str = "lru"
    cache_ttl_seconds: float | None = None
    tenant_quota_blocks: int | None = None
    session_ttl_seconds: float | None = 300.0
    prefill: RoleConfig = field(default_factory=lambda: RoleConfig(resources={}))
    decode: RoleConfig = field(default_factory=lambda: RoleConfig(resources={}))
    lease_seconds: float = 30.0
    # A prompt whose uncached tail is at most this many tokens on a decode worker may be
    # prefilled there ("direct"), skipping the handoff; 0: only fully cached prompts.
    direct_max_tokens: int = 32
    # The handoff link's bandwidth as the placement cost model sees it; None: estimated from
    # measured handoffs. Fix it where the interconnect is known (and placement must not drift).
    link_bytes_per_s: float | None = None
    transport: str = "auto"
    kv_channel_timeout_s: float = 30.0  # a collective transfer slower than this falls back
    # Collective transport: the prefill worker pushes a request's blocks to the decode
    # worker the router chose as its prefill ends; False: the decode worker asks for them.
    kv_push: bool = True
    # The router starts a new worker (a new id, the same role) in place of one that died.
    replace_dead_workers: bool = True
    # A worker retired by autoscaling takes no new request; those it holds may finish for
    # this long before it is stopped (the router then resumes them elsewhere).
    drain_timeout_s: float = 120.0
    ray_address: str | None = None  # None: start a local Ray; "auto": join a running cluster
    ray_namespace: str = "pdserve"
    # Custom Ray resources for the router and index actors (e.g. {"head": 0.01}) so that
    # they land on the head node; empty: anywhere.
    head_resources: dict[str, float] = field(default_factory=dict)
    server: ServerConfig = field(default_factory=ServerConfig)
    seed: int = 0
    # Speculative decoding on the decode workers: "ngram" (prompt lookup) or None.
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    speculative_draft_model: str | None = None  # for method "draft": a local HF folder
    # Schedule step N+1 while step N runs on the GPU (workers/overlap.py); None: on for CUDA.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise _bad("block_size", f"must be a positive power of two, got {self.block_size}")
        if self.dtype not in DTYPES:
            raise _bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _bad("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES} or None, "
                                         f"got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise _bad("quantization", f"must be one of {QUANTIZATIONS} or None, "
                                       f"got {self.quantization!r}")
        if self.transport not in TRANSPORTS:
            raise _bad("transport", f"must be one of {TRANSPORTS}, got {self.transport!r}")
        if not isinstance(self.kv_push, bool):
            raise _bad("kv_push", f"must be true or false, got {self.kv_push!r}")
        if not isinstance(self.replace_dead_workers, bool):
            raise _bad("replace_dead_workers",
                       f"must be true or false, got {self.replace_dead_workers!r}")
        if self.kv_channel_timeout_s <= 0:
            raise _bad("kv_channel_timeout_s", f"must be > 0, got {self.kv_channel_timeout_s}")
        if self.lease_seconds <= 0:
            raise _bad("lease_seconds", f"must be > 0, got {self.lease_seconds}")
        if self.direct_max_tokens < 0:
            raise _bad("direct_max_tokens", f"must be >= 0, got {self.direct_max_tokens}")
        if self.link_bytes_per_s is not None and self.link_bytes_per_s <= 0:
            raise _bad("link_bytes_per_s", f"must be > 0, got {self.link_bytes_per_s}")
        check_cache_options(self.eviction_policy, self.cache_ttl_seconds, self.tenant_quota_blocks,
                            self.session_ttl_seconds, prefix="config.")
        for role in ("prefill", "decode"):
            rc: RoleConfig = getattr(self, role)
            if rc.replicas < 0:
                raise _bad(f"{role}.replicas", f"must be >= 0, got {rc.replicas}")
            if rc.num_cpus < 0 or rc.num_gpus < 0:
                raise _bad(f"{role}.num_cpus", "CPU and GPU reservations must be >= 0")
            for k, v in rc.resources.items():
                if v < 0:
                    raise _bad(f"{role}.resources.{k}", f"must be >= 0, got {v}")
            lo, hi = rc.bounds
            if lo < 0 or lo > rc.replicas:
                raise _bad(f"{role}.min_replicas",
                           f"must be between 0 and replicas ({rc.replicas}), got {lo}")
            if hi < rc.replicas:
                raise _bad(f"{role}.max_replicas",
                           f"must be >= replicas ({rc.replicas}), got {hi}")
            if hi > lo and lo < 1:  # its only signal is its own workers' load
                raise _bad(f"{role}.min_replicas",
                           "must be >= 1 for a role that autoscales (with no worker it has no "
                           f"load to grow from), got {lo}")
            if not rc.target_ongoing_requests > 0:  # (NaN too)
                raise _bad(f"{role}.target_ongoing_requests",
                           f"must be > 0, got {rc.target_ongoing_requests}")
            for name in ("upscale_delay_s", "downscale_delay_s"):
                if not getattr(rc, name) >= 0:
                    raise _bad(f"{role}.{name}", f"must be >= 0, got {getattr(rc, name)}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise _bad("async_scheduling", f"must be true, false or null, got {self.async_scheduling!r}")
        if self.decode.replicas < 1:
            raise _bad("decode.replicas", "at least one decode worker is required")
        if self.decode.bounds[0] < 1:
            raise _bad("decode.min_replicas", "at least one decode worker is required")
        if not self.drain_timeout_s >= 0:
            raise _bad("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")

    def resolved_transport(self) -> str:
        """The transport the workers use: "auto" is "collective" when there are prefill
        workers and every worker has a whole GPU (NCCL needs one per rank), else
        "object_store"."""
        if self.transport != "auto":
            return self.transport
        roles = [r for r in (self.prefill, self.decode) if r.replicas]
        gpus = self.device.startswith("cuda") and all(r.num_gpus >= 1 for r in roles)
        return "collective" if gpus and self.prefill.replicas else "object_store"

    def channel_backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    def with_overrides(self, **kwargs: Any) -> ClusterConfig:
        return replace(self, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        return _build(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise _bad("", f"{path} must hold a mapping at top level")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["server"]["api_keys"] = list(d["server"]["api_keys"])
        return d


_NESTED = {"prefill": RoleConfig, "decode": RoleConfig, "server": ServerConfig}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise InvalidRequestError(f"{where}.{key}", f"unknown field; known: {sorted(known)}")
        if key in _NESTED and cls is ClusterConfig:
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{where}.{key}", "must be a mapping")
            value = _build(_NESTED[key], value, f"{where}.{key}")
        elif key == "api_keys":
            value = tuple(value or ())
        kwargs[key] = value
    return cls(**kwargs)
