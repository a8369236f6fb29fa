"""Attention over the paged KV cache: the per-step metadata and the PyTorch reference path.

KV cache layout of one layer (block ids never move; a token's slot is
``block_id * block_size + offset``)::

    kv_cache[layer] : [2, num_blocks, block_size, num_kv_heads, head_dim]
                       ^ 0 = K, 1 = V

An int8 cache (``kv_cache_dtype="int8"``) has ``head_dim + 4`` there: each row's float32
scale rides in its last 4 bytes (see :mod:`pdserve.workers.quant`); only the reference path
reads it.

The reference path runs on CPU and GPU; faster kernels implement the same
:class:`AttentionBackend` interface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from pdserve.workers.quant import KV_INT8, dequantize_kv, quantize_kv

if TYPE_CHECKING:  # no triton import at run time: the module also serves CPU-only installs
    from pdserve.workers.kernels.prefill_attention import PrefillPlan
    from pdserve.workers.kernels.shared_prefix import SharedPrefix

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer's attention needs for one step (built once by the runner).

    Sequences are laid out prefills first, then decodes (one query token each).
    """

    slot_mapping: torch.Tensor  # [T] slot of each new token
    query_start_loc: list[int]  # [B+1] offsets of each sequence's queries in the flat batch
    seq_lens: list[int]  # [B] KV length of each sequence after this step
    num_prefills: int  # the first num_prefills sequences have > 1 query token (or are prompts)
    block_tables: torch.Tensor  # [B, max_blocks] int, padded with 0
    block_size: int
    seq_lens_tensor: torch.Tensor | None = None  # [B] int on the device (kernels read it there)
    # Reference path helpers (built lazily by the backend, cached for all layers).
    gather_index: list[torch.Tensor | None] | None = None
    decode_index: torch.Tensor | None = None  # [Bd, max_len] slots, padded
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_len] bool
    decode_splits: int | None = None  # split-KV count of the Triton decode kernel
    prefill_plan: PrefillPlan | None = None  # tile schedule of the Triton prefill kernel
    # decode rows sharing leading blocks, read once per chunk (kernels/shared_prefix.py)
    shared_prefix: SharedPrefix | None = None

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
    flat[0].index_copy_(0, slot_mapping, to_cache(k, kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, to_cache(v, kv_cache.dtype))


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """New k or v [T, Hkv, D] as the cache stores them (int8 rows carry their scale)."""
    return quantize_kv(x) if cache_dtype == KV_INT8 else x.to(cache_dtype)


def read_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., Hkv, width] as ``dtype`` values [..., Hkv, D]."""
    return dequantize_kv(rows, dtype) if rows.dtype == KV_INT8 else rows.to(dtype)


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
            host_lens = meta.seq_lens[meta.num_prefills:]
            lens = (meta.seq_lens_tensor[meta.num_prefills:] if meta.seq_lens_tensor is not None
                    else torch.tensor(host_lens, device=device))
            max_len = max(host_lens)  # from the host list: no device sync
            pos = torch.arange(max_len, device=device)
            t = tables[meta.num_prefills:]
            blk = t.gather(1, (pos // bs).clamp(max=t.shape[1] - 1).expand(nd, -1).long())
            meta.decode_index = blk.long() * bs + pos % bs
            meta.decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        self._prepare(meta, q.device)
        out = torch.empty_like(q)
        assert meta.gather_index is not None
        prefill_attention(q, k, v, kv_cache, meta, scale, out, meta.gather_index)
        if meta.decode_index is not None:
            _, nb, bs, hkv, d = kv_cache.shape
            flat_k = kv_cache[0].view(nb * bs, hkv, d)
            flat_v = kv_cache[1].view(nb * bs, hkv, d)
            s = meta.query_start_loc[meta.num_prefills]
            idx = meta.decode_index  # [Bd, L]
            kk = read_kv(flat_k[idx], q.dtype).permute(0, 2, 1, 3)  # [Bd, Hkv, L, D]
            vv = read_kv(flat_v[idx], q.dtype).permute(0, 2, 1, 3)
            qq = q[s:].unsqueeze(2)  # [Bd, H, 1, D]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask,
                                               scale=scale, enable_gqa=True)
            out[s:] = o.squeeze(2)
        return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, out: torch.Tensor,
                      gather_index: list[torch.Tensor | None]) -> None:
    """Causal SDPA for the multi-token rows into ``out``. A sequence whose gather index is
    None has no earlier KV: it attends over its new k, v directly (no gather from the cache)."""
    _, nb, bs, hkv, d = kv_cache.shape
    flat_k = kv_cache[0].view(nb * bs, hkv, d)
    flat_v = kv_cache[1].view(nb * bs, hkv, d)
    qsl = meta.query_start_loc
    for i in range(meta.num_prefills):
        s, e = qsl[i], qsl[i + 1]
        n_q, n_kv = e - s, meta.seq_lens[i]
        idx = gather_index[i]
        if idx is None:
            kk = read_kv(to_cache(k[s:e], kv_cache.dtype), q.dtype).transpose(0, 1)
            vv = read_kv(to_cache(v[s:e], kv_cache.dtype), q.dtype).transpose(0, 1)
        else:
            kk = read_kv(flat_k[idx], q.dtype).transpose(0, 1)  # [Hkv, L, D]
            vv = read_kv(flat_v[idx], q.dtype).transpose(0, 1)
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


def make_attention_backend(name: str, device: torch.device,
                           kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """``"torch"``: the reference; ``"triton"``: the Triton kernels (CUDA, float KV cache);
    ``"auto"``: Triton where it applies and imports, else the reference."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend {name!r} not one of auto, torch, triton")
    if name == "triton" and (device.type != "cuda" or kv_dtype == KV_INT8):
        raise ValueError("attention_backend 'triton' needs a CUDA device and a float KV cache")
    if name == "torch" or device.type != "cuda" or kv_dtype == KV_INT8:
        return TorchAttention()
    try:
        from pdserve.workers.kernels.attention import TritonAttention
    except ImportError:
        if name == "triton":
            raise
        logger.warning("triton is not importable: using the torch attention backend")
        return TorchAttention()
    return TritonAttention(device)
