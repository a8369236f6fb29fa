"""Thin Ray actor shells around :class:`pdserve.workers.worker.Worker` (the only Ray code
in the data plane). The prefill and decode roles share one class; the role is a label
plus the resources the actor is placed with."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from pdserve.workers import kv_channel, kv_grpc
from pdserve.workers.config import EngineConfig
from pdserve.workers.disagg_engine import SeqState
from pdserve.workers.kv_transfer import KVHandle, KVPayload
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.worker import (
    GenerateRequest,
    HandoffStats,
    PrefillResult,
    Worker,
    WorkerLoad,
)

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
        self._channel_stores: dict[int, Any] = {}  # port -> store, of channels it is rank 0 of
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
            grpc_address=address, model_path=self._model_path, transport=self.transport))
        # This process holds one engine for its life: what exists now (the model, tens of
        # thousands of KV block records, CUDA graphs) is never garbage, so the cyclic GC
        # stops scanning it; a full collection would otherwise stall a step for tens of ms.
        gc.collect()
        gc.freeze()
        if self.index is not None:
            self._tasks.append(asyncio.create_task(self._push_events()))
        return self._config.worker_id

    # -- serving --------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self.worker.generate(req):
            yield chunk

    async def prefill(self, req: GenerateRequest, prefix_source: Any = None,
                      prefix_blocks: int = 0, have_blocks: int = 0,
                      push_to: str | None = None) -> PrefillResult:
        """``push_to``: the decode worker chosen for the request; over the collective
        transport its blocks are pushed to it as soon as the prefill ends."""
        if prefix_source is not None and prefix_blocks > have_blocks:
            await self._import_prefix(req, prefix_source, have_blocks, prefix_blocks)
        if self._faults.get("channel_header", 0) > 0:
            push_to = None  # the fault is in a pull's header: this handoff is pulled
        corrupt = push_to is not None and self._faults.get("corrupt_channel", 0) > 0
        if corrupt:
            self._faults["corrupt_channel"] -= 1
        return await self.worker.prefill(req, push_to if self.transport == "collective" else None,
                                         corrupt)

    async def drop_pushed(self, handle: KVHandle, tid: int) -> None:
        await self.worker.drop_pushed(handle, tid)

    async def decode(self, state: SeqState, handle: KVHandle | None, source: Any = None,
                     pushed: int | None = None, channel: bool = True
                     ) -> AsyncIterator[TokenChunk]:
        """``pushed``: the transfer id the source pushed the blocks under; ``channel``
        False: never pull over the channel (a retry of a request pushed elsewhere: the
        source's sends to this worker may hold pushes, which a pull would read)."""
        async def pull(h: KVHandle, start: int) -> KVPayload:
            if self.transport == "grpc":
                return await kv_grpc.pull(h, start)
            return await source.export_lease.remote(h.lease_id, start)

        async def release(h: KVHandle) -> None:
            if source is not None:
                await source.release.remote(h.lease_id)

        async def ask(h: KVHandle, start: int, tid: int) -> int:
            return await source.send_lease.remote(h.lease_id, start, self.worker.worker_id, tid)

        channel = channel and self.transport == "collective" and source is not None
        async for chunk in self.worker.decode(state, handle, pull if source or handle else None,
                                              release if source is not None else None,
                                              ask if channel else None, pushed):
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

    async def send_lease(self, lease_id: str | None, start_block: int, peer_id: str,
                         transfer_id: int) -> int:
        """Send a lease's blocks to worker ``peer_id`` over the KV channel (it is receiving
        them)."""
        if self._faults.get("channel_header", 0) > 0:
            self._faults["channel_header"] -= 1
            transfer_id += 1  # a header for another transfer: the receiver must refuse it
        corrupt = self._faults.get("corrupt_channel", 0) > 0
        if corrupt:
            self._faults["corrupt_channel"] -= 1
        return await self.worker.send_lease(lease_id, start_block, peer_id, transfer_id, corrupt)

    # -- the collective KV channel (transport "collective") ------------------------------
    def channel_listen(self) -> tuple[str, int]:
        """Rank 0: open a channel's rendezvous store on a free port of this node."""
        host = ray.util.get_node_ip_address()
        store, port = kv_channel.listen(host)
        self._channel_stores[port] = store
        return host, port

    async def channel_connect(self, spec: kv_channel.ChannelSpec, ranks: dict[str, int],
                              peers: dict[str, Any] | None = None) -> None:
        """Join a channel (every rank at once: gloo connects all pairs here). ``ranks``:
        the members this worker hands off with (the other role) and their ranks; a peer
        that already has a channel to this worker keeps it: a later channel (formed for a
        replacement) serves only the pairs that had none, and one that serves none here is
        closed at once (its process group would outlive its use); a peer known dead is
        skipped.
        ``peers``: the members' actors, told when this side breaks its pair with them."""
        host = ray.util.get_node_ip_address()
        loop = asyncio.get_running_loop()
        store = self._channel_stores.get(spec.port) if spec.rank == 0 else None
        channel = await loop.run_in_executor(None, lambda: kv_channel.KVChannel(
            spec, self.worker.engine.device, store, host))
        w = self.worker
        fresh = {wid: rank for wid, rank in ranks.items()
                 if wid != w.worker_id and wid not in w.dead_peers and wid not in w.links}
        if not fresh:  # every pair it would serve has a channel (a formation tried again)
            await loop.run_in_executor(None, lambda: channel.close(abort=True))
            return
        w.channels.append(channel)
        w.links.update((wid, (channel, rank)) for wid, rank in fresh.items())
        by_rank = {rank: (peers or {}).get(wid) for wid, rank in ranks.items()}

        def tell(rank: int) -> None:  # on a channel thread: hand the call to the loop
            peer = by_rank.get(rank)
            if peer is not None:
                loop.call_soon_threadsafe(
                    lambda: peer.channel_pair_broken.remote(w.worker_id, spec.port))

        channel.on_break = tell

    async def forget_peer(self, peer_id: str) -> None:
        """``peer_id`` died (the router says so): drop the link to it; a channel left
        without links is aborted off the event loop (no wait for its dead member)."""
        ch = self.worker.forget_peer(peer_id)
        if ch is not None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: ch.close(abort=True))

    def channel_pair_broken(self, peer_id: str, port: int) -> bool:
        """``peer_id`` broke its side of our pair on the channel at ``port``: stop sending
        to it there (a send would wait for a receive that never comes)."""
        link = self.worker.links.get(peer_id)
        if link is None or link[0].spec.port != port:
            return False
        link[0].mark_broken(link[1], f"{peer_id} broke the pair on its side")
        return True

    async def channel_ping(self, sources: dict[str, Any]) -> None:
        """An empty transfer from each source (prefill) worker, one after another (NCCL
        forms a pair's communicator on its first transfer: not during a request)."""
        w = self.worker
        for wid, actor in sources.items():
            ch, rank = w.links[wid]
            await ch.pull(rank, w.engine.layout, 0, lambda tid, a=actor:
                          a.send_lease.remote(None, 0, w.worker_id, tid))

    def _maybe_corrupt(self, payload: KVPayload) -> KVPayload:
        if self._faults.get("corrupt_export", 0) > 0 and payload.num_blocks:
            self._faults["corrupt_export"] -= 1
            data = np.array(payload.data, copy=True)
            data[0, data.shape[1] // 2] ^= 0xFF  # flip one byte after the checksum was taken
            return replace(payload, data=data)
        return payload

    def inject_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: a deliberate fault for the next ``count`` exports: ``corrupt_export``
        (one byte flipped after the checksums), ``delay_export`` (FAULT_DELAY_S late), or
        for channel sends ``corrupt_channel`` (a byte flipped after the digest, on the next
        push or pulled send) and ``channel_header`` (the next handoff is pulled, not pushed,
        and its header names another transfer)."""
        if kind not in ("corrupt_export", "delay_export", "corrupt_channel", "channel_header"):
            raise ValueError(f"unknown fault {kind!r}")
        self._faults[kind] = count

    # -- control ------------------------------------------------------------------------
    def handoff_log(self) -> list[tuple[str, int, float, bool]]:
        """(request id, bytes pulled, seconds for reserve + pull + release, recomputed)."""
        return list(self.worker.handoff_log)

    def handoffs(self) -> list[tuple[str, HandoffStats]]:
        """(request id, stats with the transport that brought the blocks), oldest first."""
        return list(self.worker.handoffs)

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
