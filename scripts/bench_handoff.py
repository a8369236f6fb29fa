"""KV handoff on CPU: cost per block over each transport, and the time to first and second
token split into queue, prefill, and handoff (transfer + first decode step).

Starts a 1 prefill + 1 decode cluster on a local Ray per transport with the embedded
SmolLM2 (30 layers x 3 KV heads x 64, fp32: 720 KiB per 16-token block) and sends
prompts of several lengths one at a time. Prints one JSON line.

    python scripts/bench_handoff.py [--lengths 64 256 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["object_store", "grpc"])
    args = ap.parse_args()

    import ray

    from pdserve.cluster.config import ClusterConfig
    from pdserve.cluster.launcher import PDCluster
    from pdserve.cluster.router import RouterRequest
    from pdserve.workers.kv_transfer import pack_blocks, unpack_blocks
    from pdserve.workers.model_store import ensure_embedded_model
    from pdserve.workers.sampling_params import SamplingParams

    path = ensure_embedded_model()
    import torch

    # Pack + checksum + unpack alone (no transport), same cache shape.
    caches = [torch.randn(2, 128, 16, 3, 64) for _ in range(30)]
    t = time.perf_counter()
    payload = pack_blocks(caches, list(range(64)))
    t_pack = (time.perf_counter() - t) / 64
    t = time.perf_counter()
    unpack_blocks(caches, list(range(64, 128)), payload)
    t_unpack = (time.perf_counter() - t) / 64
    result: dict = {"bench": "handoff", "device": "cpu", "block_bytes": payload.data.shape[1],
                    "pack_ms_per_block": round(t_pack * 1e3, 3),
                    "verify_unpack_ms_per_block": round(t_unpack * 1e3, 3)}
    rng = random.Random(0)
    for transport in args.transports:
        cfg = ClusterConfig.from_dict({
            "transport": transport, "enable_prefix_caching": False,
            "prefill": {"replicas": 1, "num_cpus": 1, "num_blocks": 256},
            "decode": {"replicas": 1, "num_cpus": 1, "num_blocks": 256}})
        cluster = PDCluster.start(cfg, model_path=path,
                                  ray_init_kwargs={"num_cpus": 4, "log_to_driver": False})
        try:
            rows = []
            for n in args.lengths:
                for r in range(args.repeats + 1):  # the first of each length warms up
                    ids = [rng.randrange(100, 40000) for _ in range(n)]
                    rid = f"{transport}-{n}-{r}"
                    cluster.generate_sync(RouterRequest(rid, prompt_token_ids=tuple(ids),
                                                        params=SamplingParams(max_tokens=3, temperature=0,
                                                                              ignore_eos=True)))
                    if r:
                        rows.append((n, rid))
            timings = {t["request_id"]: t for t in ray.get(cluster.router.request_timings.remote())}
            (d_id,) = cluster.worker_ids("decode")
            log = {rid: (b, s) for rid, b, s, _ in ray.get(cluster.actor(d_id).handoff_log.remote())}
            per_len = {}
            for n in args.lengths:
                ts = [timings[rid] for m, rid in rows if m == n]
                hs = [log[rid] for m, rid in rows if m == n]
                blocks = -(-n // 16)
                pull = statistics.mean(s for _, s in hs)
                per_len[n] = {
                    "queue_ms": round(1e3 * statistics.mean(t["queue_s"] for t in ts), 1),
                    "prefill_ms": round(1e3 * statistics.mean(t["prefill_s"] for t in ts), 1),
                    "first_token_ms": round(1e3 * statistics.mean(t["first_token_s"] for t in ts), 1),
                    "handoff_ms": round(1e3 * pull, 1),
                    "second_token_ms": round(1e3 * statistics.mean(t["second_token_s"] for t in ts), 1),
                    "handoff_ms_per_block": round(1e3 * pull / blocks, 3),
                    "handoff_MB_s": round(hs[0][0] / pull / 1e6, 1),
                }
            result[transport] = per_len
        finally:
            cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
