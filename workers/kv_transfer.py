"""KV handoff between workers: the handle, contiguous packing with per-block checksums,
msgpack framing for the gRPC transport, and the device-side gather/scatter of the collective
channel (workers/kv_channel.py).

States of a handoff (the prefill side owns the lease)::

    PINNED --pull--> PULLED --release--> RELEASED
       |                                    ^
       +-- refuse / cancel / lease timeout --+   (blocks unpinned at once)
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from pdserve.workers.errors import PdserveError
from pdserve.workers.quant import KV_INT8, KV_SCALE_BYTES, kv_head_width

FRAME_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "int8": torch.int8, "uint8": torch.uint8}


class KVTransferError(PdserveError):
    """A pull failed (source gone, lease expired, bad frame)."""


class KVChecksumError(KVTransferError):
    def __init__(self, block_index: int) -> None:
        super().__init__(f"checksum mismatch in transferred block {block_index}")
        self.block_index = block_index

    def __reduce__(self):  # pickle by the real argument, not the message
        return type(self), (self.block_index,)


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch."; "int8": the scaled int8 cache

    @property
    def head_width(self) -> int:
        """Elements per (K|V, token, head) in the cache: head_dim, and for the int8 cache
        the 4 bytes of the row's float32 scale (which travel with it, see workers/quant.py)."""
        return kv_head_width(self.head_dim, _DTYPES[self.dtype])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        elem = torch.empty((), dtype=_DTYPES[self.dtype]).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_width * elem


@dataclass(frozen=True, slots=True)
class KVHandle:
    """Where a prefill's blocks are and under which lease (small; crosses actors)."""

    request_id: str
    worker_id: str
    lease_id: str
    num_tokens: int  # tokens whose KV the blocks hold (the prompt)
    num_blocks: int
    block_hashes: tuple[bytes, ...]  # hashes of the full blocks, in order
    layout: KVLayout
    grpc_address: str | None = None  # set when the source serves blocks over gRPC

    @property
    def bytes_per_block(self) -> int:
        return self.layout.block_bytes


@dataclass(frozen=True, slots=True)
class KVPayload:
    """Blocks packed contiguously: data is uint8 [n_blocks, per_block_bytes] (layer-major inside;
    an int8 cache's scales are part of its rows, so they are in the data and its checksums)."""

    layout: KVLayout
    data: np.ndarray
    checksums: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.checksums)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def layout_of(kv_caches: list[torch.Tensor]) -> KVLayout:
    _, _, bs, h, d = kv_caches[0].shape
    if kv_caches[0].dtype == KV_INT8:
        d -= KV_SCALE_BYTES
    return KVLayout(len(kv_caches), bs, h, d, str(kv_caches[0].dtype).removeprefix("torch."))


def checksum(block: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B"))


def pack_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> KVPayload:
    """Gather ``block_ids`` from every layer into one contiguous host buffer."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    # [L, 2, n, bs, h, d] -> [n, L, 2, bs, h, d] so that each block is one contiguous run.
    stacked = torch.stack([c.index_select(1, idx) for c in kv_caches]).permute(2, 0, 1, 3, 4, 5)
    host = stacked.contiguous().cpu()
    data = host.view(torch.uint8).reshape(len(block_ids), -1).numpy()
    return KVPayload(layout_of(kv_caches), data, tuple(checksum(row) for row in data))


def unpack_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], payload: KVPayload) -> None:
    """Verify every block's checksum, then scatter the blocks into ``block_ids``."""
    lay = payload.layout
    if lay != layout_of(kv_caches):
        raise KVTransferError(f"layout mismatch: got {lay}, cache is {layout_of(kv_caches)}")
    if len(block_ids) != payload.num_blocks:
        raise KVTransferError(f"{payload.num_blocks} blocks sent for {len(block_ids)} slots")
    for i, row in enumerate(payload.data):
        if checksum(row) != payload.checksums[i]:
            raise KVChecksumError(i)
    n = len(block_ids)
    with warnings.catch_warnings():  # read-only buffers (Ray, gRPC) are only read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(payload.data)).view(_DTYPES[lay.dtype])
    t = t.reshape(n, lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_width)
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    t = t.to(kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, idx, t[:, layer].transpose(0, 1))


# -- device-side packing (the collective channel) ----------------------------------

RUN_COPY_MAX = 2  # up to this many runs of consecutive ids: slice copies; more: index_select


@dataclass(frozen=True, slots=True)
class DeviceBlocks:
    """Blocks received over the collective channel, still where they landed (the GPU for
    NCCL); the channel has checked their header and digest. data: [layers, 2, n, block_size,
    kv_heads, head_width] in the cache dtype (an int8 cache's scales inside its rows)."""

    layout: KVLayout
    data: torch.Tensor
    wire_seconds: float = 0.0  # header arrived -> last byte arrived

    @property
    def num_blocks(self) -> int:
        return int(self.data.shape[2])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, in order: [3, 4, 5, 9, 2] ->
    [(3, 3), (9, 1), (2, 1)]."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def gather_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """``block_ids`` of every layer into one new contiguous tensor [layers, 2, n, ...] on the
    caches' device: a slice copy per run and layer when the ids form few runs, else one
    index_select per layer (a copy per run would cost more kernel launches)."""
    c0 = kv_caches[0]
    out = torch.empty((len(kv_caches), 2, len(block_ids), *c0.shape[2:]), dtype=c0.dtype,
                      device=c0.device)
    runs = block_runs(block_ids)
    if len(runs) <= RUN_COPY_MAX:
        off = 0
        for start, n in runs:
            for layer, cache in enumerate(kv_caches):
                out[layer, :, off:off + n].copy_(cache[:, start:start + n])
            off += n
    elif block_ids:
        idx = torch.tensor(block_ids, dtype=torch.long, device=c0.device)
        for layer, cache in enumerate(kv_caches):
            torch.index_select(cache, 1, idx, out=out[layer])
    return out


def scatter_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], data: torch.Tensor) -> None:
    """The inverse of :func:`gather_blocks`: ``data[layer, :, i]`` into block ``block_ids[i]``."""
    if data.is_cuda:  # received on the channel's stream, read on this one
        data.record_stream(torch.cuda.current_stream(data.device))
    runs = block_runs(block_ids)
    if len(runs) <= RUN_COPY_MAX:
        off = 0
        for start, n in runs:
            for layer, cache in enumerate(kv_caches):
                cache[:, start:start + n].copy_(data[layer, :, off:off + n])
            off += n
    elif block_ids:
        idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
        for layer, cache in enumerate(kv_caches):
            cache.index_copy_(1, idx, data[layer])


@dataclass(slots=True)
class Outgoing:
    """One channel send's blocks, gathered into one buffer; ``data`` None: no such lease."""

    layout: KVLayout
    data: torch.Tensor | None
    digest: int = 0

    @classmethod
    def gather(cls, layout: KVLayout, kv_caches: list[torch.Tensor], block_ids: list[int]) -> Outgoing:
        data = gather_blocks(kv_caches, block_ids)
        return cls(layout, data, digest(data))  # digest's .item() waits for the gather

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


def digest(t: torch.Tensor) -> int:
    """Sum of the bytes as int32 words (bytes if they do not divide): one cheap reduction on
    the device, changed by any flipped bit. Order is the header's job, not this one's."""
    flat = t.reshape(-1).view(torch.uint8)
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    return int(words.sum(dtype=torch.int64).item()) if flat.numel() else 0


def write_blocks(kv_caches: list[torch.Tensor], block_ids: list[int],
                 payload: KVPayload | DeviceBlocks) -> None:
    """Write pulled blocks into ``block_ids``, whichever transport brought them."""
    if isinstance(payload, KVPayload):
        unpack_blocks(kv_caches, block_ids, payload)
        return
    if payload.layout != layout_of(kv_caches):
        raise KVTransferError(f"layout mismatch: got {payload.layout}, cache is {layout_of(kv_caches)}")
    if len(block_ids) != payload.num_blocks:
        raise KVTransferError(f"{payload.num_blocks} blocks sent for {len(block_ids)} slots")
    scatter_blocks(kv_caches, block_ids, payload.data.to(kv_caches[0].device))


# -- msgpack frames (gRPC transport) -----------------------------------------------

def encode_frames(payload: KVPayload, max_frame_bytes: int = 1 << 20) -> Iterator[bytes]:
    """A header frame, then data frames of at most ``max_frame_bytes`` of block bytes."""
    lay = payload.layout
    yield msgpack.packb({
        "v": FRAME_VERSION, "kind": "header", "dtype": lay.dtype,
        "shape": [lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim],
        "n_blocks": payload.num_blocks, "block_bytes": int(payload.data.shape[1]) if payload.num_blocks else 0,
        "checksums": list(payload.checksums),
    }, use_bin_type=True)
    if not payload.nbytes:  # nothing to send (a memoryview of an empty array cannot cast)
        return
    flat = memoryview(np.ascontiguousarray(payload.data)).cast("B")
    for off in range(0, len(flat), max_frame_bytes):
        chunk = flat[off:off + max_frame_bytes]
        yield msgpack.packb({"v": FRAME_VERSION, "kind": "data", "offset": off,
                             "crc": zlib.crc32(chunk), "data": bytes(chunk)}, use_bin_type=True)


def _unpack(frame: bytes) -> dict:
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several types
        raise KVTransferError(f"malformed KV frame: {e}") from e
    if not isinstance(msg, dict) or msg.get("v") != FRAME_VERSION:
        raise KVTransferError("KV frame of unknown version")
    return msg


def decode_frames(frames: Iterable[bytes]) -> KVPayload:
    it = iter(frames)
    try:
        head = _unpack(next(it))
    except StopIteration as e:
        raise KVTransferError("empty KV stream") from e
    if head.get("kind") != "header" or head.get("dtype") not in _DTYPES:
        raise KVTransferError("KV stream must start with a valid header")
    n, per = int(head["n_blocks"]), int(head["block_bytes"])
    buf = bytearray(n * per)
    got = 0
    for frame in it:
        msg = _unpack(frame)
        data = msg.get("data")
        off = msg.get("offset")
        if msg.get("kind") != "data" or not isinstance(data, bytes) or not isinstance(off, int):
            raise KVTransferError("bad KV data frame")
        if off != got or off + len(data) > len(buf):
            raise KVTransferError(f"KV data frame out of order at offset {off}")
        if zlib.crc32(data) != msg.get("crc"):
            raise KVTransferError(f"KV frame at offset {off} corrupted in transit")
        buf[off:off + len(data)] = data
        got += len(data)
    if got != len(buf):
        raise KVTransferError(f"KV stream ended early: {got} of {len(buf)} bytes")
    layers, bs, h, d = head["shape"]
    lay = KVLayout(layers, bs, h, d, head["dtype"])
    data = np.frombuffer(bytes(buf), dtype=np.uint8).reshape(n, per) if n else np.zeros((0, 0), np.uint8)
    return KVPayload(lay, data, tuple(int(c) for c in head["checksums"]))
