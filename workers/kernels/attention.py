"""The Triton attention backend: Triton KV write and paged decode, SDPA for prompt chunks."""

from __future__ import annotations

import torch

from pdserve.workers.attention import AttentionMetadata, prefill_attention
from pdserve.workers.kernels.paged_attention import decode_attention, num_splits_for, write_kv


class TritonAttention:
    """Same interface and results as :class:`~pdserve.workers.attention.TorchAttention`.

    Decode rows (one query token each) run the split-KV Triton kernel straight over the
    block table. Multi-token rows run SDPA: over the new k, v when the sequence has no
    earlier KV (a whole prompt), else over its KV gathered from the blocks.
    Nothing here reads a device value on the host.
    """

    def __init__(self, device: torch.device) -> None:
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def _prepare(self, meta: AttentionMetadata, device: torch.device, num_kv_heads: int) -> None:
        if meta.gather_index is not None:
            return
        bs = meta.block_size
        qsl = meta.query_start_loc
        meta.gather_index = []
        for i in range(meta.num_prefills):
            n_kv = meta.seq_lens[i]
            if qsl[i + 1] - qsl[i] == n_kv:
                meta.gather_index.append(None)
                continue
            pos = torch.arange(n_kv, device=device)
            meta.gather_index.append(meta.block_tables[i, pos // bs].long() * bs + pos % bs)
        nd = meta.num_seqs - meta.num_prefills
        if nd:
            max_len = max(meta.seq_lens[meta.num_prefills:])
            meta.decode_splits = num_splits_for(nd, num_kv_heads, max_len, self.num_sms)
            if meta.seq_lens_tensor is None:
                meta.seq_lens_tensor = torch.tensor(meta.seq_lens, dtype=torch.int32, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        self._prepare(meta, q.device, kv_cache.shape[3])
        out = torch.empty_like(q)
        assert meta.gather_index is not None
        prefill_attention(q, k, v, kv_cache, meta, scale, out, meta.gather_index)
        if meta.decode_splits is not None:
            p = meta.num_prefills
            s = meta.query_start_loc[p]
            assert meta.seq_lens_tensor is not None
            decode_attention(q[s:], kv_cache, meta.block_tables[p:], meta.seq_lens_tensor[p:],
                             scale, meta.decode_splits, out=out[s:])
        return out
