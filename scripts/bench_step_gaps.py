"""Where a run's time goes, step by step, on the GPU: CUDA events around each step's
``runner.execute`` give its GPU span (its kernels plus any wait for the host inside the
step) and the GPU's idle gap before it (the host was late). The shared-prefix bench's
workloads (8 system prompts x 16 questions, and all-unique prompts of the same length),
with prefix caching on and off; the heap is frozen as in the bench.

    python scripts/bench_step_gaps.py            # two rounds, per-step lists in the second
    python scripts/bench_step_gaps.py --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
import types
from pathlib import Path

import torch
from bench_gpu import SHAPES, make_engine, random_model  # scripts/ is on the path

from pdserve.workers.sampling_params import SamplingParams


def drive(eng, prompts: list[list[int]], output_len: int) -> dict:
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"g{i}-{time.monotonic_ns()}", prompt_token_ids=p, params=sp)
    torch.cuda.synchronize()
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    execute = eng.runner.execute

    def timed(*a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = execute(*a, **k)
        end.record()
        events.append((start, end))
        return out

    eng.runner.execute = timed
    decode, host = [], []
    t0 = time.perf_counter()
    try:
        while eng.has_unfinished():
            only_decode = not eng.scheduler.waiting and all(
                s.num_tokens - s.num_computed_tokens == 1 for s in eng.scheduler.running)
            n, t = len(events), time.perf_counter()
            eng.step()
            if len(events) > n:
                decode.append(only_decode)
                host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    finally:
        eng.runner.execute = execute
    busy = [s.elapsed_time(e) for s, e in events]
    gaps = [0.0] + [events[i - 1][1].elapsed_time(events[i][0]) for i in range(1, len(events))]
    out: dict = {"wall_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    for name, want in (("prefill", False), ("decode", True)):
        idx = [i for i, d in enumerate(decode) if d is want]
        out[f"{name}_steps"] = len(idx)
        out[f"{name}_busy_ms"] = round(sum(busy[i] for i in idx), 1)
        out[f"{name}_gaps_ms"] = round(sum(gaps[i] for i in idx), 1)
        out[f"{name}_per_step"] = [(round(busy[i], 2), round(gaps[i], 2), round(host[i], 2)) for i in idx]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=64)
    a = ap.parse_args()
    args = types.SimpleNamespace(dtype="bfloat16", max_num_batched_tokens=16384, input_len=2176,
                                 kv_cache_mb=8192, output_len=a.output_len)
    cfg = SHAPES["qwen2.5-0.5b"]
    model = random_model(cfg, torch.bfloat16, "cuda")
    rng = random.Random(0)
    vocab = model.config.vocab_size

    def toks(n: int) -> list[int]:
        return [rng.randrange(1000, vocab - 1000) for _ in range(n)]

    work = {"shared": lambda: [s + toks(128) for s in [toks(2048) for _ in range(8)] for _ in range(16)],
            "unique": lambda: [toks(2176) for _ in range(128)]}
    engines = {c: make_engine(model, cfg, Path(tempfile.mkdtemp()), args, "auto", 128, prefix_caching=c)
               for c in (True, False)}
    for eng in engines.values():
        for w in work.values():
            drive(eng, w(), a.output_len)
    gc.collect()
    gc.freeze()
    for r in range(a.rounds):
        for name, w in work.items():
            prompts = w()
            order = list(engines.items())
            for caching, eng in (order if r % 2 == 0 else order[::-1]):
                res = drive(eng, prompts, a.output_len)
                per = {k: res.pop(k) for k in ("prefill_per_step", "decode_per_step")}
                print(name, "caching on" if caching else "caching off", res, flush=True)
                if r == a.rounds - 1:
                    print("  prefill steps (GPU span, gap before, host ms):", per["prefill_per_step"])
                    print("  decode steps (GPU span, gap before, host ms):", per["decode_per_step"])


if __name__ == "__main__":
    main()
