"""Shared-prefix (cascade) decode attention: decode rows whose block tables begin with the same
blocks (prefix-cache hits on one system prompt, forks of one prompt) read those blocks once
per group of rows instead of once per row.

The plan, made on the host from the step's block tables, puts rows that share their leading
blocks into chunks of at most ``ROWS`` rows. One program per (chunk, split, KV head) attends
every query head of every row of its chunk over the shared blocks at once; the query tile is
``ROWS x GROUP`` rows, so the shared K/V, read once, feeds a real matrix product::

    rows r0..r15 of a chunk, one KV head:
      Q [r x group, D]  x  K_shared^T [D, BLOCK_N]  -> online softmax -> partial O, LSE
    each row then attends its own tail [prefix_len, seq_len) in the split-KV decode kernel,
    and the merge combines the tail's splits with the chunk's by log-sum-exp.

The partials go into the same buffers as the decode kernel's splits, in slots after its own,
so one merge launch combines them. Everything the launch reads that changes per step is on
the device: a CUDA graph captures it with empty chunks and replays it with any plan. The
chunk programs run in the decode kernel's own launch, ahead of its per-row programs, so
the long shared reads and the short tails overlap on the GPU; they are numbered by
(chunk, split) pairs, so a graph's fixed grid (sized for its bucket) idles few programs
whatever the plan's split count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# A plan is used only when it saves at least this many K/V token reads per layer: below it,
# the extra launch costs more than the re-reads (and L2 absorbs many of them).
MIN_SAVED_TOKENS = 8192
# ... and at least this part of all the rows' reads (below it, measured on an H100, the
# partial outputs a chunk writes and merges cost about what it saves)
MIN_SAVED_FRACTION = 0.5
QUERY_TILE = 8192  # elements (rows x heads per KV head x head dim) of a program's query tile
MAX_SPLITS = 16  # splits of a chunk's shared length, at most (merge slots)


def rows_per_chunk(group: int, head_dim: int) -> int:
    """How many sequences share one program: a ``QUERY_TILE`` query tile at most (1: the
    query group alone fills it, no plan)."""
    per_row = triton.next_power_of_2(group) * triton.next_power_of_2(max(head_dim, 16))
    return max(1, min(32, QUERY_TILE // per_row))


@dataclass(slots=True)
class SharedPrefix:
    """One step's plan on the device, for the decode rows of the batch (their own indexing).

    ``prefix_lens[i]``: tokens of row i that its chunk reads (0: the row is in no chunk);
    ``chunk_rows[c]``: the rows of chunk c, padded with -1; ``chunk_lens[c]``: its shared
    tokens (0: an unused chunk, its programs return at once); ``splits[0]``: how many
    programs per (chunk, KV head) share a chunk's length (at most ``MAX_SPLITS``).
    ``programs``: the grid's (chunk, split) pairs, at least chunks x splits; ``max_tail``:
    the longest row tail, for the decode kernel's own split count (host values; a CUDA
    graph fixes both instead)."""

    prefix_lens: torch.Tensor
    chunk_rows: torch.Tensor
    chunk_lens: torch.Tensor
    splits: torch.Tensor
    programs: int
    max_tail: int = 0

    @staticmethod
    def size(rows: int, chunks: int, stride: int) -> int:
        """Entries of a plan's flat int64 layout: [prefix rows | chunk_lens | splits | chunk_rows]."""
        return rows + chunks + 1 + chunks * stride

    @classmethod
    def view(cls, flat: torch.Tensor, rows: int, chunks: int, stride: int, programs: int,
             max_tail: int = 0) -> SharedPrefix:
        """The plan over a flat buffer in :meth:`size`'s layout (``stride`` rows per chunk)."""
        a, b = rows + chunks, rows + chunks + 1
        return cls(flat[:rows], flat[b:b + chunks * stride].view(chunks, stride), flat[rows:a],
                   flat[a:b], programs, max_tail)


@dataclass(frozen=True)
class SharedPrefixPlanner:
    """One engine's planning parameters: rows per chunk (from its model's query group and
    head size), SMs per KV head (``lanes``) and the thresholds of :func:`plan_shared_prefix`."""

    rows: int
    lanes: int
    min_saved: int = MIN_SAVED_TOKENS
    min_fraction: float = MIN_SAVED_FRACTION

    @classmethod
    def for_model(cls, num_heads: int, num_kv_heads: int, head_dim: int,
                  num_sms: int) -> SharedPrefixPlanner | None:
        """None where a query group alone fills a program's tile: nothing to share."""
        rows = rows_per_chunk(num_heads // num_kv_heads, head_dim)
        return cls(rows, max(1, num_sms // num_kv_heads)) if rows >= 2 else None

    def plan(self, tables: np.ndarray, last_block: np.ndarray, block_size: int,
             max_programs: int | None = None):
        return plan_shared_prefix(tables, last_block, block_size, self.rows, self.min_saved,
                                  self.lanes, self.min_fraction, max_programs)


def flat_plan(plan: tuple, rows: int, chunks: int, out: np.ndarray) -> None:
    """Write ``plan_shared_prefix``'s result into ``out`` in :meth:`SharedPrefix.size`'s layout
    for ``rows`` rows and ``chunks`` chunks (the padding: no prefix, empty chunks)."""
    prefix, chunk_rows, chunk_lens, splits = plan
    stride = chunk_rows.shape[1]
    out[:SharedPrefix.size(rows, chunks, stride)] = 0
    out[:len(prefix)] = prefix
    out[rows:rows + len(chunk_lens)] = chunk_lens
    out[rows + chunks] = splits
    at = rows + chunks + 1
    out[at:at + chunks * stride] = -1
    out[at:at + chunk_rows.size] = chunk_rows.ravel()


def plan_shared_prefix(tables: np.ndarray, last_block: np.ndarray, block_size: int, rows: int,
                       min_saved: int = MIN_SAVED_TOKENS, lanes: int = 64,
                       min_fraction: float = MIN_SAVED_FRACTION, max_programs: int | None = None):
    """Group decode rows by shared leading blocks.

    tables: [n, W] block ids; last_block[i]: the index (in row i's table) of the block that
    takes row i's new token. Only blocks before it can be shared: that one is the row's own
    (a write into a shared block copies it first). Rows are grouped by their first block and
    a group shares the longest prefix common to all its rows (two levels, as FlashInfer's
    cascade; rows sharing more among themselves than with their group read the rest in
    their tails).

    A plan must save ``min_saved`` token reads and ``min_fraction`` of all the rows' reads:
    a chunk writes partial outputs for all its query rows per split, which pays only where
    it replaces many reads. Splits: enough (chunk, split) programs to fill ``lanes`` (SMs per
    KV head), each over >= 256 shared tokens, and no more programs than ``max_programs`` (a
    graph's grid; it holds one per chunk at least). Returns ``(prefix_lens [n], chunk_rows [C,
    rows], chunk_lens [C], splits)`` (int64 arrays and an int), or None."""
    n = len(tables)
    if n < 2 or rows < 2:
        return None
    first = tables[:, 0]
    order = np.argsort(first, kind="stable")
    sf = first[order]
    cut = np.flatnonzero(sf[1:] != sf[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [n]))
    groups = np.flatnonzero(ends - starts >= 2)
    if not len(groups):
        return None
    prefix = np.zeros(n, dtype=np.int64)
    members: list[np.ndarray] = []
    shared: list[int] = []
    saved = 0
    for gi in groups.tolist():
        g = order[starts[gi]:ends[gi]]
        cap = int(last_block[g].min())
        if cap == 0:
            continue
        same = (tables[g, :cap] == tables[g[0], :cap]).all(0)
        k = cap if same.all() else int(same.argmin())
        for c in range(0, len(g), rows):
            part = g[c:c + rows]
            if len(part) >= 2:
                members.append(part)
                shared.append(k * block_size)
                prefix[part] = k * block_size
                saved += (len(part) - 1) * k * block_size
    if not members or saved < max(min_saved, min_fraction * (int(last_block.sum()) + n) * block_size):
        return None
    chunk_rows = np.full((len(members), rows), -1, dtype=np.int64)
    for c, part in enumerate(members):
        chunk_rows[c, :len(part)] = part
    want = triton.next_power_of_2(-(-lanes // len(members)))
    splits = max(1, min(want, max(shared) // 256, MAX_SPLITS,
                        (max_programs or MAX_SPLITS * len(members)) // len(members)))
    return prefix, chunk_rows, np.asarray(shared, dtype=np.int64), splits


@triton.jit
def chunk_program(pid, kvh, Q, KCache, VCache, BlockTables, ChunkRows, ChunkLens, Splits, MidO,
                  MidLse, stride_qb, stride_qh, stride_cs, stride_ch, stride_bt,
                  stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                  sm_scale_log2, first_slot, num_chunks,
                  BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                  ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One (chunk, split) program of the decode kernel (paged_attention.py): its rows' query
    heads for one KV head over the split's share of the chunk's shared tokens."""
    splits = tl.load(Splits)
    c = pid // splits
    split = pid % splits
    shared = tl.load(ChunkLens + c, mask=c < num_chunks, other=0)  # past the plan: idle
    if shared > 0:
        per_split = tl.cdiv(tl.cdiv(shared, splits), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, shared)

        offs_m = tl.arange(0, ROWS * BLOCK_H)  # query row m: sequence m // BLOCK_H, head m % BLOCK_H
        row = tl.load(ChunkRows + c * ROWS + offs_m // BLOCK_H)
        h = offs_m % BLOCK_H
        m_mask = (row >= 0) & (h < GROUP)
        row = tl.maximum(row, 0).to(tl.int64)
        heads = kvh * GROUP + h
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(Q + row[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        # the shared blocks are the same in every row's table: read the chunk's first row's
        table = BlockTables + tl.load(ChunkRows + c * ROWS).to(tl.int64) * stride_bt
        acc, m_i, l_i = attend(q, KCache, VCache, table, start, end, kvh * stride_ch, stride_cs,
                               sm_scale_log2, ROWS * BLOCK_H, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                               BLOCK_N, IEEE)
        has = l_i > 0.0  # an empty split: LSE -inf, the merge skips it
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        at = first_slot + split
        tl.store(MidO + row[:, None] * stride_mb + heads[:, None] * stride_mh + at * stride_ms
                 + offs_d[None, :], out, mask=m_mask[:, None] & d_mask[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + row * stride_lb + heads * stride_lh + at, lse, mask=m_mask)


@triton.jit
def attend(q, KCache, VCache, table, start, end, head_off, stride_cs, sm_scale_log2,
           M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of the query tile q [M, BLOCK_D] over tokens [start, end) of one
    block table and KV head: the unnormalized output, the running max and sum (log2)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        blk = tl.load(table + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_cs + head_off + offs_d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(p_mask[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VCache + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i
