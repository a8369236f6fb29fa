"""P/D disaggregation on two GPUs: the collective KV channel's handoff, then 1 prefill + 1 decode
worker against two colocated engines (each prefills and decodes; the router splits requests
between them) on the same two GPUs, under Poisson load.

(a) ``copy``: a GPU0 -> GPU1 ``copy_`` (the link's ceiling); ``pd_handoff``: per prompt length,
    the KV bytes, the channel's wire time (header in -> last byte in) and the whole handoff
    (reserve + ask + gather + transfer + release) as GB/s, and the handoff as % of TTFT.
(b) ``serve``: per config and request rate: request throughput, output tok/s, TTFT
    mean/p50/p99, TPOT mean/p50/p99 and p99 inter-token latency (``vllm bench serve``'s
    definitions, measured at the driver).

Random weights in a real shape (scripts/bench_gpu.py's builders), made in each worker
process by a Ray setup hook; token-id prompts, EOS ignored. One JSON line per result. About 5-7
minutes on the 2xH200 host with the defaults.

    python scripts/bench_pd_gpu.py                         # qwen2.5-1.5b shape, bf16
    python scripts/bench_pd_gpu.py --model-shape llama-3.1-8b --rates 2 4 8
    python scripts/bench_pd_gpu.py --smoke                 # CPU, gloo, a tiny model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SCRIPTS = str(Path(__file__).resolve().parent)
sys.path.insert(0, SCRIPTS)

import torch  # noqa: E402
from bench_gpu import SHAPES as GPU_SHAPES  # noqa: E402

SHAPES = {**GPU_SHAPES,
          "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                               intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                               rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151645),
          "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2)}


def _setup_worker() -> None:
    """Ray worker setup hook: the engine builds random weights from the folder's config.json
    (no checkpoint) and reads token ids (no tokenizer). The seed is fixed, so every worker
    holds the same weights."""
    sys.path.insert(0, SCRIPTS)  # pickled with the hook: the driver's value
    import bench_gpu

    from pdserve.workers import engine as engine_mod
    from pdserve.workers.models.loader import resolve_dtype

    def load(folder, dtype="float32", device="cpu", quantization=None):
        cfg = json.loads((Path(folder) / "config.json").read_text())
        return bench_gpu.random_model(cfg, resolve_dtype(dtype), str(device))

    engine_mod.load_model = load
    engine_mod.load_tokenizer = lambda folder: bench_gpu.StubTokenizer()


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    b.copy_(a)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    dt = time.perf_counter() - t
    del a, b
    torch.cuda.empty_cache()
    return nbytes * reps / dt


def cluster_config(args, pd: bool):
    from pdserve.cluster.config import ClusterConfig

    role = {"num_cpus": 1, "num_gpus": 0 if args.smoke else 1, "num_blocks": args.kv_blocks,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": max(args.max_num_batched_tokens, max(args.lengths))}
    return ClusterConfig.from_dict({
        "device": args.device, "dtype": args.dtype, "enable_prefix_caching": False,
        "max_model_len": max(args.lengths) + args.output_len + 16, "direct_max_tokens": 0,
        "transport": "collective" if pd else "object_store",
        "async_scheduling": False if args.no_overlap else None,
        "kv_push": not args.no_push,
        "prefill": {**role, "replicas": 1 if pd else 0},
        "decode": {**role, "replicas": 1 if pd else 2}})


async def one(cluster, rid: str, ids: list[int], out_len: int, delay: float):
    from pdserve.cluster.bench import Result
    from pdserve.cluster.router import RouterRequest
    from pdserve.workers.sampling_params import SamplingParams

    await asyncio.sleep(delay)
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    r = Result(prompt_tokens=len(ids))
    t0 = last = time.perf_counter()
    try:
        async for chunk in cluster.generate(RouterRequest(rid, prompt_token_ids=tuple(ids), params=sp)):
            now = time.perf_counter()
            if chunk.token_ids:
                if r.output_tokens == 0:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
                r.output_tokens += len(chunk.token_ids)
        r.latency, r.ok = time.perf_counter() - t0, True
    except Exception as e:  # reported in the summary, never hidden
        r.error = f"{type(e).__name__}: {e}"
    return r


async def gather(coros: list) -> list:
    return await asyncio.gather(*coros)


def prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab - 1) for _ in range(length)] for _ in range(n)]


def measure_handoff(cluster, args, vocab: int, copy_bw: float | None, rng: random.Random) -> None:
    import ray

    (d,) = cluster.worker_ids("decode")
    for n in args.lengths:
        rids = [f"h{n}-{i}" for i in range(args.handoff_repeats + 1)]  # the first warms up
        ttft = []
        for rid, ids in zip(rids, prompts(rng, len(rids), n, vocab), strict=True):
            ttft.append(asyncio.run(one(cluster, rid, ids, 2, 0.0)).ttft)
        stats = dict(ray.get(cluster.actor(d).handoffs.remote()))
        hs = [stats[rid] for rid in rids[1:]]
        nbytes = hs[0].bytes
        wire = statistics.median(h.wire_seconds for h in hs)
        total = statistics.median(h.seconds for h in hs)
        t_first = statistics.median(ttft[1:])
        # the router's view: first token (from the prefill worker) -> second (from the
        # decode worker): the call to the decode worker, the handoff and one decode step
        timings = {t["request_id"]: t for t in ray.get(cluster.router.request_timings.remote())}
        gap = statistics.median(timings[rid]["second_token_s"] - timings[rid]["first_token_s"]
                                for rid in rids[1:] if rid in timings) if timings else 0.0
        row = {"bench": "pd_handoff", "prompt_tokens": n, "kv_mb": round(nbytes / 1e6, 2),
               "via": sorted({h.via for h in hs}), "wire_ms": round(1e3 * wire, 3),
               "wire_gb_s": round(nbytes / max(wire, 1e-9) / 1e9, 2),
               "handoff_ms": round(1e3 * total, 3),
               "reserve_ms": round(1e3 * statistics.median(h.reserve_seconds for h in hs), 3),
               "handoff_gb_s": round(nbytes / max(total, 1e-9) / 1e9, 2),
               "ttft_ms": round(1e3 * t_first, 2), "handoff_pct_of_ttft": round(100 * total / t_first, 2),
               "first_to_second_token_ms": round(1e3 * gap, 3)}
        if copy_bw:
            row["wire_fraction_of_copy"] = round(nbytes / max(wire, 1e-9) / copy_bw, 3)
        print(json.dumps({**args.base, **row}), flush=True)


def serve(cluster, args, name: str, vocab: int, rng: random.Random, deadline: float) -> None:
    from pdserve.cluster.bench import arrival_gaps
    from pdserve.cluster.bench_stats import summarize

    # Warm-up: every length once, then staggered arrivals, so that prompts land beside running
    # decodes on every engine (Triton compiles a kernel variant per new shape on first use).
    for n in args.lengths:
        asyncio.run(one(cluster, f"{name}-warm-{n}", prompts(rng, 1, n, vocab)[0], 4, 0.0))
    warm = [one(cluster, f"{name}-warm-burst-{i}",
                prompts(rng, 1, args.lengths[i % len(args.lengths)], vocab)[0], 32, 0.02 * i)
            for i in range(8 * len(args.lengths))]
    asyncio.run(gather(warm))
    for rate in args.rates:
        if time.monotonic() > deadline:
            print(json.dumps({**args.base, "bench": "serve", "config": name, "rate": rate,
                              "skipped": "time budget spent"}), flush=True)
            continue
        n = args.num_requests
        lens = [args.lengths[i % len(args.lengths)] for i in range(n)]
        gaps = arrival_gaps(n, rate, 1.0, seed=int(rate * 1000))
        at = [sum(gaps[:i + 1]) for i in range(n)]

        reqs = [one(cluster, f"{name}-{rate}-{i}", prompts(rng, 1, lens[i], vocab)[0],
                    args.output_len, at[i]) for i in range(n)]
        t = time.perf_counter()
        results = asyncio.run(gather(reqs))
        s = summarize(results, time.perf_counter() - t, [50, 99], {})
        print(json.dumps({**args.base, "bench": "serve", "config": name, "rate": rate,
                          "num_requests": n, "completed": s["completed"], "failed": s["failed"],
                          "errors": s["errors"][:3],
                          "request_throughput": round(s["request_throughput"], 3),
                          "output_tok_s": round(s["output_throughput"], 1),
                          **{f"{k}_{m}_ms": round(s[k][m], 2) for k in ("ttft", "tpot")
                             for m in ("mean", "median", "p99")},
                          "itl_p99_ms": round(s["itl"]["p99"], 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    ap.add_argument("--num-requests", type=int, default=64, help="per rate")
    ap.add_argument("--handoff-repeats", type=int, default=5)
    ap.add_argument("--kv-blocks", type=int, default=8192, help="per worker, 16 tokens each")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip rates past this")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model, tiny load")
    ap.add_argument("--no-overlap", action="store_true", help="engines step synchronously")
    ap.add_argument("--no-push", action="store_true",
                    help="the decode worker asks for the KV (pull) instead of the prefill pushing it")
    ap.add_argument("--configs", nargs="+", choices=["pd", "colocated"], default=["pd", "colocated"])
    args = ap.parse_args()
    if args.smoke:
        args.model_shape, args.dtype, args.lengths, args.output_len = "tiny", "float32", [64, 256], 8
        args.rates, args.num_requests, args.handoff_repeats = [2.0, 4.0], 6, 2
        args.kv_blocks, args.max_num_seqs, args.max_num_batched_tokens = 512, 16, 512
        torch.set_num_threads(1)
    args.device = "cpu" if args.smoke else "cuda"
    deadline = time.monotonic() + args.budget_s

    import ray

    from pdserve.cluster.launcher import PDCluster

    shape = SHAPES[args.model_shape]
    folder = Path(tempfile.mkdtemp(prefix="pdbench-"))
    (folder / "config.json").write_text(json.dumps(shape))
    dev = "cpu" if args.smoke else torch.cuda.get_device_name()
    args.base = {"model_shape": args.model_shape, "dtype": args.dtype, "device": dev,
                 "input_lens": args.lengths, "output_len": args.output_len}
    copy_bw = None
    if not args.smoke:
        copy_bw = copy_bandwidth()
        print(json.dumps({**args.base, "bench": "copy", "gpu0_to_gpu1_gb_s": round(copy_bw / 1e9, 1)}),
              flush=True)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _setup_worker})
    rng = random.Random(0)
    try:
        for name in args.configs:
            t = time.perf_counter()
            cluster = PDCluster.start(cluster_config(args, name == "pd"), model_path=folder)
            print(f"# {name}: cluster up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            try:
                if name == "pd":
                    measure_handoff(cluster, args, shape["vocab_size"], copy_bw, rng)
                serve(cluster, args, name, shape["vocab_size"], rng, deadline)
            finally:
                cluster.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
