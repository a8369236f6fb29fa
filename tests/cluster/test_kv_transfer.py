"""KV handoff packing, checksums and gRPC framing (workers/kv_transfer.py), without Ray.

The caches are random tensors with the engine's layout: one [2, num_blocks, block_size,
kv_heads, head_dim] tensor per layer.
"""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch

from pdserve.workers.kv_transfer import (
    FRAME_VERSION,
    KVChecksumError,
    KVHandle,
    KVPayload,
    KVTransferError,
    checksum,
    decode_frames,
    encode_frames,
    layout_of,
    pack_blocks,
    unpack_blocks,
)

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 12, 4, 2, 8


def caches(dtype: torch.dtype = torch.float32, seed: int = 0, blocks: int = BLOCKS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, blocks, BS, HEADS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]


def block(kv: list[torch.Tensor], b: int) -> list[torch.Tensor]:
    return [c[:, b].clone() for c in kv]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def corrupt(payload: KVPayload, row: int, col: int | None = None) -> KVPayload:
    """Flip one byte after the checksums were taken (what a bad link would do)."""
    data = np.array(payload.data, copy=True)
    data[row, data.shape[1] // 2 if col is None else col] ^= 0xFF
    return dataclasses.replace(payload, data=data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_moves_exactly_the_named_blocks(dtype: torch.dtype) -> None:
    src, dst = caches(dtype, seed=1), caches(dtype, seed=2)
    before = [block(dst, b) for b in range(BLOCKS)]
    payload = pack_blocks(src, [7, 2, 9])
    assert payload.num_blocks == 3 and payload.data.dtype == np.uint8
    per_block = 2 * LAYERS * BS * HEADS * DIM * src[0].element_size()
    assert payload.data.shape == (3, per_block) and payload.nbytes == 3 * per_block
    assert payload.layout == layout_of(src) and payload.layout.dtype == str(dtype)[6:]
    assert payload.checksums == tuple(checksum(r) for r in payload.data)

    unpack_blocks(dst, [0, 5, 11], payload)
    for s, d in ((7, 0), (2, 5), (9, 11)):
        assert same(block(dst, d), block(src, s))
    for b in set(range(BLOCKS)) - {0, 5, 11}:
        assert same(block(dst, b), before[b]), f"block {b} was overwritten"


def test_handle_bytes_per_block_matches_the_payload() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        kv = caches(dtype)
        payload = pack_blocks(kv, [0, 1])
        handle = KVHandle("r", "w", "w:r", 2 * BS, 2, (), payload.layout)
        assert handle.bytes_per_block == payload.data.shape[1]


def test_a_corrupt_block_is_rejected_before_anything_is_written() -> None:
    src, dst = caches(seed=1), caches(seed=2)
    before = [block(dst, b) for b in range(BLOCKS)]
    bad = corrupt(pack_blocks(src, [1, 2, 3]), row=2)
    with pytest.raises(KVChecksumError) as e:
        unpack_blocks(dst, [4, 5, 6], bad)
    assert e.value.block_index == 2
    assert all(same(block(dst, b), before[b]) for b in range(BLOCKS))


def test_checksum_sees_every_single_byte_flip() -> None:
    row = pack_blocks(caches(), [3]).data[0]
    ref = checksum(row)
    rng = np.random.default_rng(0)
    for col in rng.choice(row.size, size=64, replace=False):
        flipped = row.copy()
        flipped[col] ^= 1 << int(rng.integers(8))
        assert checksum(flipped) != ref


def test_layout_and_block_count_mismatches_are_refused() -> None:
    payload = pack_blocks(caches(), [0, 1])
    with pytest.raises(KVTransferError, match="layout"):
        unpack_blocks(caches(torch.bfloat16), [0, 1], payload)
    with pytest.raises(KVTransferError, match="layout"):
        unpack_blocks([c[:, :, :, :1] .contiguous() for c in caches()], [0, 1], payload)
    with pytest.raises(KVTransferError, match="slots"):
        unpack_blocks(caches(), [0, 1, 2], payload)


# -- gRPC frames ----------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_bytes", [1 << 20, 1000, 7])
def test_frames_round_trip(frame_bytes: int) -> None:
    payload = pack_blocks(caches(torch.bfloat16), [4, 0, 8, 3])
    frames = list(encode_frames(payload, max_frame_bytes=frame_bytes))
    assert len(frames) == 1 + -(-payload.nbytes // frame_bytes)
    got = decode_frames(frames)
    assert got.layout == payload.layout and got.checksums == payload.checksums
    assert np.array_equal(got.data, payload.data)
    dst = caches(torch.bfloat16, seed=5)
    unpack_blocks(dst, [0, 1, 2, 3], got)  # verifies the end-to-end checksums too


def test_an_empty_payload_round_trips() -> None:
    kv = caches()
    empty = KVPayload(layout_of(kv), np.zeros((0, 0), np.uint8), ())
    got = decode_frames(encode_frames(empty))
    assert got.num_blocks == 0 and got.layout == empty.layout


def _reframe(frame: bytes, **changes) -> bytes:
    msg = msgpack.unpackb(frame, raw=False)
    msg.update(changes)
    return msgpack.packb(msg, use_bin_type=True)


def test_frame_level_corruption_is_detected() -> None:
    payload = pack_blocks(caches(), [0, 1, 2])
    head, *data = list(encode_frames(payload, max_frame_bytes=500))
    msg = msgpack.unpackb(data[1], raw=False)
    flipped = bytearray(msg["data"])
    flipped[10] ^= 0x01
    bad = _reframe(data[1], data=bytes(flipped))  # the frame keeps its old crc
    with pytest.raises(KVTransferError, match="corrupted in transit"):
        decode_frames([head, data[0], bad, *data[2:]])


@pytest.mark.parametrize("case", ["missing", "reordered", "truncated", "empty", "no-header",
                                  "version", "dtype", "garbage", "overflow"])
def test_malformed_streams_are_refused(case: str) -> None:
    payload = pack_blocks(caches(), [0, 1])
    head, *data = list(encode_frames(payload, max_frame_bytes=512))
    frames = {
        "missing": [head, data[0], *data[2:]],
        "reordered": [head, data[1], data[0], *data[2:]],
        "truncated": [head, *data[:-1]],
        "empty": [],
        "no-header": data,
        "version": [_reframe(head, v=FRAME_VERSION + 1), *data],
        "dtype": [_reframe(head, dtype="float64"), *data],
        "garbage": [head, b"\xc1not msgpack", *data],
        "overflow": [head, *data, _reframe(data[-1], offset=payload.nbytes)],
    }[case]
    with pytest.raises(KVTransferError):
        decode_frames(frames)


def test_corruption_after_the_checksum_survives_framing_and_is_caught_at_unpack() -> None:
    # What `inject_fault("corrupt_export")` does: the source flips a byte after checksumming,
    # so every frame CRC is computed over bad bytes and passes; the block checksum does not.
    src, dst = caches(seed=1), caches(seed=2)
    bad = corrupt(pack_blocks(src, [5, 6]), row=0)
    got = decode_frames(encode_frames(bad, max_frame_bytes=256))
    with pytest.raises(KVChecksumError) as e:
        unpack_blocks(dst, [0, 1], got)
    assert e.value.block_index == 0


def test_transfer_errors_survive_pickling() -> None:
    # Ray pickles an actor's exception to its caller; the fields must arrive intact.
    import pickle

    e = pickle.loads(pickle.dumps(KVChecksumError(3)))
    assert isinstance(e, KVChecksumError) and e.block_index == 3 and str(e).endswith("block 3")
