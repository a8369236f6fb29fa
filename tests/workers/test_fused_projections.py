"""Fused q/k/v and gate/up projections (``CausalLM.fuse_projections``, on by default on CUDA):
the same model, the same names and memory, one GEMM where there were several.

On the CPU, where the engine keeps them separate, the fused path is exercised directly;
the GPU run of test_kernels_fused.py covers it with the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.workers.attention import AttentionMetadata, TorchAttention
from pdserve.workers.models.config import ModelConfig
from pdserve.workers.models.decoder import CausalLM
from pdserve.workers.quant import quantize_model


def tiny(model_type: str) -> CausalLM:
    cfg = dict(model_type=model_type, vocab_size=300, hidden_size=128, intermediate_size=320,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if model_type == "qwen3":
        cfg.update(head_dim=48)
    torch.manual_seed(7)
    model = CausalLM(ModelConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def forward(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    n, bs, c = ids.numel(), 16, model.config
    nb = -(-n // bs)
    caches = [torch.zeros(2, nb, bs, c.num_key_value_heads, c.head_dim)
              for _ in range(c.num_hidden_layers)]
    pos = torch.arange(n)
    meta = AttentionMetadata(slot_mapping=pos, query_start_loc=[0, n], seq_lens=[n],
                             num_prefills=1, block_size=bs, block_tables=torch.arange(nb)[None])
    with torch.inference_mode():
        return model.logits(model(ids, pos, caches, meta, TorchAttention()))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fused_projections_same_model(model_type):
    model = tiny(model_type)
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(3))
    names = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = forward(model, ids)

    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert (attn.qkv[1] is not None) == (model_type == "qwen2")  # qwen2's q/k/v biases
    # The named parameters are views into the fused weights: no copy is kept.
    w = attn.qkv[0]
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()
    assert attn.v_proj.weight.data_ptr() == w[-attn.v_proj.out_features:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up[mlp.gate_proj.out_features:].data_ptr()
    after = model.state_dict()
    assert list(after) == names
    assert all(torch.equal(after[k], before[k]) for k in names)

    torch.testing.assert_close(forward(model, ids), ref, rtol=1e-5, atol=1e-5)
    model.fuse_projections()  # idempotent
    assert model.model.layers[0].self_attn.qkv[0] is w


def test_fused_greedy_tokens_equal():
    """Twenty greedy steps (full forward each time) pick the same tokens fused and not."""
    plain, fused = tiny("qwen2"), tiny("qwen2")
    fused.fuse_projections()
    ids = [5, 17, 250, 3]
    a, b = list(ids), list(ids)
    for _ in range(20):
        a.append(int(forward(plain, torch.tensor(a))[-1].argmax()))
        b.append(int(forward(fused, torch.tensor(b))[-1].argmax()))
    assert a == b


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_projections_stay_unfused(method):
    model = quantize_model(tiny("llama"), method)
    ids = torch.arange(20)
    ref = forward(model, ids)
    model.fuse_projections()
    assert model.model.layers[0].self_attn.qkv is None
    assert model.model.layers[0].mlp.gate_up is None
    assert torch.equal(forward(model, ids), ref)
