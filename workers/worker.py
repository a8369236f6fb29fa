"""A prefill/decode worker without Ray: the asyncio face of one DisaggEngine.

The Ray actor shells (``workers/actors.py``) wrap this class one method to one
method; the transports that pull KV from a peer are injected as callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import torch

from pdserve.workers.async_engine import AsyncEngine
from pdserve.workers.config import EngineConfig
from pdserve.workers.disagg_engine import DisaggEngine, SeqState
from pdserve.workers.errors import RequestAbortedError
from pdserve.workers.kv_channel import KVChannel, KVChannelError, consume_outcome
from pdserve.workers.kv_events import KVEventBatch
from pdserve.workers.kv_transfer import (
    DeviceBlocks,
    KVHandle,
    KVPayload,
    KVTransferError,
    Outgoing,
)
from pdserve.workers.outputs import TokenChunk, Usage
from pdserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PullFn = Callable[[KVHandle, int], Awaitable[KVPayload]]
# (handle, start block, transfer id): make the source send over the channel; ends when sent.
AskFn = Callable[[KVHandle, int, int], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A request as the router sends it to a worker (token ids already computed)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    session_id: str | None = None  # the decode worker keeps the finished turn's blocks for it


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """The first token of a prefilled request and, unless it already finished, its KV handle."""

    chunk: TokenChunk
    handle: KVHandle | None
    state: SeqState | None
    prefill_seconds: float  # submit -> first token on the prefill worker (queue included)
    queue_seconds: float = 0.0  # of which waiting in the prefill worker's queue
    pushed: int | None = None  # the channel transfer id its blocks are on their way under


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    waiting_tokens: int  # prompt tokens still to compute
    free_blocks: int
    total_blocks: int
    num_leases: int
    prefill_tokens_per_s: float  # measured; the router's cost model uses it
    decode_step_s: float
    block_bytes: int
    time: float


RELEASE_WAIT_S = 2.0  # how long a finished stream waits for its lease release to be confirmed


@dataclass(frozen=True, slots=True)
class HandoffStats:
    bytes: int
    seconds: float
    recomputed: bool
    via: str = ""  # "collective", "object_store", "grpc", "cached" (all hits) or "recompute"
    wire_seconds: float = 0.0  # collective: the data's own time on the link
    reserve_seconds: float = 0.0  # of ``seconds``: taking the blocks on the engine thread


class Worker:
    def __init__(self, config: EngineConfig, role: str, *, lease_seconds: float = 30.0,
                 grpc_address: str | None = None, model_path: str | None = None,
                 transport: str = "object_store") -> None:
        self.role = role
        self.pull_via = "grpc" if transport == "grpc" else "object_store"
        self.worker_id = config.worker_id
        self.engine = DisaggEngine(config, model_path, lease_seconds=lease_seconds,
                                   grpc_address=grpc_address)
        self.aengine = AsyncEngine(self.engine)
        self._prefill_tps = 2000.0  # prior until measured
        self._decode_step_s = 0.05
        self.last_handoff: HandoffStats | None = None
        self.handoff_log: deque[tuple[str, int, float, bool]] = deque(maxlen=4096)
        self.handoffs: deque[tuple[str, HandoffStats]] = deque(maxlen=4096)
        self.num_corrupt_pulls = 0  # pulls whose blocks failed their checksums (or digest)
        # The KV channels this worker is in (the one formed at start-up, then one per
        # replacement of a dead peer) and, per peer worker id, the channel to it and its rank.
        self.channels: list[KVChannel] = []
        self.links: dict[str, tuple[KVChannel, int]] = {}
        self.dead_peers: set[str] = set()  # forgotten: never linked again
        self.num_channel_failures = 0
        self.num_pushed = 0  # handoffs whose blocks the source pushed (and that arrived)
        self.num_handoff_bytes = 0  # KV bytes received in handoffs

    # -- whole requests on this worker (colocated / direct path) ------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        def start(engine: DisaggEngine) -> None:
            engine.add_request(req.request_id, params=req.params,
                               prompt_token_ids=list(req.prompt_token_ids),
                               priority=req.priority, cache_salt=req.cache_salt,
                               session_id=req.session_id)

        async for chunk in self._timed(self.aengine.stream(req.request_id, start)):
            yield chunk

    # -- prefill role ----------------------------------------------------------------
    async def prefill(self, req: GenerateRequest, push_to: str | None = None,
                      corrupt: bool = False) -> PrefillResult:
        """Run the prompt, sample the first token, keep the blocks under a lease. With
        ``push_to`` (the decode worker the router chose) reachable over the channel, the
        blocks are sent to it at once, before this returns (``pushed``: the transfer id
        it takes them by). ``corrupt`` (a test hook) flips a byte after the digest."""
        t0 = time.monotonic()

        def start(engine: DisaggEngine) -> None:
            engine.add_request(req.request_id, params=req.params,
                               prompt_token_ids=list(req.prompt_token_ids),
                               priority=req.priority, cache_salt=req.cache_salt,
                               prefill_only=True, session_id=req.session_id)

        first: TokenChunk | None = None
        async for chunk in self.aengine.stream(req.request_id, start, first_only=True):
            first = chunk
        assert first is not None
        dt = time.monotonic() - t0
        if first.finished:
            return PrefillResult(first, None, None, dt)

        try:  # (a lease's fields are fixed once made: read here, off the engine thread)
            lease = await self.aengine.acall(lambda e: e.lease_for(req.request_id))
        except asyncio.CancelledError:  # nobody will hand the lease on: release it now
            self.aengine.abort(req.request_id)
            raise
        if lease is None:  # aborted or expired in between
            return PrefillResult(replace(first, finished=True, finish_reason="abort"), None, None, dt)
        handle, state, queued = lease.handle, lease.state, lease.queue_seconds
        # the prompt tokens this request computed (a prior for placement's prefill estimate)
        uncached = len(req.prompt_token_ids) - state.num_cached_tokens - lease.ridden_tokens
        if uncached > 16 and dt > 0:
            self._prefill_tps = 0.7 * self._prefill_tps + 0.3 * (uncached / dt)
        pushed = None
        link = None if push_to is None else self._usable_link(push_to)
        if link is not None:
            ch, peer = link
            pushed = ch.new_transfer_id()
            sent = ch.send(peer, pushed, self._gather(handle.lease_id, 0, corrupt))
            consume_outcome(sent)  # a failure is logged by the channel
        return PrefillResult(first, handle, state, dt, queued, pushed)

    def _gather(self, lease_id: str | None, start_block: int, corrupt: bool
                ) -> Callable[[], Outgoing]:
        def make() -> Outgoing:  # on the channel's send thread for the peer
            try:
                out = self.engine.outgoing(lease_id, start_block)
            except Exception:  # still answer: the receiver must not wait for its deadline
                logger.warning("lease %s: gather for the KV channel failed", lease_id,
                               exc_info=True)
                return Outgoing(self.engine.layout, None)
            if corrupt and out.nbytes:
                out.data.view(-1).view(torch.uint8)[out.nbytes // 2] ^= 0xFF
            return out

        return make

    async def export_lease(self, lease_id: str, start_block: int) -> KVPayload:
        return await self.aengine.acall(lambda e: e.export_lease(lease_id, start_block))

    async def send_lease(self, lease_id: str | None, start_block: int, peer_id: str,
                         transfer_id: int, corrupt: bool = False) -> int:
        """The source side of a channel pull to worker ``peer_id``; returns the bytes sent.
        ``lease_id`` None: an empty transfer (a ping). ``corrupt`` (a test hook) flips a
        byte after the digest."""
        link = self.links.get(peer_id)
        if link is None:
            raise KVChannelError(f"no KV channel to {peer_id}", -1, broken=True)
        ch, peer = link
        make = self._gather(lease_id, start_block, corrupt)
        return await asyncio.wrap_future(ch.send(peer, transfer_id, make))

    async def release(self, lease_id: str) -> bool:
        return await self.aengine.acall(lambda e: e.release_lease(lease_id))

    async def export_prefix(self, token_ids: list[int], salt: str | None, start_block: int,
                            max_blocks: int) -> tuple[int, KVPayload | None]:
        return await self.aengine.acall(
            lambda e: e.export_prefix(token_ids, salt, start_block, max_blocks))

    async def import_prefix(self, token_ids: list[int], salt: str | None, start_block: int,
                            payload: KVPayload) -> int:
        return await self.aengine.acall(
            lambda e: e.import_prefix(token_ids, salt, start_block, payload))

    # -- decode role -----------------------------------------------------------------
    async def decode(self, state: SeqState, handle: KVHandle | None, pull: PullFn | None,
                     release: Callable[[KVHandle], Awaitable[object]] | None = None,
                     ask: AskFn | None = None, pushed: int | None = None
                     ) -> AsyncIterator[TokenChunk]:
        """Admit a handed-off request, pull its blocks, release the lease, stream tokens.

        ``pushed``: the source pushed the whole lease over the channel as that transfer,
        which is received while the blocks are reserved (and read off the channel even
        if this worker refuses). Else, with ``ask`` and a channel to the source, the
        blocks are pulled over the channel. Else (or if that fails) through ``pull``. Without a handle (or if every pull fails) the
        request is recomputed here: never a wrong answer. Refusal (no room) raises
        OutOfBlocksError and leaves the lease to the caller, who may hand it to another
        decode worker. An abort that lands during the pull ends the stream with an "abort"
        chunk.
        """
        rid = state.request_id
        t0 = time.monotonic()
        payload: KVPayload | DeviceBlocks | None = None
        start_block = 0
        releasing: asyncio.Future | None = None
        if handle is not None:
            incoming = None if pushed is None else self._take_pushed(handle, pushed)
            try:
                start_block = await self.aengine.acall(lambda e: e.reserve(state, handle.num_tokens))
                reserved = time.monotonic() - t0
            except asyncio.CancelledError:
                self.aengine.abort(rid)  # the inbox is FIFO: this frees the reservation
                raise
            moved = 0  # bytes that crossed the link (a push carries the whole lease)
            try:
                if incoming is not None:
                    pushed_blocks = await self._pushed_blocks(handle, incoming)
                    if pushed_blocks is not None:
                        moved = pushed_blocks.nbytes
                        if start_block < pushed_blocks.num_blocks:
                            payload = replace(pushed_blocks,
                                              data=pushed_blocks.data[:, :, start_block:])
                elif start_block < handle.num_blocks and ask is not None:
                    payload = await self._pull_channel(handle, start_block, ask)
                if start_block < handle.num_blocks and pull is not None and payload is None:
                    payload = await self._pull_verified(handle, start_block, pull)
            except asyncio.CancelledError:
                self.aengine.abort(rid)
                raise
            finally:
                if release is not None:  # off the first token's path; awaited when it ends
                    releasing = asyncio.ensure_future(_release(release, handle))
            ok = payload is not None or start_block >= handle.num_blocks
            nbytes = max(moved, payload.nbytes if payload is not None else 0)
            self.num_handoff_bytes += nbytes
            via = ("collective" if isinstance(payload, DeviceBlocks) else self.pull_via
                   if payload is not None else "cached" if ok else "recompute")
            wire = payload.wire_seconds if isinstance(payload, DeviceBlocks) else 0.0
            self.last_handoff = HandoffStats(nbytes, time.monotonic() - t0, not ok, via, wire,
                                             reserved)
            self.handoff_log.append((rid, nbytes, self.last_handoff.seconds, not ok))
            self.handoffs.append((rid, self.last_handoff))
            sent = payload if ok else None

            def start(e: DisaggEngine) -> None:
                if not e.complete(rid, start_block, sent, handle.num_tokens):
                    raise RequestAbortedError(f"request {rid} was aborted during its handoff")
        else:
            start = lambda e: e.admit_recompute(state)  # noqa: E731
        try:
            tag = handle is not None  # the first chunk says what the handoff moved
            async for chunk in self._timed(self.aengine.stream(rid, start)):
                if tag:
                    tag = False
                    chunk = replace(chunk, handoff_bytes=nbytes)
                yield chunk
        except RequestAbortedError:  # nothing was admitted: end the stream, never hang it
            usage = Usage(state.num_prompt_tokens, len(state.token_ids) - state.num_prompt_tokens,
                          state.num_cached_tokens)
            yield TokenChunk(rid, (), "", finished=True, finish_reason="abort", usage=usage,
                             handoff_bytes=nbytes if handle is not None else None)
        finally:
            if releasing is not None and not releasing.done():
                # the release is its own task: a slow or gone prefill worker (its lease then
                # expires) must not hold this stream's end beyond a bound
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(releasing), RELEASE_WAIT_S)

    def _take_pushed(self, handle: KVHandle, tid: int) -> asyncio.Future | None:
        """Start receiving a pushed transfer (None without a channel to its source)."""
        link = self.links.get(handle.worker_id)
        if link is None or handle.layout != self.engine.layout:
            return None
        ch, peer = link
        task = asyncio.ensure_future(ch.take(peer, tid, handle.layout))
        consume_outcome(task)
        return task

    async def _pushed_blocks(self, handle: KVHandle, incoming: asyncio.Future
                             ) -> DeviceBlocks | None:
        """The pushed lease, whole (None, after logging why, if it failed)."""
        try:
            blocks = await asyncio.shield(incoming)
        except KVChannelError as e:
            self.num_channel_failures += 1
            self.num_corrupt_pulls += e.corrupt
            logger.warning("request %s: pushed KV failed (%s); using %s", handle.request_id, e,
                           self.pull_via)
            return None
        self.num_pushed += 1
        return blocks

    def _usable_link(self, peer_id: str) -> tuple[KVChannel, int] | None:
        """The channel to ``peer_id`` and its rank there, if the pair is in use."""
        link = self.links.get(peer_id)
        return link if link is not None and link[0].usable(link[1]) else None

    def forget_peer(self, peer_id: str) -> KVChannel | None:
        """``peer_id`` is dead: drop the link to it. Returns the channel it was reached by
        if no link uses that channel any more, for the caller to close: its process group,
        NCCL communicators included, would otherwise outlive every peer it served."""
        self.dead_peers.add(peer_id)  # a channel joined later must not link it again
        link = self.links.pop(peer_id, None)
        if link is None:
            return None
        ch = link[0]
        if any(c is ch for c, _ in self.links.values()):
            return None
        self.channels.remove(ch)
        return ch

    async def drop_pushed(self, handle: KVHandle, tid: int) -> None:
        """Read a push whose request went elsewhere (or away) off the channel."""
        incoming = self._take_pushed(handle, tid)
        if incoming is not None:
            with contextlib.suppress(Exception):
                await incoming

    async def _pull_channel(self, handle: KVHandle, start_block: int, ask: AskFn
                            ) -> DeviceBlocks | None:
        """One try over the channel; None (after logging why) sends the caller to ``pull``."""
        link = self._usable_link(handle.worker_id)
        if link is None or handle.layout != self.engine.layout:
            return None
        ch, peer = link
        try:
            return await ch.pull(peer, handle.layout, handle.num_blocks - start_block,
                                 lambda tid: ask(handle, start_block, tid))
        except KVChannelError as e:
            self.num_channel_failures += 1
            self.num_corrupt_pulls += e.corrupt
            logger.warning("request %s: KV channel pull failed (%s); using %s",
                           handle.request_id, e, self.pull_via)
            return None

    async def _pull_verified(self, handle: KVHandle, start_block: int, pull: PullFn) -> KVPayload | None:
        """Pull with one retry; the checksums are verified again when the blocks are written."""
        from pdserve.workers.kv_transfer import checksum

        for attempt in range(2):
            try:
                payload = await pull(handle, start_block)
            except (KVTransferError, KeyError, ConnectionError, OSError) as e:
                logger.warning("request %s: KV pull attempt %d failed: %s", handle.request_id,
                               attempt + 1, e)
                continue
            except Exception as e:  # the source died (Ray raises its own types)
                logger.warning("request %s: KV source failed: %r", handle.request_id, e)
                return None
            bad = [i for i, row in enumerate(payload.data) if checksum(row) != payload.checksums[i]]
            if not bad:
                return payload
            self.num_corrupt_pulls += 1
            logger.warning("request %s: %d corrupt block(s) in transfer; retrying",
                           handle.request_id, len(bad))
        return None

    # -- control -------------------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        return await self.aengine.acall(lambda e: e.abort_request(request_id))

    async def take_events(self) -> KVEventBatch | None:
        return await self.aengine.acall(lambda e: e.block_manager.take_events())

    async def snapshot(self) -> tuple[list[bytes], int]:
        return await self.aengine.acall(lambda e: e.snapshot())

    async def load(self) -> WorkerLoad:
        def read(e: DisaggEngine) -> WorkerLoad:
            sched = e.scheduler
            waiting_tokens = sum(s.num_tokens - s.num_computed_tokens for *_, s in sched.waiting)
            return WorkerLoad(self.worker_id, self.role, sched.num_running, sched.num_waiting,
                              waiting_tokens, e.block_manager.num_free_blocks,
                              e.block_manager.num_blocks, len(e.leases), self._prefill_tps,
                              self._decode_step_s, e.runner_block_bytes, time.time())

        return await self.aengine.acall(read)

    async def stats(self) -> dict:
        def read(e: DisaggEngine) -> dict:
            bm = e.block_manager
            return {"free_blocks": bm.num_free_blocks, "total_blocks": bm.num_blocks,
                    "leases": len(e.leases), "reserved": len(e.reserved),
                    "requests": len(e.requests), "prefix_queries": bm.prefix_queries,
                    "prefix_hits": bm.prefix_hits, "preemptions": e.scheduler.num_preemptions,
                    "expired_leases": e.num_expired_leases, "owners": bm.owners(),
                    "spec_proposed": e.spec.num_proposed if e.spec else 0,
                    "spec_accepted": e.spec.num_accepted if e.spec else 0,
                    "corrupt_pulls": self.num_corrupt_pulls,
                    "channel_failures": self.num_channel_failures,
                    "pushed_handoffs": self.num_pushed,
                    "handoff_bytes": self.num_handoff_bytes}

        out = await self.aengine.acall(read)
        # (the links change on the event loop: read here, not on the engine thread)
        out.update(channel_peers=sorted(self.links), channels=len(self.channels),
                   # peers whose channel pair is out of use on this side
                   channel_broken=sorted(w for w, (ch, r) in self.links.items()
                                         if not ch.usable(r)))
        return out

    async def cached_hashes(self) -> list[bytes]:
        return await self.aengine.acall(lambda e: sorted(e.block_manager.pool.cached_hashes()))

    async def check_integrity(self) -> bool:
        await self.aengine.acall(lambda e: e.check_integrity())
        return True

    async def _timed(self, it: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
        last = None
        async for chunk in it:
            now = time.monotonic()
            if last is not None:
                self._decode_step_s = 0.9 * self._decode_step_s + 0.1 * (now - last)
            last = now
            yield chunk

    def shutdown(self) -> None:
        for ch in self.channels:
            ch.close()
        self.aengine.shutdown()


async def _release(release: Callable[[KVHandle], Awaitable[object]], handle: KVHandle) -> None:
    try:
        await release(handle)
    except Exception:  # the prefill worker may be gone; its lease will expire
        logger.warning("request %s: lease release failed", handle.request_id, exc_info=True)
