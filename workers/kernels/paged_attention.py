"""Triton kernels over the paged KV cache: the KV write and split-KV decode attention.

Decode attention runs in two launches (flash-decoding). Stage 1 has one program per
(sequence, split, KV head): it loads the sequence's block-table entries for its share of
the KV length, and attends all query heads of that KV head's group at once, so each K/V
row is read once per group (GQA), not once per query head::

    grid (B*S, Hkv)       K/V tiles of BLOCK_N tokens, addressed through the block table
      q [GROUP, D]   x    K^T [D, BLOCK_N]  -> online softmax -> partial O [GROUP, D], LSE
    grid (B, H)           merge the S partials by their log-sum-exp (S > 1 only: with one
                          split, stage 1 writes the normalized output directly)

With a shared-prefix plan (shared_prefix.py), stage 1 starts with the plan's chunk
programs, which read each chunk's shared blocks once for all its rows; the per-row
programs then cover only each row's tail, and the chunks' partials join the merge as
extra splits.

A split's range depends only on the sequence's own length and the split count, both read
on the device, so the launch needs no host value that changes per step (graph-capturable).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pdserve.workers.kernels.launch import fast
from pdserve.workers.kernels.shared_prefix import MAX_SPLITS, SharedPrefix, attend, chunk_program

LOG2E = 1.4426950408889634


@fast
@triton.jit
def _write_kv_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_vt, stride_cs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)  # slot -1: a padding row (CUDA graphs) writes nothing
    k = tl.load(K + t * stride_kt + offs, mask=mask)
    v = tl.load(V + t * stride_vt + offs, mask=mask)
    tl.store(KCache + slot * stride_cs + offs, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + slot * stride_cs + offs, v.to(VCache.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> their slots of kv_cache [2, num_blocks, block_size, Hkv, D]."""
    t = k.shape[0]
    if t == 0:
        return
    _, nb, bs, hkv, d = kv_cache.shape
    row = hkv * d
    if k.stride(-1) != 1 or k.stride(-2) != d:
        k = k.contiguous()
    if v.stride(-1) != 1 or v.stride(-2) != d:
        v = v.contiguous()
    _write_kv_kernel[(t,)](k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0),
                           row, ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)


@fast
@triton.jit
def _decode_split_kernel(Q, KCache, VCache, BlockTables, SeqLens, PrefixLens, ChunkRows, ChunkLens,
                         Splits, MidO, MidLse,
                         stride_qb, stride_qh, stride_cs, stride_ch, stride_bt,
                         stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                         sm_scale_log2, num_chunks, chunk_programs,
                         BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_HC: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, HAS_PREFIX: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    if HAS_PREFIX:  # the first chunk_programs programs read shared prefixes (shared_prefix.py)
        if pid < chunk_programs:
            chunk_program(pid, kvh, Q, KCache, VCache, BlockTables, ChunkRows, ChunkLens, Splits,
                          MidO, MidLse, stride_qb, stride_qh, stride_cs, stride_ch, stride_bt,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, sm_scale_log2,
                          NUM_SPLITS, num_chunks, BLOCK_SIZE, GROUP, BLOCK_HC, ROWS, HEAD_DIM,
                          BLOCK_D, BLOCK_N, IEEE)
        else:
            _row_program(pid - chunk_programs, kvh, Q, KCache, VCache, BlockTables, SeqLens,
                         PrefixLens, MidO, MidLse, stride_qb, stride_qh, stride_cs, stride_ch,
                         stride_bt, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                         sm_scale_log2, BLOCK_SIZE, GROUP, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N,
                         NUM_SPLITS, True, IEEE)
    else:
        _row_program(pid, kvh, Q, KCache, VCache, BlockTables, SeqLens, PrefixLens, MidO, MidLse,
                     stride_qb, stride_qh, stride_cs, stride_ch, stride_bt, stride_mb, stride_mh,
                     stride_ms, stride_lb, stride_lh, sm_scale_log2, BLOCK_SIZE, GROUP, BLOCK_H,
                     HEAD_DIM, BLOCK_D, BLOCK_N, NUM_SPLITS, False, IEEE)


@triton.jit
def _row_program(rid, kvh, Q, KCache, VCache, BlockTables, SeqLens, PrefixLens, MidO, MidLse,
                 stride_qb, stride_qh, stride_cs, stride_ch, stride_bt,
                 stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, sm_scale_log2,
                 BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 NUM_SPLITS: tl.constexpr, HAS_PREFIX: tl.constexpr, IEEE: tl.constexpr):
    """One (sequence, split) program: every query head of one KV head's group at once."""
    b = rid // NUM_SPLITS
    split = rid % NUM_SPLITS
    seq_len = tl.load(SeqLens + b)
    first = 0
    if HAS_PREFIX:  # a shared-prefix chunk reads [0, prefix): this row reads its tail only
        first = tl.load(PrefixLens + b)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    acc, m_i, l_i = attend(q, KCache, VCache, BlockTables + b * stride_bt, start, end,
                           kvh * stride_ch, stride_cs, sm_scale_log2, BLOCK_H, BLOCK_SIZE,
                           HEAD_DIM, BLOCK_D, BLOCK_N, IEEE)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    # One split: MidO is the output itself (the merge would scale by exactly 1.0)
    tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
             out.to(MidO.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1 or HAS_PREFIX:  # partials to merge
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@fast
@triton.jit
def _decode_merge_kernel(MidO, MidLse, PrefixLens, SharedSplits, Out, stride_mb, stride_mh, stride_ms,
                         stride_lb, stride_lh, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         NUM_OWN: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    if NUM_OWN < NUM_SPLITS:  # then slots NUM_OWN.. hold the row's chunk's splits, if in one
        shared = tl.where(tl.load(PrefixLens + b) > 0, tl.load(SharedSplits), 0)
        s_mask = s_mask & (offs_s < NUM_OWN + shared)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)  # split 0 is never empty: finite
    w = tl.exp2(lse - m)
    w = w / tl.sum(w, 0)
    o = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                mask=(s_mask & (lse > float("-inf")))[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


def num_splits_for(batch: int, num_kv_heads: int, max_len: int, num_sms: int) -> int:
    """Enough (sequence, head, split) programs for ~2 waves; a split covers >= 128 tokens.
    A power of two, so few variants compile."""
    want = max(1, min(-(-2 * num_sms // max(1, batch * num_kv_heads)), -(-max_len // 128), 32))
    return triton.next_power_of_2(want)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tile(programs: int, block_d: int, q: torch.Tensor, shared: bool) -> tuple[int, int]:
    """K/V tokens per loop step and pipeline stages of the per-row programs.

    Measured on an H100 inside CUDA graphs (BENCHMARKS.md, session 12): a third stage helps
    every shape by 1-3%; with 128-wide heads, 64 tokens a step beat 32 by ~2% at large
    batch, and when the grid is at most two programs per SM (batch 1 at long context: 32
    splits x 8 KV heads) 128 tokens a step keep enough bytes in flight: 15.5 -> 11.8 us a
    layer at 8k tokens, 63.9 -> 53.2 us at 32k. fp32 (the exactness tests), heads wider
    than 128 and the shared-prefix chunk programs, whose query tile is up to 64 rows, keep
    the earlier tiles."""
    if q.dtype == torch.float32:
        return 32, 2
    if shared:
        return (64 if block_d <= 64 else 32), 2
    if block_d <= 64:
        return 64, 3
    if block_d > 128:  # wider heads: not measured, the tile that fits
        return 32, 2
    few = q.device.type == "cuda" and programs <= 2 * _num_sms(q.device.index or 0)
    return (128 if few else 64), 3


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int,
                     out: torch.Tensor | None = None,
                     shared: SharedPrefix | None = None,
                     tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One query token per sequence over its paged KV.

    q: [B, H, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; block_tables: [B, M] int;
    seq_lens: [B] int (KV length, the new token included, already written). ``shared``: a
    shared-prefix plan (shared_prefix.py); each row's own ``num_splits`` then cover only its
    tail. ``tile``: (tokens a step, warps, stages) instead of ``_tile``'s choice (the tile
    sweeps of scripts/bench_attention_tiles.py). Returns [B, H, D].
    """
    bsz, h, d = q.shape
    _, nb, block_size, hkv, _ = kv_cache.shape
    group = h // hkv
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(max(d, 16))
    if tile is None:
        block_n, stages = _tile(bsz * num_splits * hkv, block_d, q, shared is not None)
        warps = 4
    else:
        block_n, warps, stages = tile
    slots = num_splits + (MAX_SPLITS if shared is not None else 0)
    if slots == 1:  # stage 1 writes the output: no partials, no merge launch
        mid_o, mid_lse = out, out
        mid_strides = (out.stride(0), out.stride(1), 0, 0, 0)
    else:
        mid_o = torch.empty((bsz, h, slots, d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, h, slots), dtype=torch.float32, device=q.device)
        mid_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1))
    if shared is not None:
        prefix_lens, chunk_rows, chunk_lens, shared_splits = (
            shared.prefix_lens, shared.chunk_rows, shared.chunk_lens, shared.splits)
        programs, rows = shared.programs, shared.chunk_rows.shape[1]
    else:  # unread
        prefix_lens = chunk_rows = chunk_lens = shared_splits = seq_lens
        programs, rows = 0, 1
    _decode_split_kernel[(programs + bsz * num_splits, hkv)](
        q, k_cache, v_cache, block_tables, seq_lens, prefix_lens, chunk_rows, chunk_lens,
        shared_splits, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *mid_strides, scale * LOG2E, chunk_rows.shape[0], programs,
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        ROWS=rows, BLOCK_HC=triton.next_power_of_2(group),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_PREFIX=shared is not None, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    if slots > 1:
        _decode_merge_kernel[(bsz, h)](
            mid_o, mid_lse, prefix_lens, shared_splits, out, *mid_strides, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=slots, NUM_OWN=num_splits,
            BLOCK_S=max(2, triton.next_power_of_2(slots)), num_warps=4)
    return out
