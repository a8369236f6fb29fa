"""The collective KV channel (workers/kv_channel.py) over gloo, without Ray: ranks are threads
of this process (each with its own process group and TCP pairs), and one test puts the sender
in a second process. Caches are random tensors in the engine's layout, the int8 one with its
scales inside the rows."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import threading
import time

import pytest
import torch

from pdserve.workers.kv_channel import ChannelSpec, KVChannel, KVChannelError, listen
from pdserve.workers.kv_transfer import (
    RUN_COPY_MAX,
    Outgoing,
    block_runs,
    gather_blocks,
    layout_of,
    scatter_blocks,
    write_blocks,
)
from pdserve.workers.quant import quantize_kv

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 16, 4, 2, 8
DTYPES = [torch.float32, torch.bfloat16, torch.int8]


def caches(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(2, BLOCKS, BS, HEADS, DIM, generator=g) for _ in range(LAYERS)]
    return [quantize_kv(c) if dtype == torch.int8 else c.to(dtype) for c in x]


def blocks_of(kv: list[torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    return [c[:, ids].clone() for c in kv]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit (bf16 and the int8 rows' scale bytes included)."""
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))


def open_channels(world: int, timeout_s: float = 10.0) -> list[KVChannel]:
    store, port = listen("127.0.0.1")
    out: list[KVChannel | None] = [None] * world

    def join(rank: int) -> None:
        spec = ChannelSpec(rank, world, "127.0.0.1", port, "gloo", timeout_s)
        out[rank] = KVChannel(spec, "cpu", store if rank == 0 else None, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(out), "a rank did not join"
    return out  # type: ignore[return-value]


@pytest.fixture
def pair():
    chans = open_channels(2)
    yield chans
    for c in chans:
        c.close()


def asker(sender: KVChannel, to: int, kv: list[torch.Tensor], ids: list[int] | None,
          tid_shift: int = 0):
    """What the source actor's send_lease does: gather, then send on the peer's thread."""
    def make() -> Outgoing:
        return (Outgoing.gather(layout_of(kv), kv, ids) if ids is not None
                else Outgoing(layout_of(kv), None))

    async def ask(tid: int) -> int:
        return await asyncio.wrap_future(sender.send(to, tid + tid_shift, make))
    return ask


# -- gather / scatter -----------------------------------------------------------------------------
def test_runs_of_consecutive_block_ids_are_merged() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert block_runs([]) == [] and block_runs([7]) == [(7, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [[4, 5, 6, 7], [9, 10, 2, 3], [7, 2, 9, 3, 11, 0]])
def test_gather_then_scatter_moves_exactly_the_named_blocks(dtype, ids) -> None:
    assert (len(block_runs(ids)) <= RUN_COPY_MAX) == (len(ids) == 4)  # both code paths
    src, dst = caches(dtype, 1), caches(dtype, 2)
    before = [c.clone() for c in dst]
    data = gather_blocks(src, ids)
    assert data.shape == (LAYERS, 2, len(ids), BS, HEADS, src[0].shape[-1]) and data.is_contiguous()
    slots = [15, 1, 12, 13, 14, 8][: len(ids)]
    scatter_blocks(dst, slots, data)
    assert same(blocks_of(dst, slots), blocks_of(src, ids))
    rest = [b for b in range(BLOCKS) if b not in slots]
    assert same(blocks_of(dst, rest), blocks_of(before, rest))


# -- transfers between two ranks -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_transfer_is_bit_exact(pair, dtype) -> None:
    recv, send = pair
    src, dst = caches(dtype, 1), caches(dtype, 2)
    ids, slots = [3, 4, 5, 11, 0], [8, 9, 10, 1, 2]
    lay = layout_of(src)
    got = asyncio.run(recv.pull(1, lay, len(ids), asker(send, 0, src, ids)))
    assert got.num_blocks == len(ids) and got.nbytes == len(ids) * lay.block_bytes
    write_blocks(dst, slots, got)
    assert same(blocks_of(dst, slots), blocks_of(src, ids))
    if dtype == torch.int8:  # the scale bytes arrived with their rows
        assert lay.head_width == DIM + 4 and torch.equal(dst[0][:, 8, :, :, DIM:],
                                                         src[0][:, 3, :, :, DIM:])


def test_a_header_for_another_transfer_breaks_the_pair(pair) -> None:
    recv, send = pair
    src = caches()
    with pytest.raises(KVChannelError, match="another transfer") as e:
        asyncio.run(recv.pull(1, layout_of(src), 2, asker(send, 0, src, [1, 2], tid_shift=1)))
    assert e.value.broken and not recv.usable(1)
    t = time.monotonic()
    with pytest.raises(KVChannelError, match="closed"):  # refused at once, no hang
        asyncio.run(recv.pull(1, layout_of(src), 2, asker(send, 0, src, [1, 2])))
    assert time.monotonic() - t < 1


def test_breaking_a_pair_tells_the_owner_once_and_a_told_side_tells_nobody(pair) -> None:
    recv, send = pair
    told: list[tuple[int, int]] = []
    recv.on_break = lambda peer: told.append((0, peer))
    send.on_break = lambda peer: told.append((1, peer))
    src = caches()
    with pytest.raises(KVChannelError, match="another transfer"):
        asyncio.run(recv.pull(1, layout_of(src), 2, asker(send, 0, src, [1, 2], tid_shift=1)))
    with pytest.raises(KVChannelError):  # a second failure on the broken pair: no second word
        asyncio.run(recv.pull(1, layout_of(src), 2, asker(send, 0, src, [1, 2])))
    assert told == [(0, 1)] and send.usable(0)
    send.mark_broken(0, "rank 0 said so")  # what the owner does on the word
    assert not send.usable(0) and told == [(0, 1)]


@pytest.mark.parametrize("what", ["dtype", "blocks"])
def test_a_layout_or_size_mismatch_is_refused(pair, what) -> None:
    recv, send = pair
    src = caches(torch.bfloat16 if what == "dtype" else torch.float32)
    want = layout_of(caches())
    with pytest.raises(KVChannelError, match="expected") as e:
        asyncio.run(recv.pull(1, want, 3 if what == "blocks" else 2, asker(send, 0, src, [1, 2])))
    assert e.value.broken


def test_a_flipped_byte_is_caught_and_the_pair_stays_in_step(pair) -> None:
    recv, send = pair
    src, dst = caches(torch.int8, 1), caches(torch.int8, 2)
    lay = layout_of(src)

    def make() -> Outgoing:
        out = Outgoing.gather(lay, src, [5, 6])
        out.data.view(-1).view(torch.uint8)[17] ^= 0x04  # after the digest was taken
        return out

    async def corrupted(tid: int) -> int:
        return await asyncio.wrap_future(send.send(0, tid, make))

    with pytest.raises(KVChannelError, match="digest") as e:
        asyncio.run(recv.pull(1, lay, 2, corrupted))
    assert e.value.corrupt and not e.value.broken and recv.usable(1)
    got = asyncio.run(recv.pull(1, lay, 2, asker(send, 0, src, [5, 6])))
    write_blocks(dst, [0, 1], got)
    assert same(blocks_of(dst, [0, 1]), blocks_of(src, [5, 6]))


def test_an_unknown_lease_is_reported_and_the_pair_stays_in_step(pair) -> None:
    recv, send = pair
    src = caches()
    with pytest.raises(KVChannelError, match="no such lease") as e:
        asyncio.run(recv.pull(1, layout_of(src), 2, asker(send, 0, src, None)))
    assert not e.value.broken and recv.usable(1)
    got = asyncio.run(recv.pull(1, layout_of(src), 1, asker(send, 0, src, [9])))
    assert torch.equal(got.data[:, :, 0], torch.stack([c[:, 9] for c in src]))


def test_a_cancelled_pull_finishes_before_the_next_one_starts(pair) -> None:
    """The caller goes away while the source is still gathering: the transfer must still
    land (and be dropped), so that the next transfer reads its own header, not this one's."""
    recv, send = pair
    src = caches()
    lay = layout_of(src)
    plain = asker(send, 0, src, [1, 2])

    async def slow(tid: int) -> int:
        await asyncio.sleep(0.3)
        return await plain(tid)

    async def go():
        first = asyncio.create_task(recv.pull(1, lay, 2, slow))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await recv.pull(1, lay, 1, asker(send, 0, src, [7]))

    got = asyncio.run(go())
    assert torch.equal(got.data[:, :, 0], torch.stack([c[:, 7] for c in src]))
    assert recv.usable(1)


# -- pushes: the source sends unasked, the receiver's mailbox sorts them by transfer id ------------
def push(sender: KVChannel, to: int, kv: list[torch.Tensor], ids: list[int] | None,
         flip: bool = False) -> int:
    """What a prefill worker does when its prefill ends: queue the send, return its id."""
    def make() -> Outgoing:
        if ids is None:
            return Outgoing(layout_of(kv), None)
        out = Outgoing.gather(layout_of(kv), kv, ids)
        if flip:
            out.data.view(-1).view(torch.uint8)[5] ^= 0x10  # after the digest was taken
        return out

    tid = sender.new_transfer_id()
    sender.send(to, tid, make)
    return tid


@pytest.mark.parametrize("dtype", DTYPES)
def test_pushes_are_taken_by_id_in_any_order_bit_exact(pair, dtype) -> None:
    recv, send = pair
    src = caches(dtype, 1)
    lay = layout_of(src)
    sets = [[3, 4], [9], [0, 1, 2, 15], [7, 8, 11]]
    tids = [push(send, 0, src, ids) for ids in sets]
    assert len(set(tids)) == 4 and all(t >> 40 == 1 for t in tids)  # the sender's rank

    async def go():
        # takers come in another order than the sends, one only after its blocks arrived
        late = asyncio.gather(*(recv.take(1, tids[i], lay) for i in (2, 0, 3)))
        got = dict(zip((2, 0, 3), await late, strict=True))
        got[1] = await recv.take(1, tids[1], lay)  # kept for it meanwhile
        return got

    got = asyncio.run(go())
    for i, ids in enumerate(sets):
        assert got[i].num_blocks == len(ids)
        dst = caches(dtype, 2)
        write_blocks(dst, list(range(len(ids))), got[i])
        assert same(blocks_of(dst, list(range(len(ids)))), blocks_of(src, ids))
    assert recv.usable(1) and not recv._boxes[1].waiting and not recv._boxes[1].arrived


def test_a_corrupt_or_leaseless_push_fails_only_its_taker(pair) -> None:
    recv, send = pair
    src = caches(torch.bfloat16, 1)
    lay = layout_of(src)
    bad = push(send, 0, src, [2, 3], flip=True)
    gone = push(send, 0, src, None)
    good = push(send, 0, src, [5])

    async def go():
        return await asyncio.gather(recv.take(1, bad, lay), recv.take(1, gone, lay),
                                    recv.take(1, good, lay), return_exceptions=True)

    corrupt, leaseless, ok = asyncio.run(go())
    assert isinstance(corrupt, KVChannelError) and corrupt.corrupt and not corrupt.broken
    assert isinstance(leaseless, KVChannelError) and "no such lease" in str(leaseless)
    assert torch.equal(ok.data[:, :, 0], torch.stack([c[:, 5] for c in src]))
    # the pair is still in step: a pull after the pushes reads its own header
    again = asyncio.run(recv.pull(1, lay, 1, asker(send, 0, src, [6])))
    assert torch.equal(again.data[:, :, 0], torch.stack([c[:, 6] for c in src]))


def test_a_taker_that_gives_up_leaves_the_push_read_off_the_pair(pair) -> None:
    recv, send = pair
    src = caches()
    lay = layout_of(src)

    async def go():
        first = push(send, 0, src, [1, 2])
        t = asyncio.create_task(recv.take(1, first, lay))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return await recv.take(1, push(send, 0, src, [4]), lay)

    got = asyncio.run(go())
    assert torch.equal(got.data[:, :, 0], torch.stack([c[:, 4] for c in src]))


# -- several ranks, concurrent transfers, failures ------------------------------------------------
def test_concurrent_transfers_from_two_sources_land_where_they_belong() -> None:
    chans = open_channels(3)  # ranks 0 and 1 send, rank 2 receives
    try:
        kv = {0: caches(torch.int8, 10), 1: caches(torch.int8, 11)}
        lay = layout_of(kv[0])
        rng = random.Random(0)
        jobs = [(r, rng.sample(range(BLOCKS), rng.randint(1, 6))) for r in (0, 1) for _ in range(5)]
        rng.shuffle(jobs)
        done_at: dict[int, float] = {}

        async def ask_after(src: int, ids: list[int], delay: float, tid: int) -> int:
            await asyncio.sleep(delay)  # asks arrive out of order and interleaved
            return await asker(chans[src], 2, kv[src], ids)(tid)

        async def one(i: int, src: int, ids: list[int]):
            delay = 0.4 if i == 0 else rng.random() * 0.02
            got = await chans[2].pull(src, lay, len(ids), lambda tid: ask_after(src, ids, delay, tid))
            done_at[i] = time.monotonic()
            return got

        async def go():
            return await asyncio.gather(*(one(i, s, ids) for i, (s, ids) in enumerate(jobs)))

        results = asyncio.run(go())
        for (src, ids), got in zip(jobs, results, strict=True):
            assert got.num_blocks == len(ids)
            assert same([got.data[layer] for layer in range(LAYERS)], blocks_of(kv[src], ids))
        # The slow first transfer holds up its own pair only, not the other source's.
        other = [i for i, (s, _) in enumerate(jobs) if s != jobs[0][0]]
        assert max(done_at[i] for i in other) < done_at[0]
    finally:
        for c in chans:
            c.close()


def test_a_silent_source_times_out_and_closes_the_receivers_channel() -> None:
    """A deadline passed: gloo has closed every pair of the rank, so the whole channel of
    the receiver is out of use (and says so at once); the other ranks' pairs still work."""
    chans = open_channels(3, timeout_s=1.0)
    try:
        src = caches()
        lay = layout_of(src)

        async def never(tid: int) -> None:  # the source took the ask and sent nothing
            return None

        t = time.monotonic()
        with pytest.raises(KVChannelError) as e:
            asyncio.run(chans[2].pull(0, lay, 2, never))
        assert e.value.broken and 0.9 < time.monotonic() - t < 5
        assert not chans[2].usable(0) and not chans[2].usable(1)
        got = asyncio.run(chans[1].pull(0, lay, 2, asker(chans[0], 1, src, [3, 4])))
        assert same([got.data[layer] for layer in range(LAYERS)], blocks_of(src, [3, 4]))
    finally:
        for c in chans:
            c.close()


def test_a_source_that_fails_to_send_breaks_the_pair_without_waiting(pair) -> None:
    recv, _ = pair

    async def dead(tid: int) -> None:
        raise ConnectionError("source actor died")

    t = time.monotonic()
    with pytest.raises(KVChannelError, match="did not send") as e:
        asyncio.run(recv.pull(1, layout_of(caches()), 2, dead))
    assert e.value.broken and time.monotonic() - t < 2  # not the 10 s timeout


@pytest.mark.parametrize("pull_first", [True, False])
def test_closing_the_channel_fails_waiting_takers_and_pullers_at_once(pull_first: bool) -> None:
    """A receive blocked in gloo outlives a close until its deadline; the callers waiting on
    it must not: a take and a pull still waiting fail as soon as the channel closes (here
    from another thread, as a break found by a channel thread closes it). Either one holds
    the pair while the other queues behind it: a pull queued behind the take's pump waits
    for the pair's lock, and gives up that wait too."""
    recv, send = open_channels(2, timeout_s=20.0)
    try:
        lay = layout_of(caches())

        async def never(tid: int) -> None:  # the source took the ask and has not sent yet
            await asyncio.sleep(30)

        async def go():
            starts = [lambda: recv.pull(1, lay, 2, never), lambda: recv.take(1, 424242, lay)]
            waiting = []
            for start in starts if pull_first else starts[::-1]:
                waiting.append(asyncio.create_task(start()))
                await asyncio.sleep(0.15)  # the first holds the pair; the second queues
            assert not any(t.done() for t in waiting) and len(recv._watched) == 2
            t = time.monotonic()
            threading.Thread(target=recv.close, kwargs={"abort": True}).start()
            got = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
            return got, time.monotonic() - t

        got, took = asyncio.run(go())
        assert all(isinstance(e, KVChannelError) and e.broken for e in got), got
        assert took < 2 and not recv._watched
        with pytest.raises(KVChannelError, match="closed"):  # and later callers at once too
            asyncio.run(recv.take(1, 7, lay))
    finally:
        for c in (recv, send):
            c.close()


# -- a second process -------------------------------------------------------------------------
def _serve(port: int, asks: mp.Queue, done: mp.Queue) -> None:
    """Rank 1 in its own process: answer each (transfer id, block ids) with a send."""
    torch.set_num_threads(1)
    ch = KVChannel(ChannelSpec(1, 2, "127.0.0.1", port, "gloo", 20.0), "cpu")
    kv = caches(torch.int8, 42)
    while (job := asks.get()) is not None:
        tid, ids = job
        done.put(ch.send(0, tid, lambda ids=ids: Outgoing.gather(layout_of(kv), kv, ids)).result())
    time.sleep(60)  # stays silent until killed


def _source_process(serve, backend: str, timeout_s: float, device: str):
    """Rank 1 runs ``serve(port, asks, done)`` in a spawned process; this process is rank 0."""
    ctx = mp.get_context("spawn")
    asks, done = ctx.Queue(), ctx.Queue()
    store, port = listen("127.0.0.1")
    proc = ctx.Process(target=serve, args=(port, asks, done), daemon=True)
    proc.start()
    ch = KVChannel(ChannelSpec(0, 2, "127.0.0.1", port, backend, timeout_s), device, store)
    return proc, asks, done, ch


def test_int8_blocks_cross_processes_bit_exact_and_a_dead_peer_fails_fast() -> None:
    proc, asks, done, ch = _source_process(_serve, "gloo", 20.0, "cpu")
    try:
        kv, dst = caches(torch.int8, 42), caches(torch.int8, 1)
        lay = layout_of(kv)

        async def pull(ids: list[int]):
            async def ask(tid: int) -> int:
                asks.put((tid, ids))
                return await asyncio.get_running_loop().run_in_executor(None, done.get, True, 20)
            return await ch.pull(1, lay, len(ids), ask)

        for ids, slots in (([2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]), ([15, 0, 9], [1, 2, 3])):
            write_blocks(dst, slots, asyncio.run(pull(ids)))
            assert same(blocks_of(dst, slots), blocks_of(kv, ids))

        async def killed(tid: int) -> None:  # the source dies after taking the ask
            asks.put(None)
            await asyncio.sleep(0.3)
            proc.kill()

        t = time.monotonic()
        with pytest.raises(KVChannelError) as e:
            asyncio.run(ch.pull(1, lay, 2, killed))
        assert e.value.broken and time.monotonic() - t < 10  # the socket closed: no 20 s wait
    finally:
        proc.kill()
        proc.join(20)
        ch.close()


# -- NCCL between two GPUs (gpu marker: the 2xH200 machine) ----------------------------------------
def _serve_nccl(port: int, asks: mp.Queue, done: mp.Queue) -> None:
    """Rank 1 on the second GPU: its caches hold the same random blocks, made on the CPU."""
    torch.cuda.set_device(1)
    ch = KVChannel(ChannelSpec(1, 2, "127.0.0.1", port, "nccl", 60.0), "cuda:1")
    kvs = {str(d): [c.to("cuda:1") for c in caches(d, 7)] for d in DTYPES}
    while (job := asks.get()) is not None:
        tid, dt, ids = job
        kv = kvs[dt]
        done.put(ch.send(0, tid, lambda kv=kv, ids=ids: Outgoing.gather(layout_of(kv), kv, ids)).result())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs")
def test_nccl_transfer_between_two_gpus_is_bit_exact() -> None:
    """GPU to GPU over NCCL (NVLink where present): bf16, fp32 and int8 blocks (scales in the
    rows) land bit for bit, for merged runs and scattered ids."""
    proc, asks, done, ch = _source_process(_serve_nccl, "nccl", 60.0, "cuda:0")
    try:
        for dt in DTYPES:
            src = caches(dt, 7)  # what rank 1 holds, on the CPU here
            dst = [c.to("cuda:0") for c in caches(dt, 3)]
            lay = layout_of(dst)
            for ids, slots in (([2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]),
                               ([15, 0, 9, 1], [1, 2, 3, 4])):
                async def ask(tid: int, ids=ids, dt=str(dt)) -> int:
                    asks.put((tid, dt, ids))
                    return await asyncio.get_running_loop().run_in_executor(None, done.get, True, 60)

                got = asyncio.run(ch.pull(1, lay, len(ids), ask))
                write_blocks(dst, slots, got)
                torch.cuda.synchronize()
                assert same([c.cpu() for c in blocks_of(dst, slots)], blocks_of(src, ids)), (dt, ids)
    finally:
        asks.put(None)
        proc.join(30)
        proc.kill()
        ch.close()
