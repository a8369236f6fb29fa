"""Starts (or joins) a Ray cluster and brings up the index, the workers and the router."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.prefix_index_actor import PrefixIndexActor
from pdserve.cluster.router import RouterActor, RouterRequest
from pdserve.cluster.spawn import form_channel, spawn_worker
from pdserve.workers.outputs import TokenChunk

logger = logging.getLogger(__name__)


@dataclass
class PDCluster:
    """Handles to a running pdserve deployment on Ray."""

    config: ClusterConfig
    model_path: str
    index: Any
    router: Any
    workers: dict[str, tuple[str, Any]]
    started_ray: bool

    @classmethod
    def start(cls, config: ClusterConfig, model_path: str | Path | None = None,
              ray_init_kwargs: dict | None = None) -> PDCluster:
        started = False
        if not ray.is_initialized():
            kwargs = {"namespace": config.ray_namespace, "include_dashboard": False,
                      "log_to_driver": True, **(ray_init_kwargs or {})}
            # None means a fresh local instance, even if a `ray start` cluster runs here.
            kwargs["address"] = config.ray_address or "local"
            if config.ray_address:
                kwargs.pop("num_cpus", None)
            ray.init(**kwargs)
            started = True
        if model_path is None:
            from pdserve.workers.model_store import resolve_model

            model_path = resolve_model(config.model)
        model_path = str(model_path)
        suffix = uuid.uuid4().hex[:6]
        head = dict(config.head_resources) or None
        index = PrefixIndexActor.options(name=f"pdserve-index-{suffix}", num_cpus=0,
                                         resources=head).remote()
        transport = config.resolved_transport()
        workers: dict[str, tuple[str, Any]] = {}
        for role_name in ("prefill", "decode"):
            for i in range(getattr(config, role_name).replicas):
                wid = f"{role_name}-{i}-{suffix}"
                workers[wid] = (role_name, spawn_worker(config, role_name, wid, index, model_path))
        ray.get([a.start.remote() for _, a in workers.values()])
        if transport == "collective":
            form_channel(config, workers)
        router = RouterActor.options(name=f"pdserve-router-{suffix}", num_cpus=0,
                                     resources=head).remote(
            config, model_path, workers, index)
        ray.get(router.start.remote())
        logger.info("pdserve cluster up: %d prefill, %d decode workers",
                    config.prefill.replicas, config.decode.replicas)
        return cls(config, model_path, index, router, workers, started)

    async def generate(self, request: RouterRequest) -> AsyncIterator[TokenChunk]:
        async for ref in self.router.generate.remote(request):
            yield await ref

    def generate_sync(self, request: RouterRequest) -> list[TokenChunk]:
        return [ray.get(ref) for ref in self.router.generate.remote(request)]

    def actor(self, worker_id: str) -> Any:
        if worker_id not in self.workers:  # a replacement the router started
            return ray.get(self.router.worker_handles.remote(), timeout=30)[worker_id][1]
        return self.workers[worker_id][1]

    def worker_ids(self, role: str) -> list[str]:
        """The workers started with the cluster (see the router for replacements)."""
        return [w for w, (r, _) in self.workers.items() if r == role]

    def shutdown(self) -> None:
        workers = dict(self.workers)
        with contextlib.suppress(Exception):  # and the router's replacements of dead ones
            ray.get(self.router.shutdown.remote(), timeout=10)
            workers.update(ray.get(self.router.worker_handles.remote(), timeout=10))
        for _, a in workers.values():
            with contextlib.suppress(Exception):
                ray.get(a.shutdown.remote(), timeout=10)
            ray.kill(a)
        for a in (self.router, self.index):
            ray.kill(a)
        if self.started_ray:
            ray.shutdown()
