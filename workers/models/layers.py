"""Building blocks shared by the decoder models: RMSNorm, rotary embedding, MLP.

On CUDA, where triton imports, the norms, the rotary embedding and the MLP's activation run
fused Triton kernels (:mod:`pdserve.workers.kernels.fused`) with the same math; elsewhere,
the PyTorch ops below, which the exactness tests hold to transformers token for token.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _fused_module() -> ModuleType | None:
    """The fused kernels, or None where triton does not import (tried once per process)."""
    try:
        from pdserve.workers.kernels import fused
    except ImportError:
        return None
    return fused


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The fused kernels for a tensor on CUDA; None elsewhere (triton is not even imported)."""
    return _fused_module() if x.is_cuda else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize in float32, back to the input dtype, then scale (as transformers does)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): a skip connection folded into the next norm."""
        ops = fused_ops(x)
        if ops is not None and x.dtype == residual.dtype:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return rms_norm(residual, self.weight, self.eps), residual


def fuse_linears(*linears: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight [sum(out), in] (and bias) for linears that read the same input, so one
    GEMM replaces several. Each linear's parameters become views into the fused tensors:
    names, ``state_dict()`` and memory stay as they were. None when the linears cannot share
    a GEMM (quantized, or differing dtype, device or bias)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    ws = [m.weight for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat(ws)
        bias = None if biases[0] is None else torch.cat(biases)
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` of q and k (the fused kernel rotates them in place)."""
    ops = fused_ops(q)
    if ops is not None and q.dtype == k.dtype == cos.dtype == sin.dtype:
        return ops.rotary(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # fused weight, see fuse()

    def fuse(self) -> None:
        fused = fuse_linears(self.gate_proj, self.up_proj)
        if fused is not None:
            self.gate_up = fused[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gu = F.linear(x, self.gate_up)
            ops = fused_ops(gu)
            if ops is not None:
                return self.down_proj(ops.silu_mul_halves(gu))
            gate, up = gu.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        gate, up = self.gate_proj(x), self.up_proj(x)
        ops = fused_ops(gate)
        if ops is not None and gate.dtype == up.dtype:
            return self.down_proj(ops.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)
