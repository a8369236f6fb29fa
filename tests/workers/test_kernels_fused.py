"""The fused Triton kernels (workers/kernels/fused.py) against the layers they replace.

On a CUDA GPU; test_kernels_interp.py runs this file again on CPU under the Triton
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 16-bit: two units in the last place (a sum in another order, or an exp / rsqrt an ulp off,
# may move the rounded value by one step and the product after it by one more). float32:
# those differences before any rounding (a 4096-term sum, exp of an argument up to ~16).
RTOL = {torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9, torch.float32: 1e-5}


def skip_interpreted_bf16(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter rounds float32 -> bfloat16 toward zero")


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=RTOL[ref.dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (37, 896), (5, 4096), (9, 100), (6, 14, 128)])
@pytest.mark.parametrize("add", [False, True])
def test_rms_norm_matches_layers(dtype, shape, add):
    from pdserve.workers.kernels.fused import add_rms_norm, rms_norm
    from pdserve.workers.models.layers import rms_norm as ref_norm

    skip_interpreted_bf16(dtype)
    torch.manual_seed(hash((str(dtype), shape, add)) & 0xFFFF)
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype)
    if not add:
        close(rms_norm(x, w, 1e-6), ref_norm(x, w, 1e-6))
        return
    residual = torch.randn(shape, dtype=dtype, device=DEVICE)
    y, new_residual = add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(new_residual, residual + x)  # the add rounds exactly as the eager one
    close(y, ref_norm(residual + x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (14, 2, 64), (32, 8, 128),
                                                             (5, 5, 32)])
@pytest.mark.parametrize("packed", [False, True])
def test_rotary_is_bit_exact(dtype, heads, kv_heads, head_dim, packed):
    """Same bits as layers.apply_rotary, in place, also on q/k views of one qkv tensor."""
    from pdserve.workers.kernels.fused import rotary
    from pdserve.workers.models.layers import RotaryEmbedding, apply_rotary

    skip_interpreted_bf16(dtype)
    rng = random.Random(heads * head_dim + packed)
    torch.manual_seed(rng.randrange(1 << 30))
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192) if packed else None
    rope = RotaryEmbedding(head_dim, 500000.0 if packed else 10000.0, scaling).to(DEVICE)
    t = rng.randint(1, 40)
    positions = torch.tensor([rng.randrange(40000) for _ in range(t)], device=DEVICE)
    cos, sin = rope.cos_sin(positions, dtype)
    if packed:  # strided views, as a fused qkv projection would give
        qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
        q = qkv[:, :heads * head_dim].view(t, heads, head_dim)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    else:
        q = torch.randn(t, heads, head_dim, dtype=dtype, device=DEVICE)
        k = torch.randn(t, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    ref_q, ref_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    out_q, out_k = rotary(q, k, cos, sin)
    assert out_q.data_ptr() == q_ptr and out_k.data_ptr() == k_ptr  # in place
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (33, 4864), (7, 1000)])
def test_silu_mul_matches_layers(dtype, shape):
    from pdserve.workers.kernels.fused import silu_mul

    skip_interpreted_bf16(dtype)
    torch.manual_seed(shape[0])
    gate = torch.randn(shape, dtype=dtype, device=DEVICE) * 4
    up = torch.randn(shape, dtype=dtype, device=DEVICE)
    close(silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (33, 9728), (7, 2000), (3, 5, 96)])
def test_silu_mul_halves_matches_silu_mul(dtype, shape):
    """On the fused gate/up output [.., 2I]: the same bits as silu_mul of its two halves."""
    from pdserve.workers.kernels.fused import silu_mul, silu_mul_halves

    skip_interpreted_bf16(dtype)
    torch.manual_seed(shape[-1])
    gate_up = torch.randn(shape, dtype=dtype, device=DEVICE) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_mul_halves(gate_up)
    assert torch.equal(out, silu_mul(gate, up))
    close(out, F.silu(gate) * up)


@pytest.mark.skipif(INTERPRET, reason="the model takes the fused path on CUDA only")
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_fused_matches_unfused(monkeypatch, model_type, dtype):
    """A whole forward pass with the fused kernels and the fused q/k/v and gate/up GEMMs
    against the same model with neither."""
    from pdserve.workers.attention import AttentionMetadata, TorchAttention
    from pdserve.workers.models import layers
    from pdserve.workers.models.config import ModelConfig
    from pdserve.workers.models.decoder import CausalLM

    cfg = dict(model_type=model_type, vocab_size=300, hidden_size=256, intermediate_size=640,
               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
               max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if model_type == "qwen3":
        cfg.update(head_dim=64)  # q/k norms over [T, heads, 64] rows
    if model_type == "qwen2":
        cfg.update(attention_bias=True)  # the fused projection carries the q/k/v biases
    torch.manual_seed(5)
    model = CausalLM(ModelConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    model = model.to(device=DEVICE, dtype=dtype).eval()
    c = model.config
    n, bs = 57, 16
    ids = torch.randint(0, 300, (n,), device=DEVICE)
    pos = torch.arange(n, device=DEVICE)

    def run() -> torch.Tensor:
        nb = -(-n // bs)
        caches = [torch.zeros(2, nb, bs, c.num_key_value_heads, c.head_dim, dtype=dtype,
                              device=DEVICE) for _ in range(c.num_hidden_layers)]
        meta = AttentionMetadata(slot_mapping=pos, query_start_loc=[0, n], seq_lens=[n],
                                 num_prefills=1, block_size=bs,
                                 block_tables=torch.arange(nb, device=DEVICE)[None])
        with torch.inference_mode():
            return model.logits(model(ids, pos, caches, meta, TorchAttention()))

    assert layers.fused_ops(ids) is not None
    with monkeypatch.context() as m:
        m.setattr(layers, "fused_ops", lambda x: None)
        ref = run()
    model.fuse_projections()
    assert model.model.layers[0].self_attn.qkv is not None
    fused = run()
    err = float((fused - ref).norm() / ref.norm())
    assert err < {torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype], err
