"""GPU benchmarks with random weights in real model shapes (no checkpoint, no tokenizer needed).

Prints one JSON line per measurement:

- ``offline``: N requests of fixed input/output length (EOS ignored), output tokens/s of
  pdserve vs transformers ``generate`` on the same weights and prompts, in the same run;
- ``latency``: batch-1 TTFT and TPOT against the bandwidth floor (weights + KV read per token).

    python scripts/bench_gpu.py --model-shape qwen2.5-0.5b --mode offline   # vs HF generate
    python scripts/bench_gpu.py --model-shape llama-3.1-8b --mode latency --skip-hf
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151645),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       attention_bias=False, eos_token_id=151645),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128001),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PEAK_BW = 3.0e12  # measured device-to-device copy on the H100 (PERFORMANCE.md)


class StubTokenizer:
    """Random-token benchmarks give token ids and read token ids: no text either way."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError("prompts are token ids here")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def random_model(cfg_dict: dict, dtype: torch.dtype, device: str):
    """Our CausalLM with random weights made on the device (HF names, so HF can load them)."""
    from pdserve.workers.models.config import ModelConfig
    from pdserve.workers.models.decoder import CausalLM
    from pdserve.workers.models.layers import rope_inv_freq

    cfg = ModelConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()


def make_engine(model, cfg_dict: dict, folder: Path, args, variant: str, max_num_seqs: int,
                prefix_caching: bool = False, device: str = "cuda", **extra):
    """variant: an attention backend name, with "-eager" for no CUDA graphs, "-sync" for no
    overlapped scheduling and/or "-unfused" for separate q/k/v and gate/up projections; ``extra``: more EngineConfig fields (speculation, ...)."""
    from pdserve.workers import engine as engine_mod
    from pdserve.workers.config import EngineConfig

    (folder / "config.json").write_text(json.dumps(cfg_dict))
    config = EngineConfig(model=str(folder), device=device, dtype=args.dtype,
                          max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max(args.max_num_batched_tokens, args.input_len),
                          kv_cache_memory_mb=args.kv_cache_mb,
                          max_model_len=max(4096, args.input_len + args.output_len),
                          enable_prefix_caching=prefix_caching,
                          attention_backend=variant.split("-")[0],
                          cuda_graphs="-eager" not in variant,
                          async_scheduling="-sync" not in variant, **extra)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(engine_mod, "load_model", return_value=model))
        if "-unfused" in variant:  # separate q/k/v and gate/up GEMMs, for an A/B in one run
            for layer in model.model.layers:
                layer.self_attn.qkv = layer.mlp.gate_up = None
            stack.enter_context(mock.patch.object(type(model), "fuse_projections", lambda self: None))
        return engine_mod.LLMEngine(config, model_path=folder, tokenizer=StubTokenizer())


def release(eng) -> None:
    eng.runner.kv_caches.clear()  # the engine may sit in a reference cycle: free its KV now
    gc.collect()
    torch.cuda.empty_cache()


def bench_kernel(args) -> None:
    """The decode kernel alone vs the torch reference path: time and KV bandwidth."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for shape in [(256, 2, 7, 64, 576), (128, 2, 7, 64, 2240), (64, 8, 4, 128, 2048),
                  (1, 8, 4, 128, 576), (1, 8, 4, 128, 8192), (1, 8, 4, 128, 32768),
                  (32, 8, 4, 128, 8192)]:
        print(json.dumps(_bench_kernel_shape(*shape, sms)), flush=True)


def graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Median ms of one ``fn()`` replayed from a CUDA graph of ``calls`` of them: the GPU's
    time without the host's launch cost (which ``do_bench`` includes, and which dominates
    kernels of a few microseconds)."""
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _bench_kernel_shape(bsz: int, hkv: int, group: int, d: int, ctx: int, sms: int) -> dict:
    from triton.testing import do_bench

    from pdserve.workers.attention import AttentionMetadata, TorchAttention
    from pdserve.workers.kernels.paged_attention import decode_attention, num_splits_for

    bs = 16
    nblk = bsz * (-(-ctx // bs))
    cache = torch.randn(2, nblk, bs, hkv, d, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(nblk, device="cuda").view(bsz, -1)
    lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(bsz, hkv * group, d, dtype=torch.bfloat16, device="cuda")
    splits = num_splits_for(bsz, hkv, ctx, sms)
    out = torch.empty_like(q)
    ms = graph_ms(lambda: decode_attention(q, cache, tables, lens, d ** -0.5, splits, out=out))
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device="cuda"),
                             query_start_loc=list(range(bsz + 1)), seq_lens=[ctx] * bsz,
                             num_prefills=0, block_tables=tables, block_size=bs,
                             seq_lens_tensor=lens)
    ref = TorchAttention()
    empty = torch.zeros(0, hkv, d, dtype=torch.bfloat16, device="cuda")
    ref_ms = do_bench(lambda: ref.forward(q, empty, empty, cache, meta, d ** -0.5),
                      warmup=25, rep=200, return_mode="median")
    kv_bytes = bsz * ctx * 2 * hkv * d * 2
    return {"bench": "decode_kernel", "device": torch.cuda.get_device_name(), "batch": bsz,
            "kv_heads": hkv, "group": group, "head_dim": d, "ctx": ctx, "splits": splits,
            "triton_us_in_graph": round(ms * 1e3, 1), "torch_ref_us_eager": round(ref_ms * 1e3, 1),
            "kv_gb_s": round(kv_bytes / ms / 1e6, 1),
            "fraction_of_3tb_s": round(kv_bytes / ms / 1e6 / 3000, 3)}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def run_offline(eng, prompts: list[list[int]], output_len: int | list[int]) -> dict:
    """All requests at once; wall time, and how it splits between prefill and decode steps.
    ``output_len``: one length for all, or one per prompt."""
    from pdserve.workers.sampling_params import SamplingParams

    lens = output_len if isinstance(output_len, list) else [output_len] * len(prompts)
    for i, (p, n) in enumerate(zip(prompts, lens, strict=True)):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        eng.add_request(f"b{i}-{time.monotonic_ns()}", prompt_token_ids=p, params=sp)
    torch.cuda.synchronize()
    with frozen_heap():
        return _drive(eng)


@contextlib.contextmanager
def frozen_heap():
    """What lives now is out of the cyclic GC's scans while timing (as a serving worker
    freezes its heap after start-up: workers/actors.py); thawed after, so that engines can
    be released. Both peers are timed this way."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _drive(eng) -> dict:
    t0 = time.perf_counter()
    prefill_s = decode_s = 0.0
    decode_steps = 0
    decode_rows = 0
    while eng.has_unfinished():
        decode_only = not eng.scheduler.waiting and all(
            s.num_tokens - s.num_computed_tokens == 1 for s in eng.scheduler.running)
        nrun = len(eng.scheduler.running)
        t = time.perf_counter()
        eng.step()  # ends in a host copy of tokens (overlapped: the previous step's)
        dt = time.perf_counter() - t
        if decode_only:
            decode_s += dt
            decode_steps += 1
            decode_rows += nrun
        else:
            prefill_s += dt
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prefill_steps_s": prefill_s, "decode_steps_s": decode_s,
            "decode_steps": decode_steps,
            "decode_step_ms": 1e3 * decode_s / max(1, decode_steps),
            "decode_batch_mean": decode_rows / max(1, decode_steps)}


def hf_model(model, cfg_dict: dict, dtype):
    """The same weights in transformers' own model class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in cfg_dict.items() if k != "model_type"}
    hcfg = AutoConfig.for_model(cfg_dict["model_type"], **kw)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hcfg, dtype=dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("rotary" not in m and m != "lm_head.weight" for m in missing):
        print(f"HF peer: missing {missing[:5]}, unexpected {unexpected[:5]}", file=sys.stderr)
    return hf.eval()


def hf_offline(hf, prompts, output_len: int | list[int], batch: int) -> float:
    """Wall seconds of HF ``generate`` over all prompts in batches of ``batch``. With several
    lengths, prompts are sorted by length and left-padded, and each batch runs to its
    longest requested output (only the requested tokens are counted as output)."""
    lens = output_len if isinstance(output_len, list) else [output_len] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), lens[i]))

    def gen(rows: list[int], cap: int | None = None) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            width = max(len(prompts[i]) for i in part)
            ids = torch.zeros(len(part), width, dtype=torch.long, device="cuda")
            mask = torch.zeros_like(ids)
            for r, i in enumerate(part):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            n_new = cap or max(lens[i] for i in part)
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, do_sample=False,
                            max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    # Warm-up: the whole workload once, untimed, as our engine gets (run_offline before the
    # timed run). A short warm-up left HF's first full run cold: its caching allocator grows
    # for every new cache size, and that run measured 2.9k tok/s against 8-12k once warm.
    gen(order)
    with frozen_heap():  # timed like our engine (run_offline)
        return gen(order)


def hf_generate_batch(hf, prompts, output_len: int | list[int]) -> float | None:
    """Wall seconds of transformers' continuous-batching ``generate_batch`` (one length for
    all: its config has one max_new_tokens), or None where the installed version lacks it."""
    from transformers import GenerationConfig

    if not hasattr(hf, "generate_batch"):
        return None
    n_new = output_len if isinstance(output_len, int) else max(output_len)
    cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():  # its cache is built outside inference mode
        hf.generate_batch(prompts[:8], generation_config=cfg)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate_batch(prompts, generation_config=cfg)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    done = sum(len(getattr(o, "generated_tokens", None) or []) for o in out.values())
    if done < len(prompts) * n_new:
        raise RuntimeError(f"generate_batch produced {done} of {len(prompts) * n_new} tokens")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--mode", choices=["offline", "latency", "both", "kernel", "shared-prefix"],
                    default="offline")
    ap.add_argument("--groups", type=int, default=8, help="shared-prefix: system prompts")
    ap.add_argument("--per-group", type=int, default=16, help="shared-prefix: questions each")
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--workload", choices=["fixed", "nanovllm"], default="fixed",
                    help="nanovllm: input and output lengths uniform in [100, 1024], seed 0")
    ap.add_argument("--hf-generate-batch", action="store_true",
                    help="also time transformers' continuous-batching generate_batch")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--kv-cache-mb", type=int, default=8192)
    # vLLM's offline default on GPUs of >= 70 GiB; a prefill step's ~190 kernel launches
    # are then paid once per 16K tokens (see BENCHMARKS.md, session 5)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--backends", default="auto",
                    help="comma list of variants, e.g. auto,auto-sync,auto-eager,torch (A/B in one run)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="latency mode: runs, median reported")
    ap.add_argument("--rounds", type=int, default=1,
                    help="offline mode: rounds of (ours, HF generate) alternating on one engine and "
                         "one HF model; medians and per-round ratios reported (HF moves +-20%% "
                         "between runs on one machine, so one pair is a noisy ratio)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of decode steps here")
    args = ap.parse_args()
    if args.mode == "kernel":
        bench_kernel(args)
        return

    cfg_dict = SHAPES[args.model_shape]
    dtype = DTYPES[args.dtype]
    model = random_model(cfg_dict, dtype, "cuda")
    wbytes = weight_bytes(model)
    c = model.config
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    dev = torch.cuda.get_device_name()
    rng = random.Random(0)
    if args.workload == "nanovllm":  # nano-vllm's bench.py setup
        in_lens = [rng.randint(100, 1024) for _ in range(args.num)]
        out_lens: int | list[int] = [rng.randint(100, 1024) for _ in range(args.num)]
    else:
        in_lens, out_lens = [args.input_len] * args.num, args.output_len
    prompts = [[rng.randrange(1000, c.vocab_size - 1000) for _ in range(n)] for n in in_lens]
    n_out = sum(out_lens) if isinstance(out_lens, list) else args.num * out_lens
    base = {"model_shape": args.model_shape, "dtype": args.dtype, "device": dev,
            "workload": args.workload, "input_tokens": sum(in_lens), "output_tokens": n_out,
            "weights_gb": round(wbytes / 1e9, 3)}
    tmp = Path(tempfile.mkdtemp())
    if args.mode == "shared-prefix":
        shared_prefix(model, cfg_dict, tmp, args, base, rng)
        return

    if args.mode == "offline" and args.rounds > 1 and not args.skip_hf:
        offline_rounds(model, cfg_dict, tmp, args, base, prompts, out_lens, n_out, dtype)
        return

    for backend in args.backends.split(","):
        if args.mode in ("offline", "both"):
            eng = make_engine(model, cfg_dict, tmp, args, backend, args.num)
            run_offline(eng, prompts, out_lens)  # warm-up: kernels compile, allocator fills
            r = run_offline(eng, prompts, out_lens)
            tok_s = n_out / r["wall_s"]
            # Decode floor per step: weights once + the batch's mean KV length.
            mean_ctx = (sum(in_lens) + n_out / 2) / args.num
            floor_ms = 1e3 * (wbytes + args.num * mean_ctx * kv_tok) / PEAK_BW
            out = {**base, "bench": "offline", "backend": type(eng.runner.backend).__name__,
                   "variant": backend, "cuda_graphs": eng.runner.graphs is not None,
                   "num": args.num, "ours_tok_s": round(tok_s, 1),
                   "wall_s": round(r["wall_s"], 3), "prefill_steps_s": round(r["prefill_steps_s"], 3),
                   "decode_steps_s": round(r["decode_steps_s"], 3), "decode_steps": r["decode_steps"],
                   "decode_step_ms": round(r["decode_step_ms"], 3),
                   "decode_batch_mean": round(r["decode_batch_mean"], 1),
                   "decode_step_floor_ms": round(floor_ms, 3),
                   "prefill_tok_s": round(sum(in_lens) / max(r["prefill_steps_s"], 1e-9))}
            if args.profile and backend == args.backends.split(",")[0]:
                profile_decode(eng, prompts, args, Path(args.profile))
            release(eng)
            print(json.dumps(out), flush=True)
        if args.mode in ("latency", "both"):
            eng = make_engine(model, cfg_dict, tmp, args, backend, 1)
            ttft, tpot = [], []
            from pdserve.workers.sampling_params import SamplingParams

            sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
            for rep in range(args.repeats + 1):
                eng.add_request(f"lat{rep}", prompt_token_ids=prompts[rep % len(prompts)], params=sp)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                t1 = None  # when the first token reaches the host (a step later when overlapped)
                while eng.has_unfinished():
                    chunks = eng.step()
                    if t1 is None and any(c.token_ids for c in chunks):
                        t1 = time.perf_counter()
                t2 = time.perf_counter()
                if rep:  # the first is the warm-up
                    ttft.append(t1 - t0)
                    tpot.append((t2 - t1) / (args.output_len - 1))
            mean_ctx = args.input_len + args.output_len / 2
            floor = (wbytes + mean_ctx * kv_tok) / PEAK_BW
            med = statistics.median(tpot)
            print(json.dumps({**base, "bench": "latency", "backend": type(eng.runner.backend).__name__,
                              "variant": backend, "cuda_graphs": eng.runner.graphs is not None,
                              "batch": 1, "ttft_ms": round(1e3 * statistics.median(ttft), 2),
                              "tpot_ms": round(1e3 * med, 3), "tpot_floor_ms": round(1e3 * floor, 3),
                              "fraction_of_floor": round(floor / med, 3),
                              "tok_s": round(1 / med, 1)}), flush=True)
            release(eng)

    if args.mode in ("offline", "both") and not args.skip_hf:
        hf = hf_model(model, cfg_dict, dtype)
        hf_s = hf_offline(hf, prompts, out_lens, args.hf_batch)
        print(json.dumps({**base, "bench": "offline", "backend": "hf_generate", "num": args.num,
                          "hf_batch": args.hf_batch, "hf_tok_s": round(n_out / hf_s, 1),
                          "wall_s": round(hf_s, 3)}), flush=True)
        if args.hf_generate_batch:
            try:
                gb_s = hf_generate_batch(hf, prompts, out_lens)
            except Exception as e:  # a peer's failure is reported, not fatal
                print(json.dumps({**base, "backend": "hf_generate_batch", "error": repr(e)[:300]}))
            else:
                n_gb = args.num * (out_lens if isinstance(out_lens, int) else max(out_lens))
                print(json.dumps({**base, "bench": "offline", "backend": "hf_generate_batch",
                                  "num": args.num, "available": gb_s is not None,
                                  "hf_tok_s": round(n_gb / gb_s, 1) if gb_s else None,
                                  "note": "one max_new_tokens for all requests",
                                  "wall_s": round(gb_s, 3) if gb_s else None}), flush=True)


def offline_rounds(model, cfg_dict: dict, tmp: Path, args, base: dict, prompts, out_lens,
                   n_out: int, dtype) -> None:
    """Our engine (the first backend) and HF ``generate`` alternate for ``args.rounds`` rounds
    on the same prompts; one engine and one HF model for all rounds, both warmed up first."""
    backend = args.backends.split(",")[0]
    eng = make_engine(model, cfg_dict, tmp, args, backend, args.num)
    run_offline(eng, prompts, out_lens)  # warm-up: kernels compile, allocator fills
    hf = hf_model(model, cfg_dict, dtype)
    ours, theirs, steps = [], [], []
    for _ in range(args.rounds):
        r = run_offline(eng, prompts, out_lens)
        ours.append(n_out / r["wall_s"])
        steps.append(r["decode_step_ms"])
        theirs.append(n_out / hf_offline(hf, prompts, out_lens, args.hf_batch))
    release(eng)
    med_ours, med_hf = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({**base, "bench": "offline_rounds", "variant": backend, "num": args.num,
                      "rounds": args.rounds, "ours_tok_s_median": round(med_ours, 1),
                      "hf_tok_s_median": round(med_hf, 1),
                      "ratio_of_medians": round(med_ours / med_hf, 2),
                      "ratio_per_round": [round(a / b, 2) for a, b in zip(ours, theirs, strict=True)],
                      "ours_tok_s": [round(x) for x in ours], "hf_tok_s": [round(x) for x in theirs],
                      "decode_step_ms": [round(x, 3) for x in steps]}), flush=True)


def shared_prefix(model, cfg_dict: dict, tmp: Path, args, base: dict, rng: random.Random) -> None:
    """SGLang's generated-shared-prefix workload with prefix caching on and off, and the
    caching's overhead when nothing hits (same lengths, all-unique prompts)."""
    vocab = model.config.vocab_size

    def toks(n: int) -> list[int]:
        return [rng.randrange(1000, vocab - 1000) for _ in range(n)]

    def workload() -> list[list[int]]:
        systems = [toks(args.system_len) for _ in range(args.groups)]
        return [s + toks(args.question_len) for s in systems for _ in range(args.per_group)]

    n = args.groups * args.per_group
    warm = workload()
    # One engine per setting, kept for all repeats; every repeat runs fresh prompts (the same
    # ones for caching on and off, interleaved), so a repeat never hits an earlier one's blocks.
    # ("shared", "per-row"): caching on, shared-prefix attention off (each row reads its
    # whole prefix), to show what that kernel adds
    engines = {}
    for name, caching in (("shared", True), ("shared", False), ("unique", True), ("unique", False),
                          ("shared", "per-row")):
        eng = make_engine(model, cfg_dict, tmp, args, "auto", n, prefix_caching=bool(caching),
                          shared_prefix_attention=caching != "per-row")
        run_offline(eng, warm, args.output_len)  # warm-up on other prompts
        engines[(name, caching)] = eng
    runs: dict = {k: [] for k in engines}
    phases: dict = {k: [] for k in engines}  # (prefill steps s, decode step ms) per run
    # Each repeat runs every engine twice, in mirrored order (A B C C B A), so that a drift
    # of the machine within the repeat (the GPU's clocks move by ~10% between back-to-back
    # runs of the same work) weighs on each setting alike; the caching-off and caching-on
    # runs of the 0%-hit pair sit side by side. A setting's figure for the repeat is its
    # two runs' total time.
    shared_keys = [k for k in engines if k[0] == "shared"]
    unique_keys = [k for k in engines if k[0] == "unique"]
    for rep in range(args.repeats):
        # fresh prompts for each pass (the same ones for every setting), so that no run hits
        # an earlier run's blocks
        passes = [{"shared": workload(),
                   "unique": [toks(args.system_len + args.question_len) for _ in range(n)]}
                  for _ in range(2)]
        flip = rep % 2 == 1  # which setting goes first alternates too
        walls: dict = {k: 0.0 for k in engines}
        for keys in (shared_keys, unique_keys):
            order = keys[::-1] if flip else keys
            for i, key in enumerate(order + order[::-1]):
                r = run_offline(engines[key], passes[i // len(order)][key[0]], args.output_len)
                walls[key] += r["wall_s"]
                phases[key].append((r["prefill_steps_s"], r["decode_step_ms"]))
        for key, wall in walls.items():
            runs[key].append(2 * n * args.output_len / wall)
    res = {k: statistics.median(v) for k, v in runs.items()}
    ratios = [on / off for on, off in zip(runs[("unique", True)], runs[("unique", False)], strict=True)]
    print(json.dumps({**base, "bench": "shared_prefix", "groups": args.groups,
                      "per_group": args.per_group, "system_len": args.system_len,
                      "question_len": args.question_len, "output_len": args.output_len,
                      "shared_caching_on_tok_s": round(res[("shared", True)], 1),
                      "shared_caching_off_tok_s": round(res[("shared", False)], 1),
                      "speedup": round(res[("shared", True)] / res[("shared", False)], 2),
                      "shared_per_row_attention_tok_s": round(res[("shared", "per-row")], 1),
                      "speedup_per_row_attention": round(res[("shared", "per-row")]
                                                         / res[("shared", False)], 2),
                      "shared_prefix_replays": {str(k[1]): e.runner.graphs.shared_replays
                                                for k, e in engines.items() if k[0] == "shared"
                                                and e.runner.graphs is not None},
                      # blocks taken while another request filled them in the same step
                      "blocks_ridden": {f"{k[0]}-{k[1]}": getattr(e.block_manager, "blocks_ridden", 0)
                                        for k, e in engines.items()},
                      # (prefill phase s, decode step ms): caching on, off, on with per-row attention
                      "shared_phases": {str(k[1]): [round(statistics.median(x[i] for x in phases[k]), 4)
                                                    for i in (0, 1)]
                                        for k in phases if k[0] == "shared"},
                      "zero_hit_on_tok_s": round(res[("unique", True)], 1),
                      "zero_hit_off_tok_s": round(res[("unique", False)], 1),
                      "zero_hit_overhead": round(1 - res[("unique", True)] / res[("unique", False)], 4),
                      "zero_hit_on_off_ratio_per_repeat": [round(x, 4) for x in ratios],
                      # where the 0%-hit difference sits: prefill phase s, decode step ms
                      "zero_hit_phases_on": [statistics.median(x[i] for x in phases[("unique", True)])
                                             for i in (0, 1)],
                      "zero_hit_phases_off": [statistics.median(x[i] for x in phases[("unique", False)])
                                              for i in (0, 1)],
                      "repeats": args.repeats, "runs_per_repeat": 2,
                      "order": "A B C C B A within each repeat, A alternating", "statistic": "median"}),
          flush=True)
    for eng in engines.values():
        release(eng)


def profile_decode(eng, prompts, args, path: Path) -> None:
    """Profile the prefill steps, then a few decode-only steps at full batch: GPU kernel
    time vs host time."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from pdserve.workers.sampling_params import SamplingParams

    def prefilling() -> bool:
        return bool(eng.scheduler.waiting) or any(s.num_tokens - s.num_computed_tokens > 1
                                                  for s in eng.scheduler.running)

    def drain() -> None:
        for rid in list(eng.requests):
            eng.abort_request(rid)
        while eng.has_unfinished():
            eng.step()

    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):  # the prefill phase's host time, by Python function
        eng.add_request(f"c{i}", prompt_token_ids=p, params=sp)
    torch.cuda.synchronize()
    pre_prof = cProfile.Profile()
    pre_prof.enable()
    while prefilling():
        eng.step()
    torch.cuda.synchronize()
    pre_prof.disable()
    pre_py = io.StringIO()
    pstats.Stats(pre_prof, stream=pre_py).sort_stats("tottime").print_stats(30)
    drain()
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", prompt_token_ids=p, params=sp)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while prefilling():
            eng.step()
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t
    prefill_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        eng.step()
    plain_ms = (time.perf_counter() - t) / 10 * 1e3
    cpu_prof = cProfile.Profile()
    cpu_prof.enable()
    for _ in range(10):
        eng.step()
    cpu_prof.disable()
    py = io.StringIO()
    pstats.Stats(cpu_prof, stream=py).sort_stats("tottime").print_stats(25)
    pstats.Stats(cpu_prof, stream=py).sort_stats("cumulative").print_stats(40)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 5
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"prefill phase under the profiler: {prefill_s * 1e3:.1f} ms\n\n{prefill_table}\n\n"
                    f"wall per decode step: {plain_ms:.3f} ms; under the profiler: {wall * 1e3:.2f} ms\n\n"
                    f"{table}\n\nby host time:\n{cpu_table}\n\nPython, 10 steps:\n{py.getvalue()}\n\n"
                    f"Python, the prefill phase:\n{pre_py.getvalue()}\n")
    drain()


if __name__ == "__main__":
    main()
