"""Triton prefill / extend attention over the paged KV cache: all multi-token rows of a step
in one launch (whole prompts, chunks after cached KV, prefix-cache hits, spec-decode
verification rows).

The new K/V are already in the cache (the KV write runs first), so every key is read through
the block table. Query heads of one KV head's group are packed into the tile's rows: packed
row ``m`` of a sequence is (query token ``m // GROUP``, head ``kvh * GROUP + m % GROUP``).
Each K/V tile read from the cache then serves the whole group, and a sequence with few query
tokens (verification, a short chunk) still fills the M dimension of the matmul::

    tiles int32 [num_tiles, 5]   seq | its first row in q | n_q | context | first packed row
    grid (num_tiles, Hkv)        most KV work first (host-sorted), so the tail is short
    program: q [BLOCK_M, D] x K^T [D, BLOCK_N], online softmax in fp32 ->  O [BLOCK_M, D]
             KV positions [0, full): below every row's position, no mask
                          [full, end): the causal mask (row position >= key position)

A sequence's queries sit at positions ``context .. context + n_q - 1`` with ``context =
seq_len - n_q``. The schedule is built with numpy from the metadata's host lists and copied
once per step (pinned, non-blocking): no device value is read on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from pdserve.workers.kernels.launch import fast

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, l_i, m_i, q, n0, qpos, kv_end, table, KCache, VCache, kv_head_off,
                 stride_cs, offs_d, d_mask, sm_scale_log2,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    pos = n0 + tl.arange(0, BLOCK_N)
    if CAUSAL:
        n_mask = pos < kv_end
        blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:  # the unmasked range ends below the sequence length: every table entry exists
        blk = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    slot = blk * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * stride_cs + kv_head_off + offs_d[None, :]
    if CAUSAL:
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(VCache + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    elif EVEN_D:
        k = tl.load(KCache + kv_off).to(q.dtype)
        v = tl.load(VCache + kv_off).to(q.dtype)
    else:
        k = tl.load(KCache + kv_off, mask=d_mask[None, :], other=0.0).to(q.dtype)
        v = tl.load(VCache + kv_off, mask=d_mask[None, :], other=0.0).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * sm_scale_log2
    if CAUSAL:
        s = tl.where((pos[None, :] <= qpos[:, None]) & n_mask[None, :], s, float("-inf"))
    # Every valid row sees key 0 in its first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@fast
@triton.jit
def _prefill_kernel(Q, KCache, VCache, Out, BlockTables, Tiles,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
                    sm_scale_log2,
                    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr):
    tile = Tiles + tl.program_id(0) * 5  # one row of the schedule (see the module doc)
    kvh = tl.program_id(1)
    seq = tl.load(tile)
    q_start = tl.load(tile + 1)
    n_q = tl.load(tile + 2)
    context = tl.load(tile + 3)
    m0 = tl.load(tile + 4)

    rows = n_q * GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    tok = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    qpos = context + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    io_mask = m_mask[:, None] & d_mask[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)

    first_pos = context + m0 // GROUP
    kv_end = context + (tl.minimum(m0 + BLOCK_M, rows) - 1) // GROUP + 1
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    table = BlockTables + seq.to(tl.int64) * stride_bt
    kv_head_off = kvh * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, n0, qpos, kv_end, table, KCache, VCache,
                                     kv_head_off, stride_cs, offs_d, d_mask, sm_scale_log2,
                                     BLOCK_SIZE, BLOCK_N, BLOCK_D == HEAD_DIM, False, IEEE)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, n0, qpos, kv_end, table, KCache, VCache,
                                     kv_head_off, stride_cs, offs_d, d_mask, sm_scale_log2,
                                     BLOCK_SIZE, BLOCK_N, BLOCK_D == HEAD_DIM, True, IEEE)
    out = acc / tl.where(m_mask, l_i, 1.0)[:, None]
    tl.store(Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=io_mask)


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """One step's tile schedule, shared by every layer (same heads, head size and dtype)."""

    tiles: torch.Tensor  # int32 [num_tiles, 5] on the device
    num_tiles: int
    group: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, dtype: torch.dtype, max_rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), picked on sm_90. The tile is half as tall
    when no sequence fills 128 packed rows (verification rows, short chunks): fewer wasted
    matmul rows. float32 runs ieee dots on the CUDA cores: small tiles. 128-wide heads run
    the tall tile on 4 warps, not 8: 3.6-9% faster on an H100 from 2k to 32k tokens
    (BENCHMARKS.md, session 12)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return (32, 32, 4, 2) if block_d <= 64 else (32, 16, 8, 2) if block_d <= 128 else (16, 16, 8, 2)
    tall = max_rows > 64
    if block_d <= 64:
        return (128, 64, 8, 3) if tall else (64, 64, 4, 3)
    if block_d <= 128:
        return (128, 64, 4, 2) if tall else (64, 64, 4, 2)
    return (64, 32, 8, 2) if tall else (32, 32, 4, 2)


def plan_prefill(query_start_loc: list[int], seq_lens: list[int], num_prefills: int, group: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillPlan:
    """The tiles of the first ``num_prefills`` sequences, heaviest first, staged on the device."""
    qsl = np.asarray(query_start_loc[:num_prefills + 1], dtype=np.int64)
    n_q = np.diff(qsl)
    context = np.asarray(seq_lens[:num_prefills], dtype=np.int64) - n_q
    rows = n_q * group
    block_m, block_n, warps, stages = tile_config(head_dim, dtype, int(rows.max()))
    per_seq = -(-rows // block_m)
    seq = np.repeat(np.arange(num_prefills), per_seq)
    first_tile = np.cumsum(per_seq) - per_seq
    m0 = (np.arange(len(seq)) - first_tile[seq]) * block_m
    kv_len = context[seq] + (np.minimum(m0 + block_m, rows[seq]) - 1) // group + 1
    order = np.argsort(-kv_len, kind="stable")
    tiles = np.stack([seq, qsl[seq], n_q[seq], context[seq], m0], axis=1)[order]
    host = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.int32))
    if device.type == "cuda":  # the caching host allocator keeps the buffer until the copy ran
        host = host.pin_memory()
    return PrefillPlan(host.to(device, non_blocking=True), len(seq), group, block_m, block_n,
                       warps, stages)


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      plan: PrefillPlan, scale: float, out: torch.Tensor) -> None:
    """Causal attention of the planned rows of q [T, H, D] over their sequences' paged KV
    (kv_cache [2, num_blocks, block_size, Hkv, D], new tokens included) into out [T, H, D]."""
    if plan.num_tiles == 0:
        return
    _, _, block_size, hkv, d = kv_cache.shape
    assert q.shape[1] == hkv * plan.group and q.stride(-1) == 1 and out.stride(-1) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _prefill_kernel[(plan.num_tiles, hkv)](
        q, k_cache, v_cache, out, block_tables, plan.tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), scale * LOG2E,
        BLOCK_SIZE=block_size, GROUP=plan.group, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        IEEE=q.dtype == torch.float32, num_warps=plan.num_warps, num_stages=plan.num_stages)
