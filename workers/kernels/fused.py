"""Fused elementwise kernels (Triton) for the decoder: RMSNorm with the residual add,
rotary embedding of q and k in place, SiLU-and-multiply of the gated MLP.

Each one reads and writes its tensors once instead of once per PyTorch op. The math follows
:mod:`pdserve.workers.models.layers` step by step, rounding to the tensor dtype wherever
PyTorch's eager ops round, so results match the reference up to the reductions' order and
the device's exp / rsqrt (the rotary embedding, which has neither, matches bit for bit).
No launch depends on a device value: the decoder stays CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.workers.kernels.launch import fast


@fast
@triton.jit
def _rms_norm_kernel(X, Res, W, Y, ResOut, n_rows, stride_x, stride_r, stride_y, stride_ro, eps,
                     N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                     ADD: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    c_mask = cols < N
    mask = (rows < n_rows)[:, None] & c_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if ADD:  # residual + x, rounded to the dtype like the eager add
        r = tl.load(Res + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ResOut + rows[:, None] * stride_ro + cols[None, :], x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 1) / N + eps)[:, None]
    w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    y = w[None, :] * h.to(X.dtype.element_ty).to(tl.float32)  # normed in the input dtype, then * w
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride in the last dimension (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    y2 = y.view(-1, n)
    ro2 = y2 if res_out is None else res_out.view(-1, n)
    block_n = triton.next_power_of_2(n)
    rows_per = max(1, min(16, 4096 // block_n))  # ~4K elements a program: norms of heads batch up
    n_rows = x2.shape[0]
    if n_rows:
        _rms_norm_kernel[(triton.cdiv(n_rows, rows_per),)](
            x2, x2 if r2 is None else r2, weight, y2, ro2, n_rows, x2.stride(0),
            0 if r2 is None else r2.stride(0), y2.stride(0), ro2.stride(0), eps,
            N=n, BLOCK_N=block_n, ROWS=rows_per, ADD=residual is not None,
            num_warps=8 if rows_per * block_n >= 8192 else 4)
    return y, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`~pdserve.workers.models.layers.RMSNorm` over the last dimension of x."""
    return _rms_norm(x, weight, eps, None)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x) in one pass; x and residual share a dtype."""
    y, res = _rms_norm(x, weight, eps, residual)
    assert res is not None
    return y, res


@triton.jit
def _rotate_heads(X, t, stride_t, stride_h, c1, c2, s1, s2, offs, d_mask,
                  HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # x * cos + rotate_half(x) * sin, each product rounded to the dtype as the eager ops do.
    dt = X.dtype.element_ty
    for h0 in tl.static_range(0, HEADS, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < HEADS)[:, None] & d_mask[None, :]
        p1 = X + t * stride_t + heads[:, None] * stride_h + offs[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(p1, o1.to(dt), mask=mask)
        tl.store(p1 + HALF, o2.to(dt), mask=mask)


@fast
@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                   stride_st, HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    c1 = tl.load(Cos + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(Cos + t * stride_ct + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(Sin + t * stride_st + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(Sin + t * stride_st + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, t, stride_qt, stride_qh, c1, c2, s1, s2, offs, d_mask, HQ, HALF, BLOCK_HQ)
    _rotate_heads(K, t, stride_kt, stride_kh, c1, c2, s1, s2, offs, d_mask, HK, HALF, BLOCK_HK)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~pdserve.workers.models.layers.apply_rotary` of q [T, H, D] and k [T, Hkv, D]
    with cos/sin [T, D] (the dtype of q), in place where the last dimension is contiguous."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    t, hq, d = q.shape
    if t == 0:
        return q, k
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    half = d // 2
    block_half = triton.next_power_of_2(half)
    # About 2K elements a step: all heads of a small model at once.
    heads_per = max(1, 2048 // block_half)
    _rotary_kernel[(t,)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        sin.stride(0), HQ=hq, HK=k.shape[1], HALF=half, BLOCK_HALF=block_half,
        BLOCK_HQ=min(triton.next_power_of_2(hq), heads_per),
        BLOCK_HK=min(triton.next_power_of_2(k.shape[1]), heads_per),
        num_warps=4, enable_fp_fusion=False)  # no fma: the eager ops round each product
    return q, k


@fast
@triton.jit
def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0)
    a = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty)  # F.silu's formula, rounded like its output
    tl.store(Y + offs, (a.to(tl.float32) * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass (same shape and dtype)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 2048
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=8)
    return out


@fast
@triton.jit
def _silu_mul_halves_kernel(X, Y, inter, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + offs, mask=mask, other=0.0)
    a = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty)
    tl.store(Y + row * stride_y + offs, (a.to(tl.float32) * u.to(tl.float32)).to(Y.dtype.element_ty),
             mask=mask)


def silu_mul_halves(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul` of the two halves of the last dimension of ``gate_up`` [T, 2 * I]
    (the fused gate/up projection's output), read in place."""
    x = _rows(gate_up)
    inter = x.shape[1] // 2
    out = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
    if x.shape[0] and inter:
        block = min(2048, triton.next_power_of_2(inter))
        _silu_mul_halves_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], inter)
