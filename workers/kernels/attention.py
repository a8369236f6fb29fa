"""The Triton attention backend: Triton KV write, paged prefill/extend and paged decode."""

from __future__ import annotations

import torch

from pdserve.workers.attention import AttentionMetadata
from pdserve.workers.kernels.paged_attention import decode_attention, num_splits_for, write_kv
from pdserve.workers.kernels.prefill_attention import plan_prefill, prefill_attention


class TritonAttention:
    """Same interface and results as :class:`~pdserve.workers.attention.TorchAttention`.

    The new K/V go into the cache first; then the multi-token rows (prompts, chunks, prefix
    hits, verification rows) run the prefill kernel and the decode rows (one query token
    each) the split-KV decode kernel, both straight over the block table; decode rows that
    share leading blocks read them once per chunk when the metadata carries a plan. Their
    schedules come from the metadata's host lists, once per step for all layers; nothing
    here reads a device value on the host.
    """

    def __init__(self, device: torch.device) -> None:
        # The SM count sizes the decode splits; off CUDA (the Triton interpreter) any will do.
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)

    def _prepare(self, meta: AttentionMetadata, q: torch.Tensor, num_kv_heads: int) -> None:
        if meta.num_prefills and meta.prefill_plan is None:
            meta.prefill_plan = plan_prefill(meta.query_start_loc, meta.seq_lens,
                                             meta.num_prefills, q.shape[1] // num_kv_heads,
                                             q.shape[2], q.dtype, q.device)
        nd = meta.num_seqs - meta.num_prefills
        if nd and meta.decode_splits is None:
            sp = meta.shared_prefix
            max_len = sp.max_tail if sp is not None else max(meta.seq_lens[meta.num_prefills:])
            meta.decode_splits = num_splits_for(nd, num_kv_heads, max_len, self.num_sms)
            if meta.seq_lens_tensor is None:
                meta.seq_lens_tensor = torch.tensor(meta.seq_lens, dtype=torch.int32,
                                                    device=q.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        self._prepare(meta, q, kv_cache.shape[3])
        out = torch.empty_like(q)
        if meta.num_prefills:
            assert meta.prefill_plan is not None
            prefill_attention(q, kv_cache, meta.block_tables, meta.prefill_plan, scale, out)
        if meta.decode_splits is not None and meta.num_seqs > meta.num_prefills:
            p = meta.num_prefills
            s = meta.query_start_loc[p]
            assert meta.seq_lens_tensor is not None
            decode_attention(q[s:], kv_cache, meta.block_tables[p:], meta.seq_lens_tensor[p:],
                             scale, meta.decode_splits, out=out[s:], shared=meta.shared_prefix)
        return out
