"""Speculative decoding on CPU: speed-up and acceptance rate of each proposer against plain
decoding of the same prompts, greedy, in one run. Prints one JSON line.

    python scripts/bench_spec.py [--max-tokens 96] [--k 4]

The draft-model rows use SmolLM2 itself as the draft (an upper bound on acceptance; no
smaller model shares its tokenizer here), so their speed-up is not meaningful on CPU;
the n-gram proposer is the practical one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pdserve.workers.config import EngineConfig
    from pdserve.workers.engine import LLMEngine
    from pdserve.workers.model_store import ensure_embedded_model
    from pdserve.workers.sampling_params import SamplingParams

    path = ensure_embedded_model()
    base = LLMEngine(EngineConfig(num_blocks=400, enable_prefix_caching=False), model_path=path)
    tok = base.tokenizer
    prompts = [
        base.apply_chat_template([{"role": "user", "content": c}]) for c in (
            "Rewrite this list in reverse order: apple, banana, cherry, date, elderberry, fig.",
            "Write a Python function that adds two numbers, then one that subtracts them.",
            "Repeat after me exactly: the quick brown fox jumps over the lazy dog.",
            "What are the days of the week?")
    ] + [tok.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def run(engine) -> tuple[float, int, list[list[int]]]:
        outs: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):  # one batch, as a small server would see it
            rid = f"{i}-{time.monotonic_ns()}"
            engine.add_request(rid, prompt_token_ids=p, params=params)
        t = time.perf_counter()
        steps0 = engine.num_steps
        while engine.has_unfinished():
            for c in engine.step():
                outs.setdefault(c.request_id, []).extend(c.token_ids)
        return time.perf_counter() - t, engine.num_steps - steps0, list(outs.values())

    base_s, base_steps, base_out = run(base)
    n_tokens = sum(len(o) for o in base_out)
    result = {"bench": "speculative", "device": "cpu", "prompts": len(prompts),
              "output_tokens": n_tokens, "k": args.k,
              "plain": {"tok_s": round(n_tokens / base_s, 1), "steps": base_steps}}
    for name, extra in (("ngram", {"speculative_method": "ngram"}),
                        ("draft_self", {"speculative_method": "draft",
                                        "speculative_draft_model": str(path)})):
        eng = LLMEngine(EngineConfig(num_blocks=400, enable_prefix_caching=False,
                                     num_speculative_tokens=args.k, **extra),
                        model_path=path, tokenizer=tok)
        s, steps, out = run(eng)
        result[name] = {"tok_s": round(n_tokens / s, 1), "steps": steps,
                        "speedup": round(base_s / s, 2),
                        "acceptance_rate": round(eng.spec.acceptance_rate, 3),
                        "identical_to_plain": out == base_out}
        del eng
    print(json.dumps(result))


if __name__ == "__main__":
    main()
