"""Host cost of automatic prefix caching when nothing hits, on the CPU: the scheduler and the
block manager alone (no model), driven through the GPU shared-prefix bench's 0%-hit
workload: 128 unique prompts of 2,176 tokens, 64 output tokens each, a 16,384-token step
budget, blocks of 16 and a pool smaller than two runs (so later runs evict the earlier
ones' cached blocks, as a serving worker does in steady state).

Prints the best of three timed runs (after a warm-up) with caching off and on, and the
difference: what probing, hashing, registering and evicting cost the host per run.

    python scripts/bench_cache_overhead.py
    python scripts/bench_cache_overhead.py --profile     # and a cProfile of one caching-on run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.scheduler import Scheduler, SchedulerConfig
from pdserve.workers.sequence import Sequence

PROMPT, OUT, NUM = 2176, 64, 128


def prompts(rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(1000, 100000) for _ in range(PROMPT)] for _ in range(NUM)]


def run(bm: BlockManager, ids: list[list[int]]) -> float:
    """One pass of the workload (fresh prompts each time); the host seconds of its steps."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=16384,
                                      max_model_len=4096), bm)
    for i, p in enumerate(ids):
        sched.add(Sequence(f"r{i}", p, PROMPT, SamplingParams(max_tokens=OUT), time.monotonic()))
    t0 = time.perf_counter()
    while sched.has_work():
        out = sched.schedule()
        sched.finish_step(out.scheduled)
        for s in out.scheduled:  # the engine's part: a token for each row that sampled
            seq = s.seq
            if seq.num_computed_tokens == seq.num_tokens:
                if seq.num_tokens - PROMPT >= OUT:
                    sched.running.remove(seq)
                    bm.free(seq)
                else:
                    seq.token_ids.append(12345)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    best = {}
    for caching in (False, True):
        rng = random.Random(0)
        # events as in the engine (none until taken); < 2 runs' 17,920 blocks: runs evict
        bm = BlockManager(20000, 16, caching, keep_events=False)
        times = [run(bm, prompts(rng)) for _ in range(4)]
        best[caching] = min(times[1:])
        bm.check_integrity()
    print(f"host ms per run: caching off {best[False] * 1e3:.1f}, on {best[True] * 1e3:.1f}; "
          f"caching costs {(best[True] - best[False]) * 1e3:.1f} ms")
    if args.profile:
        rng = random.Random(1)
        bm = BlockManager(20000, 16, True, keep_events=False)
        run(bm, prompts(rng))
        ids = prompts(rng)
        prof = cProfile.Profile()
        prof.enable()
        run(bm, ids)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
