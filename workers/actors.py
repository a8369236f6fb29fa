"""Thin Ray actor shells around :class:`pdserve.workers.worker.Worker` (the only Ray code
in the data plane). The prefill and decode roles share one class; the role is a label
plus the resources the actor is placed with."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from pdserve.workers import kv_grpc
from pdserve.workers.config import EngineConfig
from pdserve.workers.disagg_engine import SeqState
from pdserve.workers.kv_transfer import KVHandle, KVPayload
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.worker import GenerateRequest, PrefillResult, Worker, WorkerLoad

logger = logging.getLogger(__name__)

EVENT_PUSH_INTERVAL_S = 0.05
FAULT_DELAY_S = 0.3


@ray.remote(max_restarts=0, max_concurrency=1000)
class EngineWorkerActor:
    def __init__(self, config: EngineConfig, role: str, index: Any = None,
                 transport: str = "object_store", lease_seconds: float = 30.0,
                 model_path: str | None = None, grpc_host: str = "127.0.0.1") -> None:
        logging.basicConfig(level=logging.INFO)
        self.role = role
        self.transport = transport
        self.index = index
        self._grpc_host = grpc_host
        self._config = config
        self._lease_seconds = lease_seconds
        self._model_path = model_path
        self.worker: Worker | None = None
        self._faults: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._grpc_server = None
        # One push at a time: batches reach the index in seq order, and flush_events waits
        # for a push the background pusher has in flight.
        self._push_lock = asyncio.Lock()

    async def start(self) -> str:
        """Load the model, start the KV server and the event pusher; returns the worker id."""
        address = None
        if self.transport == "grpc":
            self._grpc_server, address = await kv_grpc.start_server(self._export_for_peer,
                                                                    self._grpc_host)
        loop = asyncio.get_running_loop()
        self.worker = await loop.run_in_executor(None, lambda: Worker(
            self._config, self.role, lease_seconds=self._lease_seconds,
            grpc_address=address, model_path=self._model_path))
        if self.index is not None:
            self._tasks.append(asyncio.create_task(self._push_events()))
        return self._config.worker_id

    # -- serving --------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.worker.generate(req):
            yield chunk

    async def prefill(self, req: GenerateRequest, prefix_source: Any = None,
                      prefix_blocks: int = 0, have_blocks: int = 0) -> PrefillResult:
        if prefix_source is not None and prefix_blocks > have_blocks:
            await self._import_prefix(req, prefix_source, have_blocks, prefix_blocks)
        return await self.worker.prefill(req)

    async def decode(self, state: SeqState, handle: KVHandle | None,
                     source: Any = None) -> AsyncIterator[TokenChunk]:
        async def pull(h: KVHandle, start: int) -> KVPayload:
            if self.transport == "grpc":
                return await kv_grpc.pull(h, start)
            return await source.export_lease.remote(h.lease_id, start)

        async def release(h: KVHandle) -> None:
            if source is not None:
                await source.release.remote(h.lease_id)

        async for chunk in self.worker.decode(state, handle, pull if source or handle else None,
                                              release if source is not None else None):
            yield chunk

    async def _import_prefix(self, req: GenerateRequest, source: Any, have: int, want: int) -> None:
        try:
            n, payload = await source.export_prefix.remote(list(req.prompt_token_ids),
                                                          req.cache_salt, have, want)
            if payload is not None:
                await self.worker.import_prefix(list(req.prompt_token_ids), req.cache_salt,
                                                have, payload)
        except Exception:  # reuse is an optimisation: compute locally instead
            logger.warning("request %s: prefix import failed", req.request_id, exc_info=True)

    # -- KV export (the source side of a handoff) -------------------------------------
    async def export_lease(self, lease_id: str, start_block: int) -> KVPayload:
        if self._faults.get("delay_export", 0) > 0:
            self._faults["delay_export"] -= 1
            await asyncio.sleep(FAULT_DELAY_S)
        return self._maybe_corrupt(await self.worker.export_lease(lease_id, start_block))

    async def _export_for_peer(self, lease_id: str, start_block: int) -> KVPayload:
        return await self.export_lease(lease_id, start_block)

    async def export_prefix(self, token_ids: list[int], salt: str | None, start_block: int,
                            max_blocks: int) -> tuple[int, KVPayload | None]:
        return await self.worker.export_prefix(token_ids, salt, start_block, max_blocks)

    async def release(self, lease_id: str) -> bool:
        return await self.worker.release(lease_id)

    def _maybe_corrupt(self, payload: KVPayload) -> KVPayload:
        if self._faults.get("corrupt_export", 0) > 0 and payload.num_blocks:
            self._faults["corrupt_export"] -= 1
            data = np.array(payload.data, copy=True)
            data[0, data.shape[1] // 2] ^= 0xFF  # flip one byte after the checksum was taken
            return replace(payload, data=data)
        return payload

    def inject_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: a deliberate fault for the next ``count`` exports: ``corrupt_export``
        (one byte flipped after the checksums) or ``delay_export`` (FAULT_DELAY_S late)."""
        if kind not in ("corrupt_export", "delay_export"):
            raise ValueError(f"unknown fault {kind!r}")
        self._faults[kind] = count

    # -- control ------------------------------------------------------------------------
    def handoff_log(self) -> list[tuple[str, int, float, bool]]:
        """(request id, bytes pulled, seconds for reserve + pull + release, recomputed)."""
        return list(self.worker.handoff_log)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def abort(self, request_id: str) -> bool:
        return await self.worker.abort(request_id)

    async def load(self) -> WorkerLoad:
        return await self.worker.load()

    async def stats(self) -> dict:
        return await self.worker.stats()

    async def check_integrity(self) -> bool:
        return await self.worker.check_integrity()

    async def cached_hashes(self) -> list[bytes]:
        return await self.worker.cached_hashes()

    async def flush_events(self) -> None:
        """Push pending KV events now (tests wait for quiescence with this)."""
        await self._push_once()

    async def _push_events(self) -> None:
        while True:
            try:
                await self._push_once()
            except Exception:
                logger.warning("KV event push failed", exc_info=True)
            await asyncio.sleep(EVENT_PUSH_INTERVAL_S)

    async def _push_once(self) -> None:
        if self.index is None:
            return
        async with self._push_lock:
            await self._push_locked()

    async def _push_locked(self) -> None:
        batch = await self.worker.take_events()
        if batch is None:
            return
        res = await self.index.apply.remote(batch)
        if res.needs_resync:
            hashes, seq = await self.worker.snapshot()
            await self.index.resync.remote(self._config.worker_id, hashes, seq)

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._grpc_server is not None:
            await self._grpc_server.stop(0)
        if self.worker is not None:
            self.worker.shutdown()
