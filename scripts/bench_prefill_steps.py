"""How the scheduler lays out the GPU shared-prefix bench's prefill phase (scripts/bench_gpu.py
--mode shared-prefix): 8 groups of 16 requests, each a 2,048-token system prompt shared in
its group plus a 128-token question, all arriving at once, a 16,384-token step budget,
blocks of 16, prefix caching on. The scheduler and block manager alone (no model, CPU):
steps are device-independent, so this shows what the GPU runs without a GPU.

Prints each step until every request has its first token (prefill rows, their tokens, decode
rows), then the prompt tokens computed in all (the minimum is every distinct token once:
8 x 2,048 + 128 x 128 = 32,768) and the mean step at which a request got its first token.

    python scripts/bench_prefill_steps.py
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.scheduler import Scheduler, SchedulerConfig
from pdserve.workers.sequence import Sequence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16384, help="max_num_batched_tokens")
    args = ap.parse_args()
    rng = random.Random(0)
    n = args.groups * args.per_group
    sched = Scheduler(SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=args.budget,
                                      max_model_len=4096), BlockManager(8 * n * 256 // 16 + 64, 16))
    length = args.system_len + args.question_len
    for g in range(args.groups):
        system = [rng.randrange(1000, 100000) for _ in range(args.system_len)]
        for i in range(args.per_group):
            ids = system + [rng.randrange(1000, 100000) for _ in range(args.question_len)]
            sched.add(Sequence(f"g{g}-{i}", ids, length, SamplingParams(max_tokens=8),
                               time.monotonic()))
    computed, first_step, step = 0, {}, 0
    while len(first_step) < n:
        step += 1
        out = sched.schedule()
        prefill = [s for s in out.scheduled if s.num_new_tokens > 1]
        tokens = sum(s.num_new_tokens for s in prefill)
        computed += tokens
        print(json.dumps({"step": step, "prefill_rows": len(prefill), "prefill_tokens": tokens,
                          "decode_rows": len(out.scheduled) - len(prefill)}))
        sched.finish_step(out.scheduled)
        for s in out.scheduled:
            seq = s.seq
            if seq.num_computed_tokens == seq.num_tokens:
                first_step.setdefault(seq.request_id, step)
                seq.token_ids.append(12345)
    print(json.dumps({"prompt_tokens_computed": computed,
                      "distinct_prompt_tokens": args.groups * args.system_len + n * args.question_len,
                      "mean_first_token_step": round(sum(first_step.values()) / n, 3),
                      "blocks_ridden": sched.bm.blocks_ridden}))


if __name__ == "__main__":
    main()
