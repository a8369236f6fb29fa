"""Model architecture settings read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pdserve.workers.errors import ModelLoadError

SUPPORTED = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ModelLoadError(f"config.json model_type {mt!r} is not supported; "
                                 f"supported: {', '.join(SUPPORTED)}")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = d["num_attention_heads"]
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")),
            qk_norm=mt == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ModelLoadError(f"{path} not found") from e
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        gen = Path(folder) / "generation_config.json"
        if gen.exists():
            try:
                g = json.loads(gen.read_text())
                if g.get("eos_token_id") is not None:
                    d = {**d, "eos_token_id": _merge_eos(d.get("eos_token_id"), g["eos_token_id"])}
            except json.JSONDecodeError:
                pass
        return cls.from_dict(d)


def _merge_eos(a: int | list[int] | None, b: int | list[int]) -> list[int]:
    out: list[int] = []
    for x in (a, b):
        for t in (x if isinstance(x, list) else [x]):
            if t is not None and t not in out:
                out.append(t)
    return out
