"""The main job: a real request through the P/D cluster on the embedded model, streamed.

Starts a local Ray with one prefill and one decode worker, sends a chat turn (prefill
worker -> KV handoff -> decode worker), streams the answer, sends a second turn that
reuses the first turn's cached blocks, prints where time and tokens went, shuts down.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="local HF folder (default: embedded SmolLM2)")
    ap.add_argument("--transport", default="object_store", choices=["object_store", "grpc"])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--question", default="Give me three short tips for writing clear code.")
    ap.add_argument("--follow-up", default="Now say the second tip again, in one sentence.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from pdserve.cluster.config import ClusterConfig
    from pdserve.cluster.launcher import PDCluster
    from pdserve.cluster.router import RouterRequest
    from pdserve.workers.model_store import resolve_model
    from pdserve.workers.sampling_params import SamplingParams

    path = resolve_model(args.model)  # converts the embedded GGUF once, with progress
    cfg = ClusterConfig.from_dict({
        "model": args.model, "transport": args.transport,
        "prefill": {"replicas": 1, "num_cpus": 1, "num_blocks": 512},
        "decode": {"replicas": 1, "num_cpus": 1, "num_blocks": 512},
    })
    print(f"pdserve: starting 1 prefill + 1 decode worker on a local Ray ({args.transport})",
          file=sys.stderr)
    t0 = time.monotonic()
    cluster = PDCluster.start(cfg, model_path=path,
                              ray_init_kwargs={"num_cpus": 4, "log_to_driver": False})
    print(f"pdserve: cluster up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    messages: list[dict] = [{"role": "user", "content": args.question}]
    try:
        for turn, rid in ((1, "demo-turn-1"), (2, "demo-turn-2")):
            print(f"\nuser> {messages[-1]['content']}\nassistant> ", end="", flush=True)
            start = time.monotonic()
            first = None
            text, last = [], None
            for ref in cluster.router.generate.remote(
                    RouterRequest(rid, messages=tuple(messages), params=params)):
                chunk = ray.get(ref)
                if first is None:
                    first = time.monotonic() - start
                print(chunk.text, end="", flush=True)
                text.append(chunk.text)
                last = chunk
            total = time.monotonic() - start
            u = last.usage
            print(f"\n[turn {turn}: {u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), "
                  f"{u.completion_tokens} generated, TTFT {first * 1000:.0f} ms, "
                  f"{u.completion_tokens / total:.1f} tok/s, finish={last.finish_reason}]")
            messages += [{"role": "assistant", "content": "".join(text)},
                         {"role": "user", "content": args.follow_up}]
        stats = ray.get(cluster.router.stats.remote())
        c = stats["counters"]
        print(f"\nrouter: {int(c['pd'])} via prefill->decode handoff "
              f"({c['handoff_bytes'] / 2**20:.1f} MiB of KV moved), {int(c['direct'])} direct "
              f"on the decode worker holding the prefix")
    finally:
        cluster.shutdown()
        print("pdserve: shut down cleanly", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
