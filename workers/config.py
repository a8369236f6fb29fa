"""Configuration of one engine (one worker's model, cache and batching limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local HF folder; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_dtype: str | None = None  # None: same as dtype
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_mb
    kv_cache_memory_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None  # chunked prefill: max prompt tokens per step
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped)
    enable_prefix_caching: bool = True
    seed: int = 0
    worker_id: str = "local"
    model_cache_dir: str | None = None  # where the embedded model is converted to
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
