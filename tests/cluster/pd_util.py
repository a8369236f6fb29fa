"""Constants and helpers shared by the cluster tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray

from pdserve.workers.outputs import TokenChunk
from pdserve.workers.sampling_params import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
# Plain prompts without a shared prefix (each one takes the P/D path), from 1 to 4 blocks;
# none ends before MAX_TOKENS.
PROMPTS = (
    "The three primary colors are",
    "List of the planets of the solar system in order from the sun: 1.",
    "Once upon a time, in a small village at the edge of a vast forest, there lived an old "
    "clockmaker who repaired every clock in the valley. Each morning he opened his shop, wound "
    "the great pendulum clock by the door, and listened to the ticking of a hundred",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
STREAM_TIMEOUT_S = 120.0


def base_config(**overrides: Any) -> dict:
    """A small cluster config as a dict; ``overrides`` replace top-level keys."""
    role = {"replicas": 1, "num_cpus": 1, "num_blocks": 160}
    cfg: dict[str, Any] = {"prefill": dict(role), "decode": dict(role)}
    cfg.update(overrides)
    return cfg


@dataclass(frozen=True)
class Reference:
    """Greedy outputs of the single-process engine and of transformers for PROMPTS."""

    prompt_ids: dict[str, list[int]]
    engine: dict[str, list[int]]
    hf: dict[str, list[int]]

    def check(self, prompt: str, got: Iterable[int]) -> None:
        got = list(got)
        assert got == self.engine[prompt], f"{prompt[:30]!r}: differs from the engine"
        assert got == self.hf[prompt], f"{prompt[:30]!r}: differs from transformers"


def drain(gen: Any, timeout: float = STREAM_TIMEOUT_S) -> list[TokenChunk]:
    """Read a router stream (an ObjectRefGenerator) to its end; TimeoutError on a stall."""
    out: list[TokenChunk] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _ = ray.wait([gen], timeout=max(left, 0.0))
        if not ready:
            raise TimeoutError(f"stream stalled after {len(out)} chunks")
        try:
            ref = next(gen)
        except StopIteration:
            return out
        out.append(ray.get(ref, timeout=max(left, 1.0)))


def tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def router_stats(cluster: Any) -> dict:
    return ray.get(cluster.router.stats.remote(), timeout=30)


def counters(cluster: Any) -> dict[str, float]:
    return router_stats(cluster)["counters"]


def live_workers(cluster: Any, role: str | None = None) -> list[str]:
    """The router's live workers (of one role), replacements of dead ones included."""
    stats = router_stats(cluster)
    return [w for w, up in stats["alive"].items() if up and role in (None, stats["roles"][w])]


def worker_stats(cluster: Any, role: str | None = None) -> dict[str, dict]:
    """stats() of every live worker (of one role), straight from the actors."""
    ids = live_workers(cluster, role)
    got = ray.get([cluster.actor(w).stats.remote() for w in ids], timeout=30)
    return dict(zip(ids, got, strict=True))


def wait_idle(cluster: Any, timeout: float = 60.0) -> dict[str, dict]:
    """Wait until no worker holds a request, lease, reservation or block owner and the router
    has no request; return the workers' stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = worker_stats(cluster)
        active = router_stats(cluster)["active"]
        busy = {w: s for w, s in stats.items()
                if s["requests"] or s["leases"] or s["reserved"] or s["owners"]}
        if not busy and not active:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout} s: router active={active}, {busy}")
        time.sleep(0.1)


def assert_clean(cluster: Any, timeout: float = 60.0) -> dict[str, dict]:
    """Every live worker is idle with every block free, and passes check_integrity."""
    stats = wait_idle(cluster, timeout)
    for wid, s in stats.items():
        assert s["free_blocks"] == s["total_blocks"], (wid, s)
        assert s["leases"] == 0 and s["owners"] == [], (wid, s)
    assert all(ray.get([cluster.actor(w).check_integrity.remote() for w in stats], timeout=30))
    return stats


def handoff_vias(cluster: Any, role: str = "decode") -> dict[str, str]:
    """request id -> the transport that brought its blocks ("collective", "object_store", ...),
    over every live worker of ``role``."""
    out: dict[str, str] = {}
    for w in live_workers(cluster, role):
        out.update({rid: st.via for rid, st in ray.get(cluster.actor(w).handoffs.remote(), timeout=30)})
    return out


def tiny_random_model(folder: Any, vocab_size: int = 512, **config: Any) -> Any:
    """A random-weight llama folder with a word-level tokenizer ("t0".."t<vocab-1>"), needing
    no download: for runs where the embedded model is not installed (the GPU machine)."""
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    cfg = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(config)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg), dtype=torch.float32)
    with torch.no_grad():  # larger than the default init: logits are not flat, greedy is stable
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)
    return folder


def check_greedy_2p2d(cluster: Any, reference: Reference) -> dict[str, float]:
    """Every PROMPT through the P/D path at once equals the single engine and transformers,
    one handoff each, and the cluster is clean afterwards; returns the counters' change."""
    from pdserve.cluster.router import RouterRequest

    before = counters(cluster)
    gens = {p: cluster.router.generate.remote(RouterRequest(
        f"eq-{i}", prompt_token_ids=tuple(reference.prompt_ids[p]), params=GREEDY))
        for i, p in enumerate(PROMPTS)}
    for p, gen in gens.items():
        reference.check(p, tokens(drain(gen)))
    after = counters(cluster)
    assert after["pd"] - before["pd"] == len(PROMPTS)
    assert after["handoffs"] - before["handoffs"] == len(PROMPTS)
    assert_clean(cluster)
    return {k: after[k] - before[k] for k in after}
