"""Configuration of one engine (one worker's model, cache and batching limits)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.eviction import check_cache_options

QUANTIZATIONS = ("int8", "int4")  # weight-only, of the decoder's projections (workers/quant.py)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local HF folder; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    quantization: str | None = None  # "int8" | "int4" weight-only; None: dtype throughout
    device: str = "cpu"
    kv_cache_dtype: str | None = None  # None: same as dtype; "int8": scaled (torch attention)
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_mb
    kv_cache_memory_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None  # chunked prefill: max prompt tokens per step
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped)
    enable_prefix_caching: bool = True
    eviction_policy: str = "lru"  # which cached free block goes first: lru, lfu, ttl, cost
    cache_ttl_seconds: float | None = None  # "ttl" policy: idle cached blocks expire after this
    tenant_quota_blocks: int | None = None  # cached blocks per tenant (cache salt); None: no cap
    session_ttl_seconds: float | None = 300.0  # an idle session's pin lasts this; None: no limit
    seed: int = 0
    worker_id: str = "local"
    model_cache_dir: str | None = None  # where the embedded model is converted to
    speculative_method: str | None = None  # "ngram" (prompt lookup), "draft"; None: off
    speculative_draft_model: str | None = None  # folder of a smaller model, same tokenizer
    num_speculative_tokens: int = 4
    speculative_adaptive: bool = True
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    attention_backend: str = "auto"  # "auto" (Triton on CUDA), "triton" or "torch" (reference)
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA + Triton attention only)
    # decode rows that share leading blocks read them once per group (Triton attention only)
    shared_prefix_attention: bool = True
    # schedule step N+1 while step N runs (overlap.py); None: on for CUDA, off on CPU
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        check_cache_options(self.eviction_policy, self.cache_ttl_seconds, self.tenant_quota_blocks,
                            self.session_ttl_seconds, prefix="config.")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise InvalidRequestError("config.quantization",
                                      f"must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError("config.kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES} "
                                      f"or None, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "int8" and self.attention_backend == "triton":
            raise InvalidRequestError("config.kv_cache_dtype", "the int8 KV cache is read by the "
                                      "torch reference attention only; use attention_backend "
                                      "'torch' or 'auto'")
