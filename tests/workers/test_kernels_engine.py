"""The engine on a tiny random model with the Triton kernels: the reference's greedy tokens.

On a CUDA GPU with the Triton backend as configured; test_kernels_interp.py runs this file
again on CPU under the Triton interpreter, the kernels swapped into a CPU engine.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
gpu_only = pytest.mark.skipif(INTERPRET, reason="the engine runs on CUDA only")


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


def engine(folder: Path, device: str, spec: bool, **kw):
    from pdserve.workers.config import EngineConfig
    from pdserve.workers.engine import LLMEngine

    cfg = EngineConfig(model=str(folder), device=device, dtype="float32", num_blocks=512,
                       max_num_seqs=8, speculative_method="draft" if spec else None,
                       speculative_draft_model=str(folder) if spec else None,
                       num_speculative_tokens=3, **kw)
    return LLMEngine(cfg, model_path=folder, tokenizer=StubTokenizer())


def greedy(eng, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    from pdserve.workers.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", prompt_token_ids=p, params=sp)
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for c in eng.step():
            got.setdefault(c.request_id, []).extend(c.token_ids)
    eng.check_integrity()
    assert all(len(v) == max_tokens for v in got.values())
    return got


def random_prompts(n: int, max_len: int) -> list[list[int]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, max_len))] for _ in range(n)]
    return prompts + [prompts[0][:40] + [5, 6, 7]]  # a prefix-cache hit: an extend over cached KV


@gpu_only
@pytest.mark.parametrize(("chunk", "graphs", "spec"),
                         [(None, True, False), (48, True, False), (None, False, False),
                          (48, True, True)])
def test_engine_greedy_triton_equals_torch(tmp_path: Path, chunk, graphs, spec):
    """Triton attention (decode through CUDA graphs, or eager; prompts in chunks; every
    decode step a verification row of the model drafting for itself; steps overlapped
    with the one before) gives the synchronous reference's tokens."""
    from pdserve.workers.kernels.attention import TritonAttention

    folder = tiny_model_folder(tmp_path)
    prompts = random_prompts(12, 300)
    outs = {}
    for backend in ("torch", "triton"):
        # the reference runs eager and synchronous; Triton overlaps step N+1 with step N
        eng = engine(folder, "cuda", spec, attention_backend=backend, cuda_graphs=graphs,
                     long_prefill_token_threshold=chunk, async_scheduling=backend == "triton")
        assert isinstance(eng.runner.backend, TritonAttention) == (backend == "triton")
        assert (eng.runner.graphs is not None) == (backend == "triton" and graphs)
        outs[backend] = greedy(eng, prompts, 40)
        assert (eng.num_overlapped > 0) == (backend == "triton" and not spec)
    assert outs["triton"] == outs["torch"]


@gpu_only
@pytest.mark.parametrize("graphs", [True, False])
def test_engine_shared_prefix_attention_equals_torch(tmp_path: Path, graphs):
    """Eight requests on one long system prompt (prefix-cache hits) and two others: decode
    steps read the shared blocks once per chunk (through the CUDA graph or eager), and
    the tokens are the reference's; with the plan turned off too."""
    from pdserve.workers.kernels.attention import TritonAttention

    folder = tiny_model_folder(tmp_path)
    rng = random.Random(5)
    system = [rng.randrange(3, 512) for _ in range(1800)]  # a plan from 6 rows on
    prompts = ([system + [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(8)]
               + [[rng.randrange(3, 512) for _ in range(n)] for n in (30, 700)])
    ref = greedy(engine(folder, "cuda", False, attention_backend="torch", max_model_len=2048),
                 prompts, 24)
    for shared in (True, False):
        eng = engine(folder, "cuda", False, attention_backend="triton", cuda_graphs=graphs,
                     max_model_len=2048, shared_prefix_attention=shared)
        assert isinstance(eng.runner.backend, TritonAttention)
        assert greedy(eng, prompts, 24) == ref, shared
        runs = eng.runner.shared_prefix_steps + (eng.runner.graphs.shared_replays if graphs else 0)
        assert (runs > 0) == shared, runs


@pytest.mark.skipif(not INTERPRET, reason="on a GPU, the test above")
@pytest.mark.parametrize("spec", [False, True])
def test_interpreted_engine_equals_torch(tmp_path: Path, monkeypatch, spec):
    """On CPU: the Triton backend and the fused layers swapped into the engine, interpreted,
    give the reference's tokens (prompts in chunks, a prefix hit, decode or verification
    rows)."""
    from pdserve.workers.kernels import fused
    from pdserve.workers.kernels.attention import TritonAttention
    from pdserve.workers.models import layers

    folder = tiny_model_folder(tmp_path)
    prompts = random_prompts(3, 60)
    ref = greedy(engine(folder, "cpu", spec, long_prefill_token_threshold=24), prompts, 6)
    eng = engine(folder, "cpu", spec, long_prefill_token_threshold=24)
    eng.runner.backend = TritonAttention(torch.device("cpu"))
    monkeypatch.setattr(layers, "fused_ops", lambda x: fused)
    assert greedy(eng, prompts, 6) == ref


def test_riders_read_blocks_filled_in_their_step(tmp_path: Path, monkeypatch):
    """Three prompts on one 40-token start arrive together: the second and third ride the
    first one's two full blocks in the step that fills them. The Triton kernels (on the GPU,
    or interpreted on CPU) read those blocks in that step, after each layer's KV write, and
    give the tokens of a reference engine that computes every prompt whole."""
    from pdserve.workers.kernels import fused
    from pdserve.workers.kernels.attention import TritonAttention
    from pdserve.workers.models import layers

    folder = tiny_model_folder(tmp_path)
    rng = random.Random(9)
    start = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [start + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 9, 17)]
    device = "cpu" if INTERPRET else "cuda"
    ref = greedy(engine(folder, device, False, attention_backend="torch",
                        enable_prefix_caching=False), prompts, 4)
    if INTERPRET:
        eng = engine(folder, "cpu", False)
        eng.runner.backend = TritonAttention(torch.device("cpu"))
        monkeypatch.setattr(layers, "fused_ops", lambda x: fused)
    else:
        eng = engine(folder, "cuda", False, attention_backend="triton")
    assert isinstance(eng.runner.backend, TritonAttention)
    assert greedy(eng, prompts, 4) == ref
    assert eng.block_manager.blocks_ridden == 2 * 2
