"""Making a worker actor from the cluster config: at start-up (the launcher) and when a dead
worker is replaced (the router)."""

from __future__ import annotations

from typing import Any

from pdserve.cluster.config import ClusterConfig, RoleConfig
from pdserve.workers.actors import EngineWorkerActor
from pdserve.workers.config import EngineConfig


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
