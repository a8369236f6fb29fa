"""A persistent point-to-point KV channel between workers over torch.distributed (NCCL from
GPU to GPU, gloo between CPU processes): formed once when the cluster starts, then reused by
every handoff, so a transfer costs a header and one contiguous message, not a set-up. (A
replacement of a dead worker forms one more channel with its peers: a process group cannot
take a new rank. Each worker keeps, per peer, the channel that reaches it.)

One transfer (the decode worker D drives it; P holds the lease)::

    D: asyncio (pull)           D: recv thread                 P: send thread for D (FIFO)
    lock[P] (held to the end)
    post recv -----------------> recv(header) ...
    ask P.send_lease(tid) ------------(one Ray call)-------------> gather the lease's blocks
                                                                   into one buffer, digest
                                header <-------------------------- send(header)
                                tid, status, layout,
                                blocks and bytes match?
                                recv(data) <---------------------- send(data)
                                digest(data) matches?
    DeviceBlocks <-------------'                                   (ask returns: bytes sent)
    lock[P] released; D's engine thread scatters the blocks into the reserved ones

Invariant: per ordered pair (P, D) at most one transfer is in flight, and both sides see
transfers in the same order. D asks for transfer k+1 only after transfer k's receive ended
(it holds ``lock[P]`` across the ask and the receive, even when its caller is cancelled), and
P runs its sends to D on one thread in the order the asks arrive; so the i-th header D reads
from P answers D's i-th ask, and the transfer id in it proves it. Pairs share nothing (gloo:
one TCP pair per peer; NCCL: torch forms a two-rank communicator and stream per pair for
single send/recv), and no thread ever waits on two peers, so no cycle of waits can form.

A push (the prefill worker P sends as soon as its prefill ends, to the decode worker the
router already chose; no ask) keeps the same per-pair FIFO on P's side. D cannot know that
order, so D receives pushes through a mailbox per peer: while anyone waits for a push from P,
one receive loop reads P's headers in P's order, sizes the data from each header, and hands
the blocks to whoever waits for that transfer id (or keeps them until that one asks). A pull
and a push never share a pair at the same time: D holds ``lock[P]`` for either.

A failure that leaves the pair's order unknown (peer gone, a header of another transfer)
breaks the pair for good: its handoffs use the object store. The side that breaks it calls
``on_break``, and its owner tells the peer out of band, which stops using the pair too
(``mark_broken``): otherwise the peer's next send would wait for a receive that never comes.
An operation past its deadline closes this worker's whole channel (gloo closes every pair of
a rank on a timeout; a posted NCCL operation cannot be cancelled, so the group is aborted). A
failure that leaves the pair in step (an unknown lease, said in the header; a digest mismatch
after every byte came) breaks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, TCPStore

from pdserve.workers.kv_transfer import (
    _DTYPES,
    DeviceBlocks,
    KVLayout,
    KVTransferError,
    Outgoing,
    digest,
)

logger = logging.getLogger(__name__)

MAGIC, VERSION = 0x70645F6B76, 1  # "pd_kv"
HEADER_WORDS = 12
(H_MAGIC, H_VERSION, H_TID, H_STATUS, H_BYTES, H_BLOCKS, H_LAYERS, H_BLOCK_SIZE, H_HEADS,
 H_HEAD_DIM, H_DTYPE, H_DIGEST) = range(HEADER_WORDS)
STATUS_OK, STATUS_NO_LEASE = 0, 1
DTYPE_CODES = {name: i + 1 for i, name in enumerate(sorted(_DTYPES))}
TAG = 0
# NCCL completion is polled (a posted NCCL op has no wait with a timeout): spin (yielding the
# GIL) through the first SPIN_S, where a transfer over NVLink ends, then sleep between polls.
SPIN_S, POLL_S = 2e-3, 100e-6
# A pushed transfer nobody took (its request was cancelled on the way) is dropped after this.
UNCLAIMED_S = 60.0
NCCL_PG_TIMEOUT = timedelta(hours=24)  # the watchdog must not outrun our own deadlines


class KVChannelError(KVTransferError):
    """A transfer over the channel failed. ``broken``: the pair is out of use from now on;
    ``corrupt``: every byte arrived but the digest did not match."""

    def __init__(self, message: str, peer: int, broken: bool, corrupt: bool = False) -> None:
        super().__init__(message)
        self.peer, self.broken, self.corrupt = peer, broken, corrupt

    def __reduce__(self):  # pickled by its arguments (Ray hands it to the caller)
        return type(self), (self.args[0], self.peer, self.broken, self.corrupt)


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """How one worker joins the channel (made by the launcher, crosses actors)."""

    rank: int
    world_size: int
    host: str  # rank 0's address: it serves the rendezvous store
    port: int
    backend: str  # "nccl" (GPU caches) or "gloo" (CPU caches)
    timeout_s: float = 30.0


def listen(host: str) -> tuple[TCPStore, int]:
    """Rank 0: the rendezvous store, on a free port of this host (kept open by the caller)."""
    store = TCPStore(host, 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    return store, store.port


@dataclass(slots=True)
class _Mailbox:
    """Pushes from one peer: who waits for which transfer, and what came before its taker."""

    waiting: dict[int, asyncio.Future] = field(default_factory=dict)
    arrived: dict[int, tuple[float, DeviceBlocks | KVChannelError]] = field(default_factory=dict)
    pump: asyncio.Future | None = None


def _outcome(got: DeviceBlocks | KVChannelError) -> DeviceBlocks:
    if isinstance(got, KVChannelError):
        raise got
    return got


def _closed_error(peer: int) -> KVChannelError:
    return KVChannelError(f"channel to rank {peer} is closed", peer, broken=True)


def _fail_future(fut: asyncio.Future, err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)


def consume_outcome(fut: asyncio.Future | Future) -> None:
    """An outcome nobody waits for any more: read it so asyncio does not log it as lost."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


class KVChannel:
    """This worker's end of the channel: sends to and receives from any other rank."""

    def __init__(self, spec: ChannelSpec, device: torch.device | str, store: Any = None,
                 local_host: str | None = None) -> None:
        self.spec, self.rank, self.backend = spec, spec.rank, spec.backend
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_s = spec.timeout_s
        timeout = timedelta(seconds=spec.timeout_s)
        if store is None:
            store = TCPStore(spec.host, spec.port, None, False, timeout)
        self._store = store  # rank 0's store must outlive the group
        prefixed = PrefixStore("pdserve-kv/", store)
        if spec.backend == "gloo":
            opts = ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Pairs on the node's own address, not whatever its hostname resolves to.
            opts._devices = [ProcessGroupGloo.create_device(hostname=local_host) if local_host
                             else ProcessGroupGloo.create_default_device()]
            self._pg = ProcessGroupGloo(prefixed, spec.rank, spec.world_size, opts)
        elif spec.backend == "nccl":
            from torch._C._distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = NCCL_PG_TIMEOUT
            self._pg = ProcessGroupNCCL(prefixed, spec.rank, spec.world_size, opts)
        else:
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {spec.backend!r}")
        self._lock = threading.Lock()  # guards the maps below (asyncio and channel threads)
        self._broken: set[int] = set()
        self._closed = False
        self._senders: dict[int, ThreadPoolExecutor] = {}
        self._streams: dict[int, Any] = {}
        self._peer_locks: dict[int, asyncio.Lock] = {}
        self._recv_pool = ThreadPoolExecutor(2 * spec.world_size, thread_name_prefix="kv-recv")
        self._tids = itertools.count(1)
        self._boxes: dict[int, _Mailbox] = {}  # pushes from each peer
        # What takers and pullers wait on, failed at once when the channel closes: a receive
        # blocked in gloo is not interrupted by closing, and would hold them to its deadline.
        self._watched: dict[asyncio.Future, tuple[asyncio.AbstractEventLoop, int]] = {}
        # Called (from any thread) with a peer's rank when this side breaks the pair with it
        # (or closes): the owner tells that peer out of band. Set once, before any transfer.
        self.on_break: Callable[[int], None] | None = None

    # -- state ----------------------------------------------------------------------------
    def new_transfer_id(self) -> int:
        """An id no other transfer of this channel has (its rank in the high bits)."""
        return (self.rank << 40) | next(self._tids)

    def usable(self, peer: int) -> bool:
        return not self._closed and peer not in self._broken and peer != self.rank

    def _check_usable(self, peer: int) -> None:
        if not self.usable(peer):
            raise _closed_error(peer)

    def mark_broken(self, peer: int, reason: str) -> None:
        """The peer broke the pair on its side (it said so out of band): stop using it
        here too, so that no send of ours waits for a receive that will never come."""
        self._fail(peer, reason, notify=False)

    def _fail(self, peer: int, reason: str, close: bool = False, notify: bool = True) -> None:
        with self._lock:
            first, _ = peer not in self._broken, self._broken.add(peer)
        if first or (close and not self._closed):
            logger.warning("KV channel: %s %d-%d (%s); its handoffs use the object store from "
                           "now on", "closing" if close else "pair broken", self.rank, peer, reason)
        closing = close and not self._closed
        if closing:
            self.close(abort=True)
        if notify and self.on_break is not None and (first or closing):
            # the other side may not know: its next send to us would wait out its deadline
            # and then close its whole channel
            for p in range(self.spec.world_size) if closing else (peer,):
                if p != self.rank:
                    self.on_break(p)

    def close(self, abort: bool = False) -> None:
        """Stop using the channel; peers' operations with this rank then fail, not hang,
        and so do ours: every taker and puller still waiting gets a KVChannelError now."""
        with self._lock:
            self._closed = True
            watched, self._watched = self._watched, {}
        for fut, (loop, peer) in watched.items():  # first: shutting down may block
            err = KVChannelError(f"channel closed while waiting for rank {peer}", peer, broken=True)
            with contextlib.suppress(RuntimeError):  # that loop has ended
                loop.call_soon_threadsafe(_fail_future, fut, err)
        with contextlib.suppress(Exception):
            (self._pg.abort if abort and self.backend == "nccl" else self._pg.shutdown)()
        for ex in [*self._senders.values(), self._recv_pool]:
            ex.shutdown(wait=False, cancel_futures=True)

    def _watch(self, fut: asyncio.Future, peer: int) -> asyncio.Future:
        """Fail ``fut`` when the channel closes (see close); returns it."""
        with self._lock:
            if self._closed:
                _fail_future(fut, _closed_error(peer))
                return fut
            self._watched[fut] = (asyncio.get_running_loop(), peer)
        fut.add_done_callback(self._unwatch)
        return fut

    def _unwatch(self, fut: asyncio.Future) -> None:
        with self._lock:
            self._watched.pop(fut, None)

    # -- low level ------------------------------------------------------------------------
    def _on_stream(self, peer: int) -> contextlib.AbstractContextManager:
        """A stream per peer on GPUs: an operation waiting on one peer never blocks the
        engine's stream nor another peer's."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        torch.cuda.set_device(self.device)  # this thread's current device
        with self._lock:
            stream = self._streams.get(peer)
            if stream is None:
                stream = self._streams[peer] = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _wait(self, work: Any, deadline: float, spin: bool = True) -> None:
        """``spin`` False: poll from the start (a push's header waits for the receiver to
        post, which may take the router's hop: a spin there takes the GIL from the actor)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed before the operation was posted")
        if self.backend == "gloo":
            try:
                work.wait(timedelta(seconds=left))
            except RuntimeError as e:  # a timeout (gloo then closes every pair of this rank)
                if "Timed out" in str(e):
                    raise TimeoutError(str(e)) from e
                raise  # an error of this pair (the peer closed it)
            return
        spin_until = time.monotonic() + (SPIN_S if spin else 0.0)
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no completion within {self.timeout_s} s")
            time.sleep(0 if now < spin_until else POLL_S)
        work.wait()  # orders this thread's stream after the NCCL stream

    def _header(self, tid: int, out: Outgoing) -> torch.Tensor:
        lay = out.layout
        status = STATUS_OK if out.data is not None else STATUS_NO_LEASE
        blocks = 0 if out.data is None else int(out.data.shape[2])
        fields = [MAGIC, VERSION, tid, status, out.nbytes, blocks, lay.num_layers, lay.block_size,
                  lay.num_kv_heads, lay.head_dim, DTYPE_CODES[lay.dtype], out.digest]
        return torch.tensor(fields, dtype=torch.int64).to(self.device)

    # -- sending side -----------------------------------------------------------------------
    def send(self, peer: int, transfer_id: int, make: Callable[[], Outgoing]) -> Future:
        """Queue a send to ``peer`` on its thread (FIFO): ``make()`` gathers the blocks there
        (on the peer's stream), then they go; the future gives the bytes sent. ``make`` must
        not raise: an unknown lease is ``Outgoing(layout, None)``, which still answers."""
        with self._lock:
            ex = self._senders.get(peer)
            if ex is None:
                ex = self._senders[peer] = ThreadPoolExecutor(1, thread_name_prefix=f"kv-send-{peer}")
        return ex.submit(self._send, peer, transfer_id, make)

    def _send(self, peer: int, tid: int, make: Callable[[], Outgoing]) -> int:
        self._check_usable(peer)
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._on_stream(peer):
                out = make()
                self._wait(self._pg.send([self._header(tid, out)], peer, TAG), deadline, spin=False)
                if out.data is not None and out.nbytes:
                    wire = out.data.reshape(-1).view(torch.uint8)
                    self._wait(self._pg.send([wire], peer, TAG), deadline)
        except Exception as e:
            self._fail(peer, f"send failed: {e}", close=isinstance(e, TimeoutError))
            raise KVChannelError(f"send of transfer {tid} to rank {peer} failed: {e}", peer,
                                 broken=True) from e
        return out.nbytes

    # -- receiving side ---------------------------------------------------------------------
    async def pull(self, peer: int, layout: KVLayout, num_blocks: int,
                   ask: Callable[[int], Awaitable[object]]) -> DeviceBlocks:
        """Receive ``num_blocks`` blocks from ``peer``; ``ask(transfer_id)`` makes the peer
        send them (and ends when it has). Raises KVChannelError."""
        task = asyncio.ensure_future(self._transfer(peer, layout, num_blocks, ask))
        consume_outcome(task)
        # A cancelled caller leaves the transfer running to its end: the peer's send is on
        # its way, and the next transfer with this peer must not start before it has landed.
        return await asyncio.shield(task)

    async def _transfer(self, peer: int, layout: KVLayout, num_blocks: int,
                        ask: Callable[[int], Awaitable[object]]) -> DeviceBlocks:
        # never cancelled (pull shields it), so a lock taken here is always given back
        loop = asyncio.get_running_loop()
        lock = self._peer_locks.setdefault(peer, asyncio.Lock())
        closed = self._watch(loop.create_future(), peer)
        consume_outcome(closed)
        try:
            await self._acquire(lock, closed)
            try:
                self._check_usable(peer)
                tid = (self.rank << 40) | next(self._tids)
                try:
                    recv = loop.run_in_executor(self._recv_pool, self.recv, peer, tid, layout,
                                                num_blocks)
                except RuntimeError as e:  # closed since the check: its pool takes nothing
                    raise _closed_error(peer) from e
                asked = asyncio.ensure_future(ask(tid))
                consume_outcome(asked)
                await asyncio.wait({recv, asked, closed}, return_when=asyncio.FIRST_COMPLETED)
                if (not recv.done() and asked.done() and not asked.cancelled()
                        and asked.exception() is not None):
                    # The peer could not send. Our receive stays posted: it fails when the
                    # peer's end closes, or at its deadline (which closes the channel).
                    consume_outcome(recv)
                    err = asked.exception()
                    self._fail(peer, f"the sender failed: {err!r}")
                    raise KVChannelError(f"rank {peer} did not send transfer {tid}: {err!r}",
                                         peer, broken=True) from err
                if not recv.done():
                    await asyncio.wait({recv, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not recv.done() or recv.cancelled():  # the channel closed meanwhile
                    consume_outcome(recv)
                    raise KVChannelError(f"channel to rank {peer} closed during transfer {tid}",
                                         peer, broken=True)
                return recv.result()
            finally:
                lock.release()
        finally:
            closed.cancel()

    @staticmethod
    async def _acquire(lock: asyncio.Lock, closed: asyncio.Future) -> None:
        """Take ``lock`` unless the channel closes first (a pump may hold it, blocked in a
        receive that only its deadline ends); then raise, not holding it."""
        acq = asyncio.ensure_future(lock.acquire())
        await asyncio.wait({acq, closed}, return_when=asyncio.FIRST_COMPLETED)
        if not acq.done():
            acq.cancel()  # asyncio.Lock hands a wake-up it loses to the next waiter
            with contextlib.suppress(asyncio.CancelledError):
                await acq
        if acq.cancelled():
            closed.result()  # raises
        elif closed.done():
            lock.release()
            closed.result()

    async def take(self, peer: int, tid: int, layout: KVLayout) -> DeviceBlocks:
        """The blocks ``peer`` pushed (or is pushing) as transfer ``tid``; raises
        KVChannelError. A caller that gives up leaves the receive to its end; the blocks
        are then dropped (a push is always read off the pair, so P's sends never stall)."""
        self._check_usable(peer)
        box = self._boxes.get(peer)
        if box is None:
            box = self._boxes[peer] = _Mailbox()
        kept = box.arrived.pop(tid, None)
        if kept is not None:
            return _outcome(kept[1])
        fut = box.waiting.get(tid)
        if fut is None:
            fut = box.waiting[tid] = self._watch(asyncio.get_running_loop().create_future(), peer)
            consume_outcome(fut)
        if box.pump is None or box.pump.done():
            box.pump = asyncio.ensure_future(self._pump(peer, box, layout))
            consume_outcome(box.pump)
        return await asyncio.shield(fut)

    async def _pump(self, peer: int, box: _Mailbox, layout: KVLayout) -> None:
        """Read ``peer``'s pushes in its order while anyone waits for one."""
        loop = asyncio.get_running_loop()
        lock = self._peer_locks.setdefault(peer, asyncio.Lock())
        async with lock:  # no pull from this peer in between
            while box.waiting and not self._closed:  # (close fails the waiters itself)
                try:
                    tid, got = await loop.run_in_executor(self._recv_pool, self._receive, peer,
                                                          layout, None, None)
                except Exception as e:  # the pair is broken: every waiter learns it
                    err = e if isinstance(e, KVChannelError) else KVChannelError(str(e), peer, True)
                    for fut in box.waiting.values():
                        if not fut.done():
                            fut.set_exception(err)
                    box.waiting.clear()
                    return
                fut = box.waiting.pop(tid, None)
                if fut is not None and fut.done():  # failed when the channel closed
                    continue
                if fut is None:  # its taker has not come yet
                    now = time.monotonic()
                    for old in [t for t, (at, _) in box.arrived.items() if now - at > UNCLAIMED_S]:
                        del box.arrived[old]
                    box.arrived[tid] = (now, got)
                elif isinstance(got, KVChannelError):
                    fut.set_exception(got)
                else:
                    fut.set_result(got)

    def recv(self, peer: int, tid: int, layout: KVLayout, num_blocks: int) -> DeviceBlocks:
        """Blocking receive of one transfer (the caller holds the pair's order, see pull)."""
        got = self._receive(peer, layout, tid, num_blocks)[1]
        if isinstance(got, KVChannelError):
            raise got
        return got

    def _receive(self, peer: int, layout: KVLayout, tid: int | None, num_blocks: int | None
                 ) -> tuple[int, DeviceBlocks | KVChannelError]:
        """The next transfer from ``peer``: (its id, its blocks or the error that leaves the
        pair in step). ``tid``/``num_blocks`` None (a push): whatever the header says.
        Raises KVChannelError when the pair is broken."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._on_stream(peer):
                head = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
                self._wait(self._pg.recv([head], peer, TAG), deadline)
                h = head.tolist()
                t0 = time.monotonic()
                if tid is None:
                    tid = h[H_TID]
                if num_blocks is None:
                    num_blocks = h[H_BLOCKS]
                err = self._check_header(h, peer, tid, layout, num_blocks)
                if err is not None:
                    return tid, err
                shape = (layout.num_layers, 2, num_blocks, layout.block_size,
                         layout.num_kv_heads, layout.head_width)
                data = torch.empty(shape, dtype=_DTYPES[layout.dtype], device=self.device)
                if h[H_BYTES]:
                    wire = data.reshape(-1).view(torch.uint8)
                    self._wait(self._pg.recv([wire], peer, TAG), deadline)
                seconds = time.monotonic() - t0
                got = digest(data)
        except KVChannelError:
            raise
        except Exception as e:
            self._fail(peer, f"receive failed: {e}", close=isinstance(e, TimeoutError))
            raise KVChannelError(f"receive of transfer {tid} from rank {peer} failed: {e}", peer,
                                 broken=True) from e
        if got != h[H_DIGEST]:
            return tid, KVChannelError(f"transfer {tid} from rank {peer}: digest mismatch", peer,
                                       broken=False, corrupt=True)
        return tid, DeviceBlocks(layout, data, seconds)

    def _check_header(self, h: list[int], peer: int, tid: int, layout: KVLayout,
                      num_blocks: int) -> KVChannelError | None:
        if h[H_MAGIC] != MAGIC or h[H_VERSION] != VERSION or h[H_TID] != tid:
            self._fail(peer, f"expected transfer {tid}, got header {h[:4]}")
            raise KVChannelError(f"rank {peer} sent a header for another transfer "
                                 f"({h[H_TID]}, expected {tid})", peer, broken=True)
        if h[H_STATUS] == STATUS_NO_LEASE:  # nothing follows: the pair is still in step
            return KVChannelError(f"rank {peer} holds no such lease (transfer {tid})", peer,
                                  broken=False)
        want = [STATUS_OK, num_blocks * layout.block_bytes, num_blocks, layout.num_layers,
                layout.block_size, layout.num_kv_heads, layout.head_dim, DTYPE_CODES[layout.dtype]]
        got = h[H_STATUS:H_DTYPE + 1]
        if got != want:
            # Bytes we will not read may follow: the pair is out of step.
            self._fail(peer, f"header {got} does not match {want}")
            raise KVChannelError(f"transfer {tid} from rank {peer}: header {got}, expected "
                                 f"{want} (status, bytes, blocks, layout)", peer, broken=True)
        return None
