"""Runs one scheduled step: builds the flat batch, runs the model over the paged cache."""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import torch

from pdserve.workers.attention import AttentionBackend, AttentionMetadata, TorchAttention
from pdserve.workers.models.decoder import CausalLM
from pdserve.workers.overlap import resolve_placeholders
from pdserve.workers.quant import kv_head_width
from pdserve.workers.scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_bytes_per_block(model: CausalLM, block_size: int, kv_dtype: torch.dtype) -> int:
    c = model.config
    elem = torch.empty((), dtype=kv_dtype).element_size()
    width = kv_head_width(c.head_dim, kv_dtype)  # int8 rows carry their scale
    return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * width * elem


def fill_block_tables(out: np.ndarray, tables: list[list[int]], lens: np.ndarray | None = None) -> None:
    """Write each block table at the start of its row of ``out`` (zeroed: rows are padded
    with 0) in a few numpy calls rather than one per row. ``lens``: the tables' lengths,
    where the caller has them."""
    n, width = len(tables), out.shape[1]
    if lens is None:
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    out[:n][np.arange(width) < lens[:, None]] = flat


class ModelRunner:
    """Owns the model and the KV cache tensors; the only place that makes tensors per step."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int,
                 device: torch.device, kv_dtype: torch.dtype | None = None,
                 backend: AttentionBackend | None = None, max_model_len: int | None = None,
                 cuda_graphs: bool = False, max_num_seqs: int = 0,
                 shared_prefix_attention: bool = True) -> None:
        if device.type == "cuda":
            # One GEMM for q/k/v and one for gate/up: fewer, wider kernels (the CPU keeps
            # transformers' separate products, which its exactness tests compare against).
            model.fuse_projections()
        self.model = model
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        c = model.config
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        shape = (2, num_blocks, block_size, c.num_key_value_heads,
                 kv_head_width(c.head_dim, self.kv_dtype))
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=device)
                          for _ in range(c.num_hidden_layers)]
        self.backend = backend or TorchAttention()
        self._pinned: torch.Tensor | None = None  # staging buffer for the per-step inputs
        self._copied: torch.cuda.Event | None = None
        self.graphs = None  # DecodeGraphs: decode-only steps replay a captured graph
        self.planner = None  # SharedPrefixPlanner (kernels/shared_prefix.py); None: no plans
        self.shared_prefix_steps = 0  # eager steps that ran a shared-prefix plan
        triton_backend = False
        if device.type == "cuda":
            from pdserve.workers.kernels.attention import TritonAttention

            triton_backend = isinstance(self.backend, TritonAttention)
        if triton_backend and shared_prefix_attention:
            from pdserve.workers.kernels.shared_prefix import SharedPrefixPlanner

            self.planner = SharedPrefixPlanner.for_model(c.num_attention_heads, c.num_key_value_heads,
                                                         c.head_dim, self.backend.num_sms)
        if cuda_graphs and triton_backend and max_model_len and max_num_seqs:
            from pdserve.workers.decode_graphs import DecodeGraphs

            try:
                self.graphs = DecodeGraphs(model, self.kv_caches, self.backend, block_size,
                                           max_model_len, max_num_seqs, device, self.planner)
            except RuntimeError as e:  # a layer that syncs or reads host values: no graphs
                logger.warning("decode CUDA graphs disabled, capture failed: %s", e)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    @staticmethod
    def order(scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Multi-token chunks first, then single-token (decode) rows, as the metadata expects."""
        return ([s for s in scheduled if s.num_new_tokens > 1]
                + [s for s in scheduled if s.num_new_tokens == 1])

    def _stage(self, host: np.ndarray) -> torch.Tensor:
        """One host->device copy per step: through a reused pinned buffer, non-blocking."""
        n = host.size
        if self.device.type != "cuda":
            return torch.from_numpy(host)
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 2 * (0 if self._pinned is None else self._pinned.numel())),
                                       dtype=torch.int64, pin_memory=True)
        elif self._copied is not None:
            self._copied.synchronize()  # the last step's copy may still read the buffer
        buf = self._pinned[:n]
        buf.numpy()[:] = host
        dev = buf.to(self.device, non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        return dev

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat inputs of the batch; the last value holds the rows of the tokens that sample."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        nseq = len(batch)
        block_tables = [s.seq.block_table for s in batch]
        max_blocks = max(map(len, block_tables))
        tables = np.zeros((nseq, max_blocks), dtype=np.int64)
        fill_block_tables(tables, block_tables)
        num_prefills = 0
        for s in batch:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            table = seq.block_table
            if n == 1:  # decode rows: plain ints, no per-row arrays
                ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                num_prefills += 1
                ids.extend(seq.token_ids[start:start + n])
                p = np.arange(start, start + n)
                pos.extend(p.tolist())
                slots.extend((np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs).tolist())
            end = qsl[-1] + n
            qsl.append(end)
            seq_lens.append(start + n)
            if start + n == len(seq.token_ids):  # samples; a speculating one needs a row per draft plus one
                if seq.drafts:
                    sample_rows.extend(range(end - 1 - len(seq.drafts), end))
                else:
                    sample_rows.append(end - 1)
        t, ns = len(ids), len(sample_rows)
        nd = nseq - num_prefills
        plan = None
        if self.planner is not None and nd >= 2:  # the decode rows' positions are pos' last nd
            plan = self.planner.plan(tables[num_prefills:], np.asarray(pos[t - nd:], dtype=np.int64) // bs,
                                     bs)
        parts = [np.asarray(ids + pos + slots + seq_lens + sample_rows, dtype=np.int64), tables.ravel()]
        if plan is not None:
            from pdserve.workers.kernels.shared_prefix import SharedPrefix, flat_plan

            chunks = len(plan[2])
            parts.append(np.empty(SharedPrefix.size(nd, chunks, self.planner.rows), dtype=np.int64))
            flat_plan(plan, nd, chunks, parts[-1])
        dev = self._stage(np.concatenate(parts))
        o = 3 * t
        at = o + nseq + ns + tables.size
        meta = AttentionMetadata(
            slot_mapping=dev[2 * t:o],
            query_start_loc=qsl,
            seq_lens=seq_lens,
            num_prefills=num_prefills,
            block_tables=dev[o + nseq + ns:at].view(nseq, max_blocks),
            block_size=bs,
            seq_lens_tensor=dev[o:o + nseq],
        )
        if plan is not None:
            self.shared_prefix_steps += 1
            tails = np.asarray(seq_lens[num_prefills:], dtype=np.int64) - plan[0]
            meta.shared_prefix = SharedPrefix.view(dev[at:], nd, chunks, self.planner.rows,
                                                   chunks * plan[3], int(tails.max()))
        return dev[:t], dev[t:2 * t], meta, dev[o + nseq:o + nseq + ns]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, pending: torch.Tensor | None = None,
                as_float: bool = True) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run the step; returns the batch in run order and logits [n_sampling, vocab]
        (fp32, or the model's dtype if not ``as_float``) for the sequences that sample, in
        that order. ``pending``: the previous step's tokens on the device, which
        placeholder ids (overlap.py) stand for."""
        self.copy_blocks(out.block_copies)
        batch = self.order(out.scheduled)
        if self.graphs is not None and self.graphs.fits(len(batch)) and all(
                s.num_new_tokens == 1 and s.seq.num_computed_tokens + 1 == len(s.seq.token_ids)
                for s in batch):  # decode rows only (ScheduledSeq.samples, inlined)
            return batch, self.model.logits(self._run_graph(batch, pending, out.table_epoch), as_float)
        input_ids, positions, meta, rows = self.prepare(batch)
        if pending is not None:
            resolve_placeholders(input_ids, pending)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not rows.numel():
            return batch, torch.empty(0, self.model.config.vocab_size)
        logits = self.model.logits(hidden[rows], as_float)
        return batch, logits

    def _run_graph(self, batch: list[ScheduledSeq], pending: torch.Tensor | None,
                   table_epoch: int | None = None) -> torch.Tensor:
        seqs = [s.seq for s in batch]
        pos = [seq.num_computed_tokens for seq in seqs]
        ids = [seq.token_ids[p] for seq, p in zip(seqs, pos, strict=True)]
        assert self.graphs is not None
        return self.graphs.run(ids, pos, [seq.block_table for seq in seqs], pending, table_epoch)
