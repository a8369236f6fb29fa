"""CUDA graphs of the decode step, one per batch-size bucket: one replay instead of ~10
kernel launches per layer from Python.

Each graph reads its inputs from one static device buffer; a step writes its rows there
(padded up to the bucket) with a single host->device copy, replays, and reads the hidden
states back. The layout for bucket ``b`` (``M`` = block-table width for max_model_len,
``C = b // 2`` shared-prefix chunks of ``R`` rows)::

    buf : int64 [ ids b | positions b | slots b | seq_lens b | plan | block_tables b*M ]
    plan:       [ prefix_lens b | chunk_lens C | splits 1 | chunk_rows C*R ]

A bucket of 4 rows or more has a second graph with shared-prefix attention
(kernels/shared_prefix.py); a step whose rows share enough leading blocks replays it, with
the plan in the buffer's middle part (which the plain graph never reads).

Padding rows write no KV (slot -1 is skipped by the write kernel) and attend to one
token of block 0 (finite, unused). Only the Triton backend is captured: its launches
depend on no host value that changes per step.
"""

from __future__ import annotations

import logging
from operator import is_

import numpy as np
import torch

from pdserve.workers.attention import AttentionMetadata
from pdserve.workers.kernels.attention import TritonAttention
from pdserve.workers.kernels.paged_attention import num_splits_for
from pdserve.workers.kernels.shared_prefix import SharedPrefix, SharedPrefixPlanner, flat_plan
from pdserve.workers.model_runner import fill_block_tables
from pdserve.workers.models.decoder import CausalLM
from pdserve.workers.overlap import resolve_placeholders

logger = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    return [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], backend: TritonAttention,
                 block_size: int, max_model_len: int, max_batch: int, device: torch.device,
                 planner: SharedPrefixPlanner | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)
        self.planner = planner
        self.rows = planner.rows if planner is not None else 1  # R: rows per shared-prefix chunk
        self.sizes = sorted(set(buckets(max_batch)))
        self.max_batch = self.sizes[-1]
        self.buf = torch.zeros(self._size(self.max_batch), dtype=torch.int64, device=device)
        self.pinned = torch.empty(self.buf.numel(), dtype=torch.int64, pin_memory=True)
        self.copied = torch.cuda.Event()
        # What the pinned buffer's block-table rows hold: (bucket, table epoch, the rows'
        # table lists, their lengths, their shared-prefix plan). A step over the same rows
        # copies only new entries and keeps the plan (appended blocks are never shared).
        self._staged: tuple[int, int, list[list[int]], np.ndarray, tuple | None] | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.shared_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.shared_replays = 0  # replays with a shared-prefix plan
        c = model.config
        hkv, sms = c.num_key_value_heads, backend.num_sms
        pool = None
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
                ids, pos, slots, lens, plan_buf, tables = self._views(b)
                host = np.zeros(self._size(b), dtype=np.int64)  # no plan: chunks empty
                self._fill(host, b, [], [], [])
                self.buf[:self._size(b)].copy_(torch.from_numpy(host))
                plans = [None]
                if planner is not None and b >= 4:  # chunks are empty at capture: the replay fills them
                    plans.append(SharedPrefix.view(plan_buf, b, self._chunks(b), self.rows,
                                                   self._programs(b)))
                for plan in plans:
                    meta = AttentionMetadata(
                        slot_mapping=slots, query_start_loc=list(range(b + 1)), seq_lens=[1] * b,
                        num_prefills=0, block_tables=tables, block_size=block_size,
                        seq_lens_tensor=lens, gather_index=[], shared_prefix=plan,
                        decode_splits=num_splits_for(b, hkv, max_model_len, sms))
                    model(ids, pos, kv_caches, meta, backend)  # compiles the kernels outside capture
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        out = model(ids, pos, kv_caches, meta, backend)
                    pool = g.pool() if pool is None else pool
                    (self.graphs if plan is None else self.shared_graphs)[b] = (g, out)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s (shared-prefix: %s)",
                    self.sizes, sorted(self.shared_graphs))

    @staticmethod
    def _chunks(b: int) -> int:  # chunks have >= 2 rows: at most b // 2 of them
        return max(1, b // 2)

    def _programs(self, b: int) -> int:
        """The shared-prefix grid of bucket b: one program per chunk at least, and room for
        the splits that fill the GPU (the planner picks them within it)."""
        assert self.planner is not None
        return max(self._chunks(b), 2 * self.planner.lanes)

    def _plan_size(self, b: int) -> int:
        return SharedPrefix.size(b, self._chunks(b), self.rows)

    def _size(self, b: int) -> int:
        return b * (4 + self.width) + self._plan_size(b)

    def _views(self, b: int):
        buf = self.buf
        at = 4 * b + self._plan_size(b)
        return (buf[:b], buf[b:2 * b], buf[2 * b:3 * b], buf[3 * b:4 * b], buf[4 * b:at],
                buf[at:at + b * self.width].view(b, self.width))

    def _fill(self, host: np.ndarray, b: int, ids: list[int], pos: list[int],
              tables: list[list[int]], epoch: int | None = None) -> bool:
        """Write bucket ``b``'s inputs into ``host`` (its first ``_size(b)`` entries), vectorized:
        a slot is its row's block at ``pos // block_size``, a sequence length is ``pos + 1``.
        Returns whether the step has a shared-prefix plan (written with the inputs).

        Block tables: when ``host`` already holds this bucket's tables for the same rows (the
        same table lists, in order) and no table was rewritten in place since (``epoch``, the
        block manager's ``table_rewrites``), only the entries appended since are written: a
        row gains a block every ``block_size`` steps, so most steps write none. The plan
        stays too: appended blocks are each row's own."""
        n, bs = len(ids), self.block_size
        host[:b] = 0
        host[:n] = ids
        p = host[b:2 * b]
        p[n:] = 0
        p[:n] = pos
        t = host[4 * b + self._plan_size(b):self._size(b)].reshape(b, self.width)
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        last = self._staged
        if (epoch is not None and last is not None and last[0] == b and last[1] == epoch
                and len(last[2]) == n and all(map(is_, tables, last[2])) and (lens >= last[3]).all()):
            for i in np.flatnonzero(lens != last[3]).tolist():
                a = int(last[3][i])
                t[i, a:lens[i]] = tables[i][a:]
            plan = last[4]
        else:
            t.fill(0)
            fill_block_tables(t, tables, lens)
            plan = None
            if b in self.shared_graphs:
                assert self.planner is not None
                plan = self.planner.plan(t[:n], p[:n] // bs, bs, self._programs(b))
            if plan is not None:
                flat_plan(plan, b, self._chunks(b), host[4 * b:])
        self._staged = None if epoch is None else (b, epoch, tables, lens, plan)
        host[2 * b + n:3 * b] = -1
        host[2 * b:2 * b + n] = t[np.arange(n), p[:n] // bs] * bs + p[:n] % bs
        host[3 * b + n:4 * b] = 1
        host[3 * b:3 * b + n] = p[:n] + 1
        return plan is not None

    def fits(self, n: int) -> bool:
        return n <= self.max_batch

    def run(self, ids: list[int], pos: list[int], tables: list[list[int]],
            pending: torch.Tensor | None = None, table_epoch: int | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only batch of n <= max_batch rows: row i
        runs token ``ids[i]`` at position ``pos[i]`` over block table ``tables[i]``; a
        placeholder id reads its token from ``pending`` on the device (overlap.py).
        ``table_epoch``: see :meth:`_fill` (None: write every table in full)."""
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        size = self._size(b)
        self.copied.synchronize()  # the last step's copy may still read the pinned buffer
        staged = self.pinned[:size]
        shared = self._fill(staged.numpy(), b, ids, pos, tables, table_epoch)  # into the pinned buffer
        self.buf[:size].copy_(staged, non_blocking=True)
        self.copied.record()
        if pending is not None:
            resolve_placeholders(self.buf[:n], pending)
        self.shared_replays += shared
        g, out = (self.shared_graphs if shared else self.graphs)[b]
        g.replay()
        return out[:n]
