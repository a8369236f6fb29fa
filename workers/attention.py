"""Attention over the paged KV cache: the per-step metadata and the PyTorch reference path.

KV cache layout of one layer (block ids never move; a token's slot is
``block_id * block_size + offset``)::

    kv_cache[layer] : [2, num_blocks, block_size, num_kv_heads, head_dim]
                       ^ 0 = K, 1 = V

The reference path runs on CPU and GPU; faster kernels implement the same
:class:`AttentionBackend` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer's attention needs for one step (built once by the runner).

    Sequences are laid out prefills first, then decodes (one query token each).
    """

    slot_mapping: torch.Tensor  # [T] slot of each new token
    query_start_loc: list[int]  # [B+1] offsets of each sequence's queries in the flat batch
    seq_lens: list[int]  # [B] KV length of each sequence after this step
    num_prefills: int  # the first num_prefills sequences have > 1 query token (or are prompts)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    block_size: int
    # Reference path helpers (built lazily by the backend, cached for all layers).
    gather_index: list[torch.Tensor] | None = None
    decode_index: torch.Tensor | None = None  # [Bd, max_len] slots, padded
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_len] bool

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] (new tokens). Writes k, v into the cache and
        returns the attention output [T, H, D]."""
        ...


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _, nb, bs, hkv, d = kv_cache.shape
    flat = kv_cache.view(2, nb * bs, hkv, d)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


class TorchAttention:
    """Reference attention: gathers each sequence's KV from its blocks and runs SDPA."""

    def _prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        if meta.gather_index is not None:
            return
        bs = meta.block_size
        tables = meta.block_tables
        meta.gather_index = []
        for i in range(meta.num_prefills):
            pos = torch.arange(meta.seq_lens[i], device=device)
            meta.gather_index.append(tables[i, pos // bs].long() * bs + pos % bs)
        nd = meta.num_seqs - meta.num_prefills
        if nd:
            lens = torch.tensor(meta.seq_lens[meta.num_prefills:], device=device)
            max_len = int(lens.max())
            pos = torch.arange(max_len, device=device)
            t = tables[meta.num_prefills:]
            blk = t.gather(1, (pos // bs).clamp(max=t.shape[1] - 1).expand(nd, -1).long())
            meta.decode_index = blk.long() * bs + pos % bs
            meta.decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        self._prepare(meta, q.device)
        _, nb, bs, hkv, d = kv_cache.shape
        flat_k = kv_cache[0].view(nb * bs, hkv, d)
        flat_v = kv_cache[1].view(nb * bs, hkv, d)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc
        assert meta.gather_index is not None
        for i in range(meta.num_prefills):
            s, e = qsl[i], qsl[i + 1]
            n_q, n_kv = e - s, meta.seq_lens[i]
            idx = meta.gather_index[i]
            kk = flat_k[idx].to(q.dtype).transpose(0, 1)  # [Hkv, L, D]
            vv = flat_v[idx].to(q.dtype).transpose(0, 1)
            qq = q[s:e].transpose(0, 1)  # [H, n_q, D]
            if n_q == n_kv:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                   enable_gqa=True)
            else:
                qpos = torch.arange(n_kv - n_q, n_kv, device=q.device)
                mask = torch.arange(n_kv, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            out[s:e] = o.transpose(0, 1)
        if meta.decode_index is not None:
            s = qsl[meta.num_prefills]
            idx = meta.decode_index  # [Bd, L]
            kk = flat_k[idx].to(q.dtype).permute(0, 2, 1, 3)  # [Bd, Hkv, L, D]
            vv = flat_v[idx].to(q.dtype).permute(0, 2, 1, 3)
            qq = q[s:].unsqueeze(2)  # [Bd, H, 1, D]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask,
                                               scale=scale, enable_gqa=True)
            out[s:] = o.squeeze(2)
        return out
