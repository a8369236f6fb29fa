"""Offline throughput: pdserve's engine vs transformers' generate, same model and prompts, one run.

Prints one JSON line: output tokens/s for both and the ratio. Random prompt token ids,
fixed input/output lengths, EOS ignored (vLLM's ``--dataset-name random`` convention).

    python scripts/bench_offline.py                       # embedded SmolLM2 on CPU
    python scripts/bench_offline.py --num 256 --input-len 512 --output-len 128 \\
        --model-shape qwen2.5-0.5b --device cuda --dtype bfloat16   # GPU, random weights
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="local HF folder (default: embedded SmolLM2)")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=16, help="transformers generate batch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pdserve.workers.config import EngineConfig
    from pdserve.workers.engine import LLMEngine
    from pdserve.workers.model_store import resolve_model
    from pdserve.workers.sampling_params import SamplingParams

    path = resolve_model(args.model)
    eng = LLMEngine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                 max_num_seqs=max(args.num, 1),
                                 max_num_batched_tokens=max(2048, args.input_len)), model_path=path)
    rng = random.Random(0)
    vocab = eng.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.input_len)] for _ in range(args.num)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def run_ours() -> float:
        for i, p in enumerate(prompts):
            eng.add_request(f"b{i}-{time.monotonic_ns()}", prompt_token_ids=p, params=sp)
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # The same prompts run twice (warm-up, then timed): keep the second run from hitting
    # the prefix cache the first one filled.
    eng.block_manager.enable_caching = eng.block_manager.pool.enable_caching = False
    run_ours()
    ours_s = run_ours()
    total_out = args.num * args.output_len
    result = {"bench": "offline", "model": str(path.name), "device": args.device,
              "dtype": args.dtype, "num": args.num, "input_len": args.input_len,
              "output_len": args.output_len, "threads": torch.get_num_threads(),
              "host": platform.node(), "ours_tok_s": round(total_out / ours_s, 1)}
    eng.runner.kv_caches.clear()  # free the KV cache before loading the peer
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(args.device).eval()

        def run_hf() -> float:
            t = time.perf_counter()
            for s in range(0, args.num, args.hf_batch):
                batch = torch.tensor(prompts[s:s + args.hf_batch], device=args.device)
                with torch.inference_mode():
                    hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                pad_token_id=0)
            if args.device != "cpu":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        run_hf()
        hf_s = run_hf()
        result["hf_generate_tok_s"] = round(total_out / hf_s, 1)
        result["hf_batch"] = args.hf_batch
        result["ratio"] = round(hf_s / ours_s, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
