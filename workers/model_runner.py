"""Runs one scheduled step: builds the flat batch, runs the model over the paged cache."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pdserve.workers.attention import AttentionBackend, AttentionMetadata, TorchAttention
from pdserve.workers.models.decoder import CausalLM
from pdserve.workers.scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_bytes_per_block(model: CausalLM, block_size: int, kv_dtype: torch.dtype) -> int:
    c = model.config
    elem = torch.empty((), dtype=kv_dtype).element_size()
    return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * elem


class ModelRunner:
    """Owns the model and the KV cache tensors; the only place that makes tensors per step."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int,
                 device: torch.device, kv_dtype: torch.dtype | None = None,
                 backend: AttentionBackend | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        c = model.config
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        shape = (2, num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=device)
                          for _ in range(c.num_hidden_layers)]
        self.backend = backend or TorchAttention()

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

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        num_prefills = 0
        for i, s in enumerate(batch):
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            if n > 1:
                num_prefills += 1
            ids.extend(seq.token_ids[start:start + n])
            p = np.arange(start, start + n)
            pos.append(p)
            table = np.asarray(seq.block_table, dtype=np.int64)
            tables[i, :len(table)] = table
            slots.append(table[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if s.samples:
                sample_rows.append(qsl[-1] - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos)).to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            query_start_loc=qsl,
            seq_lens=seq_lens,
            num_prefills=num_prefills,
            block_tables=torch.from_numpy(tables).to(dev),
            block_size=bs,
        )
        return input_ids, positions, meta, sample_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run the step; returns the batch in run order and logits [n_sampling, vocab] (fp32)
        for the sequences that sample, in that order."""
        self.copy_blocks(out.block_copies)
        batch = self.order(out.scheduled)
        input_ids, positions, meta, rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not rows:
            return batch, torch.empty(0, self.model.config.vocab_size)
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
        return batch, logits
