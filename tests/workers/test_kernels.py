"""The Triton kernels (workers/kernels) against the torch reference path; GPU only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_cache(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device="cuda")


def random_tables(lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Each sequence gets distinct random blocks, in no order; rows padded with 0."""
    need = [-(-n // block_size) for n in lens]
    ids = rng.sample(range(num_blocks), sum(need))
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    at = 0
    for i, k in enumerate(need):
        tables[i, :k] = torch.tensor(ids[at:at + k])
        at += k
    return tables.cuda()


def decode_meta(lens: list[int], tables: torch.Tensor, block_size: int):
    from pdserve.workers.attention import AttentionMetadata

    slots = torch.stack([tables[i, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for i, n in enumerate(lens)])
    return AttentionMetadata(slot_mapping=slots, query_start_loc=list(range(len(lens) + 1)),
                             seq_lens=list(lens), num_prefills=0, block_tables=tables,
                             block_size=block_size,
                             seq_lens_tensor=torch.tensor(lens, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_kernel_matches_reference(dtype, group, head_dim):
    from pdserve.workers.attention import TorchAttention
    from pdserve.workers.kernels.paged_attention import decode_attention

    rng = random.Random(hash((str(dtype), group, head_dim)) & 0xFFFF)
    torch.manual_seed(rng.randrange(1 << 30))
    for trial in range(4):
        block_size = rng.choice([16, 32])
        hkv = rng.choice([1, 2, 4])
        h = hkv * group
        bsz = rng.randint(1, 9)
        # Edge lengths (1, a block, a block + 1) and long random ones.
        lens = [rng.choice([1, block_size, block_size + 1, rng.randint(2, 1500)]) for _ in range(bsz)]
        num_blocks = sum(-(-n // block_size) for n in lens) + rng.randint(0, 20)
        cache = make_cache(num_blocks, block_size, hkv, head_dim, dtype)
        tables = random_tables(lens, block_size, num_blocks, rng)
        q = torch.randn(bsz, h, head_dim, dtype=dtype, device="cuda")
        scale = head_dim ** -0.5
        # Reference in float32 over the same (rounded) inputs, through the torch backend.
        meta = decode_meta(lens, tables, block_size)
        k_new = cache[0].view(-1, hkv, head_dim)[meta.slot_mapping]
        v_new = cache[1].view(-1, hkv, head_dim)[meta.slot_mapping]
        ref = TorchAttention().forward(q.float(), k_new.float(), v_new.float(), cache.float(),
                                       meta, scale)
        for splits in (1, 4, 16):
            out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
            decode_attention(q, cache, tables, meta.seq_lens_tensor, scale, splits, out=out)
            assert not out.isnan().any(), (trial, splits)
            err = rel_err(out, ref)
            assert err < TOL[dtype], (trial, splits, lens, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_matches_index_copy(dtype):
    from pdserve.workers.attention import write_kv as ref_write
    from pdserve.workers.kernels.paged_attention import write_kv

    cache = make_cache(40, 16, 2, 64, dtype)
    ref = cache.clone()
    slots = torch.randperm(40 * 16, device="cuda")[:300]
    k = torch.randn(300, 2, 64, device="cuda")  # float32 in, cache dtype out (cast inside)
    v = torch.randn(300, 2, 64, device="cuda")
    write_kv(k, v, cache, slots)
    ref_write(k, v, ref, slots)
    assert torch.equal(cache, ref)


def test_triton_backend_mixed_batch_matches_torch():
    """Whole prompts, a chunk after cached KV, and decode rows in one step."""
    from pdserve.workers.attention import AttentionMetadata, TorchAttention
    from pdserve.workers.kernels.attention import TritonAttention

    rng = random.Random(7)
    torch.manual_seed(7)
    bs, hkv, h, d, dtype = 16, 2, 8, 64, torch.bfloat16
    # (tokens already in the cache, new tokens this step)
    rows = [(0, 37), (50, 20), (0, 5), (99, 1), (0 + 1, 1), (300, 1), (15, 1)]
    lens = [c + n for c, n in rows]
    num_blocks = sum(-(-n // bs) for n in lens) + 8
    cache = make_cache(num_blocks, bs, hkv, d, dtype)
    tables = random_tables(lens, bs, num_blocks, rng)
    qsl, slots = [0], []
    for i, (c, n) in enumerate(rows):
        qsl.append(qsl[-1] + n)
        pos = torch.arange(c, c + n, device="cuda")
        slots.append(tables[i, pos // bs] * bs + pos % bs)
    t = qsl[-1]
    q = torch.randn(t, h, d, dtype=dtype, device="cuda")
    k = torch.randn(t, hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(t, hkv, d, dtype=dtype, device="cuda")

    def meta() -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=torch.cat(slots), query_start_loc=qsl, seq_lens=lens,
                                 num_prefills=3, block_tables=tables, block_size=bs,
                                 seq_lens_tensor=torch.tensor(lens, device="cuda"))

    ref_cache, our_cache = cache.clone(), cache.clone()
    ref = TorchAttention().forward(q, k, v, ref_cache, meta(), d ** -0.5)
    out = TritonAttention(torch.device("cuda")).forward(q, k, v, our_cache, meta(), d ** -0.5)
    assert torch.equal(ref_cache, our_cache)
    assert rel_err(out, ref) < 1e-2


# -- the engine on a tiny random model -----------------------------------------------------------
class StubTokenizer:
    """Token ids in, empty text out: enough for prompts given as token ids."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def tiny_model_folder(tmp: Path) -> Path:
    from safetensors.torch import save_file

    from pdserve.workers.models.config import ModelConfig
    from pdserve.workers.models.decoder import CausalLM

    cfg = dict(model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512,
               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
               max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    model = CausalLM(ModelConfig.from_dict(cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # not flat logits: greedy ties would make the check fragile
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.mark.parametrize(("chunk", "graphs"), [(None, True), (48, True), (None, False)])
def test_engine_greedy_triton_equals_torch(tmp_path: Path, chunk, graphs):
    """Triton attention (decode through CUDA graphs, or eager) gives the reference's tokens."""
    from pdserve.workers.config import EngineConfig
    from pdserve.workers.engine import LLMEngine
    from pdserve.workers.kernels.attention import TritonAttention
    from pdserve.workers.sampling_params import SamplingParams

    folder = tiny_model_folder(tmp_path)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 300))] for _ in range(12)]
    prompts.append(prompts[0][:40] + [5, 6, 7])  # a prefix-cache hit: an extend over cached KV
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        eng = LLMEngine(EngineConfig(model=str(folder), device="cuda", dtype="float32",
                                     attention_backend=backend, num_blocks=512, max_num_seqs=8,
                                     long_prefill_token_threshold=chunk, cuda_graphs=graphs),
                        model_path=folder, tokenizer=StubTokenizer())
        assert isinstance(eng.runner.backend, TritonAttention) == (backend == "triton")
        assert (eng.runner.graphs is not None) == (backend == "triton" and graphs)
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", prompt_token_ids=p, params=sp)
        got: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for c in eng.step():
                got.setdefault(c.request_id, []).extend(c.token_ids)
        eng.check_integrity()
        outs[backend] = got
    assert outs["triton"] == outs["torch"]
    assert all(len(v) == 40 for v in outs["triton"].values())
