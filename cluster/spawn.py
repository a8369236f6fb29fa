"""Making worker actors from the cluster config and joining them into a KV channel: at
start-up (the launcher) and when a dead worker is replaced (the router)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from pdserve.cluster.config import ClusterConfig, RoleConfig
from pdserve.workers.actors import EngineWorkerActor
from pdserve.workers.config import EngineConfig
from pdserve.workers.kv_channel import ChannelSpec

logger = logging.getLogger(__name__)


def engine_config(cfg: ClusterConfig, role: RoleConfig, worker_id: str) -> EngineConfig:
    threads = max(1, int(role.num_cpus)) if cfg.device == "cpu" else None
    return EngineConfig(model=cfg.model, dtype=cfg.dtype, quantization=cfg.quantization,
                        kv_cache_dtype=cfg.kv_cache_dtype,
                        device=cfg.device,
                        block_size=cfg.block_size, num_blocks=role.num_blocks,
                        max_num_seqs=role.max_num_seqs,
                        max_num_batched_tokens=role.max_num_batched_tokens,
                        max_model_len=cfg.max_model_len,
                        enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
                        eviction_policy=cfg.eviction_policy,
                        cache_ttl_seconds=cfg.cache_ttl_seconds,
                        tenant_quota_blocks=cfg.tenant_quota_blocks,
                        session_ttl_seconds=cfg.session_ttl_seconds,
                        worker_id=worker_id, cpu_threads=threads,
                        speculative_method=cfg.speculative_method if role is cfg.decode else None,
                        num_speculative_tokens=cfg.num_speculative_tokens,
                        speculative_draft_model=cfg.speculative_draft_model,
                        async_scheduling=cfg.async_scheduling)


def spawn_worker(config: ClusterConfig, role_name: str, worker_id: str, index: Any,
                 model_path: str) -> Any:
    """A new worker actor of ``role_name`` (not started: its ``start()`` loads the model)."""
    role: RoleConfig = getattr(config, role_name)
    return EngineWorkerActor.options(
        name=worker_id, num_cpus=role.num_cpus, num_gpus=role.num_gpus,
        resources=dict(role.resources) or None,
    ).remote(engine_config(config, role, worker_id), role_name, index,
             config.resolved_transport(), config.lease_seconds, model_path, config.server.host)


def handoff_peers(workers: dict[str, tuple[str, Any]], ranks: dict[str, int],
                  worker_id: str) -> dict[str, int]:
    """The members ``worker_id`` hands blocks to or from (the other role), by rank: a link to
    one of its own role would keep a channel open after every peer it served had died."""
    role = workers[worker_id][0]
    return {p: ranks[p] for p, (r, _) in workers.items() if r != role}


def form_channel(config: ClusterConfig, workers: dict[str, tuple[str, Any]]) -> bool:
    """Join every worker into the KV channel (rank 0's node serves the rendezvous store),
    then have each decode worker make one empty transfer with each prefill worker. On
    failure the workers keep the object store (a worker without a channel is never asked
    to use one); returns whether the channel is up."""
    ids = list(workers)
    ranks = {wid: i for i, wid in enumerate(ids)}
    timeout = config.kv_channel_timeout_s
    try:
        host, port = ray.get(workers[ids[0]][1].channel_listen.remote(), timeout=timeout)
        backend = config.channel_backend()
        actors = {w: a for w, (_, a) in workers.items()}
        ray.get([workers[w][1].channel_connect.remote(
            ChannelSpec(ranks[w], len(ids), host, port, backend, timeout),
            handoff_peers(workers, ranks, w), actors) for w in ids], timeout=timeout + 30)
        sources = {w: a for w, (r, a) in workers.items() if r == "prefill"}
        ray.get([a.channel_ping.remote(sources) for r, a in workers.values() if r == "decode"],
                timeout=timeout * (len(sources) + 1))
    except Exception:
        logger.warning("the KV channel could not be formed; handoffs use the object store",
                       exc_info=True)
        return False
    logger.info("KV channel up: %d ranks over %s (rank 0 at %s:%d)", len(ids), backend, host, port)
    return True
