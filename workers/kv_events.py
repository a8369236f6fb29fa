"""KV-cache events a block pool emits for the global prefix-cache index.

Every event batch carries a per-worker, strictly increasing sequence number so
that a consumer can detect a gap (a lost batch) and ask for a snapshot.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

BlockHash = bytes  # 16-byte digest (blake2b) of (parent hash, token ids, cache salt)


@functools.cache
def int64s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}q")


def pack_tokens(token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Token ids as little-endian int64s: what a block hash covers and a hit compares."""
    return int64s(len(token_ids)).pack(*token_ids)


def unpack_tokens(data: bytes) -> tuple[int, ...]:
    return int64s(len(data) // 8).unpack(data)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks whose KV became valid and reusable, in chain order.

    ``parent_hash`` is the hash of the block preceding ``block_hashes[0]``
    (``None`` for the first block of a sequence). The blocks' token ids travel packed
    (`pack_tokens`, as the pool holds them): unpacking them for every event cost a third of
    prefix caching's host time when nothing hits, and the index reads only the hashes.
    """

    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None
    token_bytes: bytes  # the blocks' token ids, packed
    block_size: int

    @property
    def token_ids(self) -> tuple[int, ...]:
        return unpack_tokens(self.token_bytes)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks whose cached KV was evicted (the hash no longer resolves here)."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The worker dropped its whole prefix cache."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """Events drained from one worker since the previous batch."""

    worker_id: str
    seq: int  # 1, 2, 3, ... per worker; a gap means events were lost
    events: tuple[KVEvent, ...]
