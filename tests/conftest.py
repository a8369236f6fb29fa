"""Shared fixtures: the embedded model (converted once per cache), tiny random models, threads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Two cores, several processes (Ray workers, HF references): one intra-op thread each
# avoids OpenMP spin contention that makes small matmuls 10x slower.
torch.set_num_threads(1)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    # The conversion (~30 s) is cached across runs in the user cache, like the CLI does.
    d = os.environ.get("PDSERVE_TEST_MODEL_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "pdserve" / "models"


@pytest.fixture(scope="session")
def smollm2_path(model_cache_dir: Path) -> Path:
    from pdserve.workers.model_store import ensure_embedded_model

    return ensure_embedded_model(model_cache_dir, progress=False)


def _tiny_config(model_type: str) -> dict:
    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "qwen3":
        base.update(head_dim=32)
    return base


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path):
    """Build (once per type) a random-weight model folder with SmolLM2's tokenizer."""
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type in made:
            return made[model_type]
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(1234)
        cfg = AutoConfig.for_model(model_type, **_tiny_config(model_type))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # Random init is tiny; scale up so logits are not flat (ties would make greedy fragile).
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
        out = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(out)
        for f in TOKENIZER_FILES:
            if (smollm2_path / f).exists():
                shutil.copy(smollm2_path / f, out / f)
        made[model_type] = out
        return out

    return make


# -- engines shared across test modules ---------------------------------------------------------
def _finish_all(engine) -> None:
    """Abort whatever an earlier (possibly failed) test left in ``engine`` and drain it."""
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()


@pytest.fixture(scope="session")
def engine_factory():
    """``make(model_path, **EngineConfig fields) -> LLMEngine``, one engine per distinct config.

    Engines of one folder and dtype share the loaded weights and the tokenizer (the model
    holds no per-request state: the KV cache lives in each engine's runner), so a new
    config costs only its KV cache. A returned engine has no request in flight, but its
    prefix cache and counters carry over from earlier tests: use deltas, unique prompts,
    or ``engine.block_manager.pool.reset_prefix_cache()``.
    """
    from unittest import mock

    from pdserve.workers import engine as engine_mod
    from pdserve.workers.config import EngineConfig
    from pdserve.workers.models.loader import load_model

    models: dict[tuple[str, str], object] = {}
    tokenizers: dict[str, object] = {}
    engines: dict[tuple, object] = {}

    def make(model_path: Path, **config):
        key = (str(model_path), tuple(sorted(config.items())))
        eng = engines.get(key)
        if eng is None:
            dtype = config.get("dtype", "float32")
            mkey = (str(model_path), dtype)
            if mkey not in models:
                models[mkey] = load_model(model_path, dtype, "cpu")
            if str(model_path) not in tokenizers:
                tokenizers[str(model_path)] = engine_mod.load_tokenizer(model_path)
            with mock.patch.object(engine_mod, "load_model", return_value=models[mkey]):
                eng = engine_mod.LLMEngine(EngineConfig(**config), model_path=model_path,
                                           tokenizer=tokenizers[str(model_path)])
            engines[key] = eng
        _finish_all(eng)
        return eng

    return make


@pytest.fixture(scope="session")
def smol_engine(engine_factory, smollm2_path: Path):
    """``smol_engine(**EngineConfig fields)``: an engine on SmolLM2 (see ``engine_factory``)."""

    def make(**config):
        config.setdefault("num_blocks", 256)
        return engine_factory(smollm2_path, **config)

    return make


@pytest.fixture(scope="session")
def run_engine():
    """``run(engine, max_steps=...) -> {request_id: [TokenChunk, ...]}``: step until idle."""

    def run(engine, max_steps: int = 5000, on_step=None) -> dict[str, list]:
        chunks: dict[str, list] = {}
        steps = 0
        while engine.has_unfinished():
            assert steps < max_steps, f"engine still busy after {max_steps} steps"
            for c in engine.step():
                chunks.setdefault(c.request_id, []).append(c)
            engine.check_integrity()
            steps += 1
            if on_step is not None:
                on_step(steps)
        return chunks

    return run
