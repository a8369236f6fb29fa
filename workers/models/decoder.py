"""A Llama-style decoder (Llama, Qwen2, Qwen3) whose attention runs over paged KV blocks.

Module and parameter names follow the Hugging Face checkpoints so that
safetensors weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.workers.attention import AttentionBackend, AttentionMetadata
from pdserve.workers.models.config import ModelConfig
from pdserve.workers.models.layers import (
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    fuse_linears,
    rotate_qk,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse()

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one GEMM; q, k, v are column slices of its output (the kernels take strides)
            nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.qkv).split((nq, nk, nk), dim=-1)
        return (q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim),
                v.view(t, self.num_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self._project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(q, k, cos, sin)
        o = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta, backend):
        """x: the last layer's output, not yet added to the skip stream ``residual`` (the
        first layer: the embeddings, residual None). Each add runs inside the next norm,
        fused on the GPU. Returns (this layer's output, the skip stream)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


class CausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 for causal LM over a flat batch of tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (call :meth:`logits` on the rows needed)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, cache, meta, backend)
        if residual is None:
            return self.model.norm(x)
        return self.model.norm.add_forward(x, residual)[0]

    def fuse_projections(self) -> None:
        """Run q/k/v as one GEMM and gate/up as one in every layer (idempotent; quantized
        projections stay as they are). Call it last: the fused weights are not parameters,
        so a later ``.to()`` would not move them."""
        for layer in self.model.layers:
            if layer.self_attn.qkv is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up is None:
                layer.mlp.fuse()

    def logits(self, hidden: torch.Tensor, as_float: bool = True) -> torch.Tensor:
        """``as_float=False``: in the model's dtype (a greedy argmax needs no fp32 copy)."""
        out = self.lm_head(hidden)
        return out.float() if as_float else out
