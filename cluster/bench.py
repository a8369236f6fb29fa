"""``pdserve bench``: load a running server like ``vllm bench serve`` (random or shared-prefix
prompts, Poisson/gamma arrivals or fixed concurrency) and report TTFT, TPOT, ITL and E2E
latency, throughput and goodput, over OpenAI HTTP or gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.cluster.bench_stats import summarize, write_plot

BACKENDS = ("openai", "openai-chat", "grpc")
WORDS = ("time", "person", "year", "way", "day", "thing", "world", "life", "hand", "part",
         "child", "eye", "place", "work", "week", "case", "point", "number", "group", "problem",
         "fact", "river", "cloud", "stone", "garden", "music", "letter", "window", "forest",
         "market", "bridge", "answer")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_ids: tuple[int, ...] | None  # token-id prompts (openai completions, grpc)
    prompt_text: str | None  # text prompts (chat)
    output_len: int


@dataclass(slots=True)
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


# -- datasets ------------------------------------------------------------------------------------
def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Stay clear of the low ids, where special and byte tokens live.
    return [rng.randrange(1000, max(1001, vocab)) for _ in range(n)]


def _text(ids: list[int]) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


def random_dataset(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                   chat: bool, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lo_in, hi_in = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
        lo_out, hi_out = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
        ids = _ids(rng, max(1, rng.randint(lo_in, hi_in)), vocab)
        olen = max(1, rng.randint(lo_out, hi_out))
        out.append(BenchRequest(None if chat else tuple(ids), _text(ids) if chat else None, olen))
    return out


def shared_prefix_dataset(n: int, num_prefixes: int, prefix_len: int, suffix_len: int,
                          output_len: int, vocab: int, chat: bool, seed: int) -> list[BenchRequest]:
    """``num_prefixes`` groups of prompts sharing a ``prefix_len`` prefix (a system prompt, a
    document), each with its own ``suffix_len`` tail: the prefix cache's best case."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(max(1, num_prefixes))]
    out = []
    for i in range(n):
        ids = prefixes[i % len(prefixes)] + _ids(rng, suffix_len, vocab)
        out.append(BenchRequest(None if chat else tuple(ids), _text(ids) if chat else None,
                                output_len))
    rng.shuffle(out)
    return out


# -- clients -------------------------------------------------------------------------------------
async def _http_one(session: Any, url: str, headers: dict, req: BenchRequest, chat: bool,
                    model: str | None) -> Result:
    body: dict[str, Any] = {"max_tokens": req.output_len, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt_text}]
    else:
        body["prompt"] = list(req.prompt_ids or ())
    r = Result()
    t0 = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = obj["error"].get("message", "error")
                    return r
                if obj.get("usage"):
                    r.prompt_tokens = obj["usage"]["prompt_tokens"]
                    r.output_tokens = obj["usage"]["completion_tokens"]
                if obj.get("choices"):
                    now = time.perf_counter()
                    if r.ttft == 0.0:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
        r.latency = time.perf_counter() - t0
        r.ok = True
    except Exception as e:  # a failed request is a result, not the end of the run
        r.error = f"{type(e).__name__}: {e}"
    return r


async def _grpc_one(client: Any, req: BenchRequest) -> Result:
    from pdserve.cluster.grpc_client import sampling, token_request

    msg = token_request(list(req.prompt_ids or ()),
                        sampling(max_tokens=req.output_len, ignore_eos=True, temperature=0.0))
    r = Result()
    t0 = last = time.perf_counter()
    try:
        async for resp in client.generate(msg):
            now = time.perf_counter()
            if r.ttft == 0.0:
                r.ttft = now - t0
            else:
                r.itl.append(now - last)
            last = now
            if resp.finished:
                r.prompt_tokens = resp.usage.prompt_tokens
                r.output_tokens = resp.usage.completion_tokens
        r.latency = time.perf_counter() - t0
        r.ok = True
    except Exception as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


# -- the run -------------------------------------------------------------------------------------
def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between sends: gamma(shape=burstiness) with mean 1/rate (burstiness 1: Poisson)."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


class Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def run(args: argparse.Namespace, api_key: str | None) -> dict:
    chat = args.backend == "openai-chat"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    send, close, vocab, model = await _connect(args, api_key, headers, chat)
    if args.dataset == "random":
        reqs = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                              args.random_range_ratio, vocab, chat, args.seed)
    else:
        reqs = shared_prefix_dataset(args.num_prompts, args.num_prefixes, args.prefix_len,
                                     args.suffix_len, args.random_output_len, vocab, chat, args.seed)
    gaps = arrival_gaps(len(reqs), args.request_rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
    progress = Progress(len(reqs), not args.disable_progress)

    async def one(req: BenchRequest) -> Result:
        async with limit:
            res = await send(req)
        progress.step()
        return res

    tasks = []
    start = time.perf_counter()
    try:
        for req, gap in zip(reqs, gaps, strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
    finally:
        await close()
    duration = time.perf_counter() - start
    summary = summarize(results, duration, args.percentiles, _slos(args.goodput))
    summary["config"] = {k: (v if v != float("inf") else "inf") for k, v in vars(args).items()
                         if k not in ("func", "api_key") and isinstance(v, (int, float, str, list, type(None)))}
    summary["config"]["model"] = model
    summary["requests"] = [asdict(r) for r in results]
    return summary


async def _connect(args: argparse.Namespace, api_key: str | None, headers: dict, chat: bool):
    if args.backend == "grpc":
        from pdserve.cluster.grpc_client import AsyncClient, Target

        client = AsyncClient(Target(args.address, api_key, tls=args.tls, ca_cert=args.ca_cert,
                                    client_cert=args.client_cert, client_key=args.client_key))
        info = await client.model_info()

        async def send(req: BenchRequest) -> Result:
            return await _grpc_one(client, req)

        return send, client.close, info.vocab_size, info.model
    import ssl

    import aiohttp

    ctx = None
    if args.base_url.startswith("https"):
        ctx = ssl.create_default_context(cafile=args.ca_cert)
        if args.client_cert:
            ctx.load_cert_chain(args.client_cert, args.client_key)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ctx),
                                    timeout=aiohttp.ClientTimeout(total=None))
    base = args.base_url.rstrip("/")
    async with session.get(f"{base}/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        card = (await resp.json())["data"][0]
    url = f"{base}/v1/{'chat/completions' if chat else 'completions'}"

    async def send(req: BenchRequest) -> Result:
        return await _http_one(session, url, headers, req, chat, card["id"])

    return send, session.close, int(card.get("vocab_size", 32000)), card["id"]


def _slos(specs: list[str] | None) -> dict[str, float]:
    slos = {}
    for spec in specs or ():
        name, _, ms = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise SystemExit(f"--goodput: expected ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        slos[name] = float(ms) / 1000.0
    return slos


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="openai")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="HTTP backends")
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC backend")
    p.add_argument("--api-key", default=None)
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca-cert", default=None)
    p.add_argument("--client-cert", default=None)
    p.add_argument("--client-key", default=None)
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: prefix groups")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens shared")
    p.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: tokens per prompt")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrivals: 1 Poisson, <1 burstier, >1 steadier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", type=lambda s: [float(x) for x in s.split(",")],
                   default=[50.0, 90.0, 99.0])
    p.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--result-file", default=None, help="write the JSON result here")
    p.add_argument("--plot", default=None, help="PNG of the latency distributions (matplotlib)")
    p.add_argument("--disable-progress", action="store_true")


def run_cli(args: argparse.Namespace, api_key: str | None) -> int:
    if args.burstiness <= 0 or args.request_rate <= 0:
        raise SystemExit("--burstiness and --request-rate must be > 0")
    summary = asyncio.run(run(args, api_key))
    print(format_summary(summary))
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(summary, indent=2))
    if args.plot and not write_plot(summary, args.plot):
        print("pdserve bench: matplotlib is not installed; no plot", file=sys.stderr)
    return 0 if summary["completed"] else 1


def format_summary(s: dict) -> str:
    lines = ["=" * 50, f"{'Successful requests:':<40}{s['completed']}",
             f"{'Failed requests:':<40}{s['failed']}",
             f"{'Benchmark duration (s):':<40}{s['duration']:.2f}",
             f"{'Total input tokens:':<40}{s['total_input_tokens']}",
             f"{'Total generated tokens:':<40}{s['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:.2f}",
             f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:.2f}"]
    if s.get("goodput") is not None:
        lines.append(f"{'Request goodput (req/s):':<40}{s['goodput']:.2f}")
    for m in ("ttft", "tpot", "itl", "e2el"):
        lines.append(f"{'-' * 15}{m.upper():^20}{'-' * 15}")
        for k, v in s[m].items():
            lines.append(f"{k + ' (ms):':<40}{v:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
