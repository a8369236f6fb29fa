"""Host time of the scheduler's prefix-cache probe and allocation for a burst of requests on
cached system prompts (8 prompts of 2,048 tokens, 15 more requests each), on the CPU.

    python scripts/bench_probe.py
"""

from __future__ import annotations

import random
import statistics
import time

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence


def run(rng: random.Random) -> float:
    sp = SamplingParams(max_tokens=4)

    def toks(n: int) -> list[int]:
        return [rng.randrange(10, 100000) for _ in range(n)]

    bm = BlockManager(40000, 16)
    systems = [toks(2048) for _ in range(8)]
    for g, s in enumerate(systems):  # the first request of each group computes its prompt
        first = Sequence(f"f{g}", s + toks(128), 2176, sp, 0.0)
        bm.allocate(first, 2176)
        first.num_computed_tokens = 2176
        bm.commit(first)
    burst = [Sequence(f"s{g}-{i}", s + toks(128), 2176, sp, 0.0)
             for g, s in enumerate(systems) for i in range(15)]
    t = time.perf_counter()
    for seq in burst:
        hits, _ = bm.probe_prefix(seq)
        assert len(hits) == 128
        bm.allocate(seq, 128, hits)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    rng = random.Random(0)
    times = [run(rng) for _ in range(7)]
    print(f"probe + allocate of 120 requests hitting 128 cached blocks each: "
          f"median {statistics.median(times):.2f} ms, min {min(times):.2f} ms")


if __name__ == "__main__":
    main()
