"""Benchmark of the prefix cache's eviction policies on simulated replays.

No model: the BlockManager is driven directly, as the scheduler would. Two workloads.

``chat`` (the main one): ``--sessions`` chat sessions with Zipf(``--zipf``) popularity; each starts from one of ``--system-prompts``
shared system prompts (``--system-tokens`` tokens, also Zipf), and every turn sends system
prompt + the whole history + a new user message (16-96 tokens) and generates 32-256 tokens. A
session whose context would pass ``--max-context`` starts a new conversation. Turns arrive
every 1/``--rate`` simulated seconds on average; ``--concurrency`` requests are in flight (a
session's next turn comes only after its previous one finished). The cache holds ``--blocks``
blocks of 16 tokens. The trace is generated once and replayed under every policy.

``docs_with_scans``: half the requests ask a question (32 tokens) about one of 20 shared
documents (1024 tokens, Zipf popularity), half are one-off 1024-token prompts nobody repeats
(a scan that pollutes a recency-only cache). Same cache size, rate and concurrency.

Reported per policy (``lru``, ``lfu``, ``ttl`` with ``--ttl``, ``cost``):
  hit_rate     prompt tokens served from the prefix cache / prompt tokens
  evictions    cached blocks evicted to make room (plus ``expired`` for ttl)
  seconds      wall time of the replay (hashing dominates; a regression marker only)
  saved_work   prefill work saved / prefill work, with block i of a prompt costing
               (i + 1) + 192 (attention over i + 1 blocks plus the projections and MLP, in
               the same unit, as for SmolLM2-135M with 16-token blocks)
for chat once without and once with session pins (``session_ttl_seconds`` =
``--session-ttl``), and ``unbounded_hit_rate``: the replay with a cache that never evicts.

Prints one JSON line. Example: python scripts/bench_eviction.py --requests 3000 --blocks 1024
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from dataclasses import dataclass

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.eviction import POLICIES
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 16
MLP_BLOCKS = 192  # linear work of a block / attention work of a block over one block of keys


@dataclass(frozen=True)
class Turn:
    time: float
    session: str | None
    prompt: list[int]
    output: list[int]
    fresh: int  # tokens no earlier turn sent (user message + output)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def make_trace(args: argparse.Namespace) -> list[Turn]:
    rng = random.Random(args.seed)
    systems = [[rng.randrange(1, 30000) for _ in range(args.system_tokens)]
               for _ in range(args.system_prompts)]
    sys_of = rng.choices(range(args.system_prompts), zipf_weights(args.system_prompts, args.zipf),
                         k=args.sessions)
    history: list[list[int]] = [[] for _ in range(args.sessions)]
    last_turn = [-(10**9)] * args.sessions
    popularity = zipf_weights(args.sessions, args.zipf)
    trace: list[Turn] = []
    t = 0.0
    for i in range(args.requests):
        while True:  # a session's next turn waits for its previous one to finish
            s = rng.choices(range(args.sessions), popularity)[0]
            if i - last_turn[s] >= args.concurrency:
                break
        last_turn[s] = i
        user = [rng.randrange(30000, 60000) for _ in range(rng.randint(16, 96))]
        output = [rng.randrange(30000, 60000) for _ in range(rng.randint(32, 256))]
        if args.system_tokens + len(history[s]) + len(user) + len(output) > args.max_context:
            history[s] = []  # a new conversation
        prompt = systems[sys_of[s]] + history[s] + user
        history[s] = history[s] + user + output
        t += rng.expovariate(args.rate)
        trace.append(Turn(t, f"s{s}", prompt, output, len(user) + len(output)))
    return trace


def make_docs_trace(args: argparse.Namespace) -> list[Turn]:
    rng = random.Random(args.seed)
    docs = [[rng.randrange(1, 30000) for _ in range(1024)] for _ in range(20)]
    popularity = zipf_weights(len(docs), args.zipf)
    trace = []
    t = 0.0
    for _ in range(args.requests):
        if rng.random() < 0.5:
            doc = rng.choices(range(len(docs)), popularity)[0]
            prompt = docs[doc] + [rng.randrange(30000, 60000) for _ in range(32)]
        else:
            prompt = [rng.randrange(30000, 60000) for _ in range(1024)]
        output = [rng.randrange(30000, 60000) for _ in range(rng.randint(16, 64))]
        t += rng.expovariate(args.rate)
        trace.append(Turn(t, None, prompt, output, len(prompt) + len(output)))
    return trace


def work(num_blocks: int) -> int:
    """Prefill work of the first ``num_blocks`` blocks of a prompt (see the module doc)."""
    return num_blocks * (num_blocks + 1) // 2 + num_blocks * MLP_BLOCKS


def replay(trace: list[Turn], args: argparse.Namespace, policy: str, blocks: int,
           pins: bool) -> dict:
    clock = Clock()
    bm = BlockManager(blocks, BLOCK_SIZE, eviction_policy=policy,
                      cache_ttl_seconds=args.ttl if policy == "ttl" else None,
                      session_ttl_seconds=args.session_ttl, clock=clock)
    inflight: deque[Sequence] = deque()
    total_work = saved_work = 0

    def finish(seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        bm.free(seq)

    t0 = time.perf_counter()
    for i, turn in enumerate(trace):
        clock.t = turn.time
        bm.expire()
        while len(inflight) >= args.concurrency:
            finish(inflight.popleft())
        seq = Sequence(request_id=f"r{i}", token_ids=list(turn.prompt),
                       num_prompt_tokens=len(turn.prompt), params=SamplingParams(),
                       arrival=turn.time, session_id=turn.session if pins else None)
        hits = bm.match_prefix(seq)
        bm.record_prefix_query(len(turn.prompt), len(hits) * BLOCK_SIZE)
        total_work += work(len(turn.prompt) // BLOCK_SIZE)
        saved_work += work(len(hits))
        seq.token_ids += turn.output  # prompt and output at once; the last token has no KV
        n = seq.num_tokens - 1 - len(hits) * BLOCK_SIZE
        while not bm.can_allocate(seq, n, hits):
            finish(inflight.popleft())  # raises IndexError if one request exceeds the cache
        bm.allocate(seq, n, hits)
        seq.num_computed_tokens = seq.num_tokens - 1
        bm.commit(seq)
        inflight.append(seq)
    seconds = time.perf_counter() - t0
    while inflight:
        finish(inflight.popleft())
    bm.check_integrity()
    return {"hit_rate": round(bm.hit_rate, 4), "saved_work": round(saved_work / total_work, 4),
            "evictions": bm.pool.num_evictions,
            "expired": bm.pool.num_expired, "sessions_dropped_for_room": bm.num_sessions_dropped,
            "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--system-prompts", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--rate", type=float, default=4.0, help="turns per simulated second")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--ttl", type=float, default=120.0, help="idle seconds of the ttl policy")
    ap.add_argument("--session-ttl", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: dict = {
        "bench": "eviction",
        "args": {k: getattr(args, k) for k in ("requests", "sessions", "zipf", "system_prompts",
                                               "system_tokens", "max_context", "rate",
                                               "concurrency", "blocks", "ttl", "session_ttl",
                                               "seed")},
    }
    for name, trace in (("chat", make_trace(args)), ("docs_with_scans", make_docs_trace(args))):
        # A cache that never evicts: room for every block the trace can create.
        unbounded = (sum(-(-t.fresh // BLOCK_SIZE) + 2 for t in trace)
                     + args.system_prompts * -(-args.system_tokens // BLOCK_SIZE) + 64)
        res = {
            "mean_prompt_tokens": round(sum(len(t.prompt) for t in trace) / len(trace), 1),
            "unbounded_hit_rate": replay(trace, args, "lru", unbounded, pins=False)["hit_rate"],
            "policies": {p: replay(trace, args, p, args.blocks, pins=False) for p in POLICIES},
        }
        if name == "chat":
            res["policies_with_session_pins"] = {p: replay(trace, args, p, args.blocks, pins=True)
                                                 for p in POLICIES}
        out[name] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
