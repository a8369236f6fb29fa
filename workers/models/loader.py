"""Loads a local Hugging Face model folder (config.json + *.safetensors) into our models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.workers.errors import ModelLoadError
from pdserve.workers.models.config import ModelConfig
from pdserve.workers.models.decoder import CausalLM
from pdserve.workers.quant import quantize_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError as e:
        raise ModelLoadError(f"dtype {name!r} not one of {sorted(DTYPES)}") from e


def resolve_kv_dtype(kv_cache_dtype: str | None, model_dtype: str | torch.dtype) -> torch.dtype:
    """The KV cache's dtype: ``"int8"`` is the scaled int8 cache; None follows the model."""
    if kv_cache_dtype == "int8":
        return torch.int8
    return resolve_dtype(kv_cache_dtype or model_dtype)


def load_model(folder: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", quantization: str | None = None) -> CausalLM:
    """Load the checkpoint in ``dtype``; with ``quantization`` ("int8" | "int4") the decoder's
    projections are then quantized from those weights (see :mod:`pdserve.workers.quant`)."""
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    torch_dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(torch_dtype)
    if cfg.tie_word_embeddings:  # to_empty() unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name not in params:
                    if "rotary_emb" in name or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                        continue
                    raise ModelLoadError(f"{f.name}: unexpected weight {name!r}")
                t = st.get_tensor(name)
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelLoadError(f"{name}: shape {tuple(t.shape)} != expected {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(torch_dtype))
                loaded.add(name)
    missing = set(params) - loaded
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"missing weights: {sorted(missing)[:5]}")
    # Buffers (rotary inv_freq) were created on meta: rebuild them.
    from pdserve.workers.models.layers import rope_inv_freq

    model.model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.eval()
    if quantization is not None:
        del params  # drop our references so each replaced full-precision weight is freed
        quantize_model(model, quantization)
    logger.info("loaded %s (%s, %d layers) as %s on %s, quantization %s", folder, cfg.model_type,
                cfg.num_hidden_layers, torch_dtype, device, quantization)
    return model
