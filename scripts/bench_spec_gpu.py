"""Speculative decoding on the GPU: a Qwen2.5-0.5B-shaped draft for a Qwen2.5-7B-shaped target
(same vocabulary), and the n-gram proposer, against plain decoding of the same prompts in one
run. Greedy, EOS ignored, random weights in the real shapes. Prints one JSON line per setting.

    python scripts/bench_spec_gpu.py [--batch 1 4] [--k 4] [--output-len 128]

Random weights make two models agree by accident only, so acceptance is reported for two
constructions, both stated in the output:
  - ``independent``: target and draft drawn independently (acceptance ~0: the cost of
    speculating when it never pays, and what adaptive k saves of it);
  - ``aligned``: both models share one tied embedding / LM head and their layers are scaled
    down, so each predicts mostly from its residual stream and they agree often (an upper
    bound, not a quality claim).
From the measured costs of one target step with 1 and k + 1 query tokens per sequence and one
draft step, it also prints the standard expected speed-up at acceptance rates 0.5-0.9
(Leviathan et al.: E[tokens per round] = (1 - a^(k+1)) / (1 - a)).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import SHAPES, make_engine, random_model, release  # noqa: E402

TARGET = dict(model_type="qwen2", vocab_size=151936, hidden_size=3584, intermediate_size=18944,
              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
              tie_word_embeddings=False, eos_token_id=151645)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tiny(vocab: int, hidden: int, layers: int) -> dict:
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0)


def align(target, draft, layer_scale: float) -> None:
    """Share one embedding and LM head and shrink every layer's output projections."""
    with torch.no_grad():
        emb = draft.model.embed_tokens.weight
        if target.model.embed_tokens.weight.shape[1] != emb.shape[1]:
            # Different widths: project the draft's embedding up with a fixed random matrix.
            g = torch.Generator(device=emb.device).manual_seed(1)
            proj = torch.randn(emb.shape[1], target.model.embed_tokens.weight.shape[1],
                               device=emb.device, generator=g, dtype=emb.dtype) / emb.shape[1] ** 0.5
            big = emb @ proj
        else:
            big = emb
        target.model.embed_tokens.weight.copy_(big)
        target.lm_head.weight.copy_(big)
        for m in (target, draft):
            for name, p in m.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(layer_scale)


def run(eng, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]], int]:
    from pdserve.workers.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ids = [f"s{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, prompt_token_ids=p, params=sp)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    _sync()
    t0 = time.perf_counter()
    steps = eng.num_steps
    while eng.has_unfinished():
        for c in eng.step():
            out[c.request_id].extend(c.token_ids)
    return time.perf_counter() - t0, [out[r] for r in ids], eng.num_steps - steps


def step_costs(eng, prompts, k: int) -> dict:
    """Time of one target forward with 1 and with k + 1 query tokens per sequence (the
    verification shape), over sequences already prefilled; the KV they write is scratch."""
    from pdserve.workers.sampling_params import SamplingParams
    from pdserve.workers.scheduler import ScheduledSeq, SchedulerOutput

    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"c-{i}", prompt_token_ids=p + [1] * (k + 1), params=sp)
    while eng.scheduler.waiting:
        eng.step()
    seqs = list(eng.scheduler.running)
    res = {}
    for n in (1, k + 1):
        saved = [s.num_computed_tokens for s in seqs]
        for s in seqs:
            s.num_computed_tokens = s.num_tokens - n
        batch = SchedulerOutput([ScheduledSeq(s, n) for s in seqs])
        for _ in range(3):
            eng.runner.execute(batch)
        _sync()
        t = time.perf_counter()
        for _ in range(10):
            eng.runner.execute(batch)
        _sync()
        res[n] = (time.perf_counter() - t) / 10
        for s, c in zip(seqs, saved, strict=True):
            s.num_computed_tokens = c
    for s in seqs:
        eng.abort_request(s.request_id)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--layer-scale", type=float, default=0.1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-mb", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    args = ap.parse_args()
    global TARGET
    device = "cuda"
    draft_cfg = SHAPES["qwen2.5-0.5b"]
    if args.smoke:
        device, args.dtype = "cpu", "float32"
        TARGET, draft_cfg = _tiny(512, 128, 4), _tiny(512, 64, 2)
        args.kv_cache_mb = 64
        args.input_len, args.output_len, args.batch = 32, 16, [1, 2]
    from pdserve.workers import draft_model as draft_mod

    dtype = getattr(torch, args.dtype)
    target = random_model(TARGET, dtype, device)
    draft = random_model(draft_cfg, dtype, device)
    g = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "draft").mkdir()
    if args.smoke:
        torch.cuda.empty_cache = lambda: None  # release() calls it
    (tmp / "draft" / "config.json").write_text(json.dumps(draft_cfg))

    backend = "torch" if args.smoke else "auto"

    def engine(extra: dict, model=None, cfg_dict: dict | None = None, max_seqs: int = 0):
        folder = tmp / f"t-{time.monotonic_ns()}"
        folder.mkdir()
        with mock.patch.object(draft_mod, "load_model", return_value=draft):
            return make_engine(model or target, cfg_dict or TARGET, folder, args, backend,
                               max_seqs or max(args.batch), device=device, **extra)

    for construction in ("independent", "aligned"):
        if construction == "aligned":
            align(target, draft, args.layer_scale)
        for bsz in args.batch:
            prompts = [torch.randint(0, TARGET["vocab_size"], (args.input_len,), generator=g).tolist()
                       for _ in range(bsz)]
            plain = engine({})
            run(plain, prompts, 8)  # warm-up: kernels, graphs
            base_s, base_out, _ = run(plain, prompts, args.output_len)
            costs = step_costs(plain, prompts, args.k) if construction == "independent" else None
            release(plain)
            n_tok = sum(len(o) for o in base_out)
            row = {"bench": "spec_gpu", "construction": construction, "batch": bsz, "k": args.k,
                   "target_shape": "qwen2.5-7b", "draft_shape": "qwen2.5-0.5b",
                   "plain_tok_s": round(n_tok / base_s, 1),
                   "plain_tpot_ms": round(1e3 * base_s / args.output_len, 2)}
            for name, extra in (("ngram", {"speculative_method": "ngram"}),
                                ("draft", {"speculative_method": "draft",
                                           "speculative_draft_model": str(tmp / "draft")})):
                eng = engine({**extra, "num_speculative_tokens": args.k})
                run(eng, prompts, 8)
                s, out, steps = run(eng, prompts, args.output_len)
                row[name] = {"tok_s": round(n_tok / s, 1), "speedup": round(base_s / s, 3),
                             "acceptance_rate": round(eng.spec.acceptance_rate, 3),
                             "steps": steps, "identical_to_plain": out == base_out}
                release(eng)
            if costs is not None:
                t1, tk = costs[1], costs[args.k + 1]
                d1 = _draft_step(engine({}, draft, draft_cfg, bsz), bsz, args)
                row["target_step_ms"] = {"1": round(1e3 * t1, 2), str(args.k + 1): round(1e3 * tk, 2)}
                row["draft_step_ms"] = round(1e3 * d1, 2)
                row["modeled_speedup"] = {
                    str(a): round(((1 - a ** (args.k + 1)) / (1 - a)) * t1 / (tk + args.k * d1), 2)
                    for a in (0.5, 0.6, 0.7, 0.8, 0.9)}
            print(json.dumps(row), flush=True)


def _draft_step(eng, bsz: int, args) -> float:
    """One graphed decode step of the draft alone at this batch (what a proposal costs)."""
    prompts = [[1] * args.input_len for _ in range(bsz)]
    run(eng, prompts, 4)
    s, _, _ = run(eng, prompts, 64)
    release(eng)
    return s / 64


if __name__ == "__main__":
    main()
