"""Tile sweeps of the Triton attention kernels, timed inside CUDA graphs (the host's launch
cost removed: a batch-1 decode layer is a few microseconds of GPU work). The figures of
BENCHMARKS.md, "GPU, session 12", come from these modes:

    python scripts/bench_attention_tiles.py decode-sweep    # split count x tile x warps x stages
    python scripts/bench_attention_tiles.py decode-ab       # the shipped choice vs the old fixed tile
    python scripts/bench_attention_tiles.py prefill-sweep   # BLOCK_M x BLOCK_N x warps x stages

Each line is one JSON object. bf16, block size 16, random block tables (decode-sweep also
contiguous ones).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from bench_gpu import graph_ms  # scripts/ is on the path when run as a script

from pdserve.workers.kernels import paged_attention as pa
from pdserve.workers.kernels import prefill_attention as pf

DECODE_SHAPES = [(1, 8, 4, 128, 8192), (1, 8, 4, 128, 32768), (4, 8, 4, 128, 32768),
                 (16, 8, 4, 128, 8192), (128, 2, 7, 64, 2240), (256, 2, 7, 64, 576),
                 (64, 8, 4, 128, 2048), (256, 8, 4, 128, 1568)]  # batch, KV heads, group, dim, ctx
AB_SHAPES = [(1, 8, 4, 128, 8192), (1, 8, 4, 128, 8200), (1, 8, 4, 128, 8320),
             (1, 8, 4, 128, 12000), (1, 8, 4, 128, 32768), (1, 8, 4, 128, 131072),
             (2, 8, 4, 128, 20000), (4, 8, 4, 128, 32768), (16, 8, 4, 128, 8192),
             (64, 8, 4, 128, 2048), (256, 8, 4, 128, 1568), (128, 2, 7, 64, 2240),
             (256, 2, 7, 64, 576)]
PREFILL_SHAPES = [(1, 8, 4, 128, 32768), (1, 8, 4, 128, 8192), (8, 8, 4, 128, 2048),
                  (32, 2, 7, 64, 512)]  # sequences, KV heads, group, dim, tokens each


def decode_with(q, cache, tables, lens, splits: int, block_n: int, warps: int, stages: int,
                out: torch.Tensor) -> None:
    """The decode kernel (no shared prefix) with explicit launch parameters."""
    pa.decode_attention(q, cache, tables, lens, q.shape[2] ** -0.5, splits, out=out,
                        tile=(block_n, warps, stages))


def decode_inputs(bsz: int, hkv: int, group: int, d: int, ctx: int, contiguous: bool = False):
    nblk = bsz * (-(-ctx // 16))
    cache = torch.randn(2, nblk, 16, hkv, d, dtype=torch.bfloat16, device="cuda")
    ids = torch.arange(nblk, device="cuda") if contiguous else torch.randperm(nblk, device="cuda")
    tables = ids.view(bsz, -1).to(torch.int32)
    q = torch.randn(bsz, hkv * group, d, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
    return q, cache, tables, lens, bsz * ctx * 2 * hkv * d * 2


def old_tile(d: int) -> tuple[int, int, int]:
    """The fixed decode tile before session 12: (BLOCK_N, warps, stages)."""
    return (64 if d <= 64 else 32), 4, 2


def decode_sweep(sms: int) -> None:
    for shape in DECODE_SHAPES:
        for contiguous in (False, True):
            print(json.dumps(_decode_sweep_shape(shape, contiguous, sms)), flush=True)


def _decode_sweep_shape(shape: tuple, contiguous: bool, sms: int) -> dict:
    q, cache, tables, lens, kv_bytes = decode_inputs(*shape, contiguous=contiguous)
    out = torch.empty_like(q)
    default = pa.num_splits_for(shape[0], shape[1], shape[4], sms)
    rows = []
    for splits, bn, warps, stages in itertools.product(
            sorted({default, 2 * default, 4 * default}), (32, 64, 128), (4, 8), (2, 3)):
        ms = graph_ms(lambda s=splits, b=bn, w=warps, st=stages:
                      decode_with(q, cache, tables, lens, s, b, w, st, out))
        rows.append({"splits": splits, "block_n": bn, "warps": warps, "stages": stages,
                     "us": round(ms * 1e3, 2), "tb_s": round(kv_bytes / ms / 1e9, 3)})
    old = next(r for r in rows if r["splits"] == default
               and (r["block_n"], r["warps"], r["stages"]) == old_tile(shape[3]))
    return {"shape": shape, "tables": "contiguous" if contiguous else "random", "old": old,
            "best": sorted(rows, key=lambda r: r["us"])[:4]}


def decode_ab(sms: int) -> None:
    for shape in AB_SHAPES:
        print(json.dumps(_decode_ab_shape(shape, sms)), flush=True)


def _decode_ab_shape(shape: tuple, sms: int) -> dict:
    q, cache, tables, lens, kv_bytes = decode_inputs(*shape)
    d = shape[3]
    splits = pa.num_splits_for(shape[0], shape[1], shape[4], sms)
    new_out, old_out = torch.empty_like(q), torch.empty_like(q)
    new = graph_ms(lambda: pa.decode_attention(q, cache, tables, lens, d ** -0.5, splits,
                                               out=new_out))
    old = graph_ms(lambda: decode_with(q, cache, tables, lens, splits, *old_tile(d), old_out))
    return {"shape": shape, "splits": splits, "old_us": round(old * 1e3, 2),
            "new_us": round(new * 1e3, 2), "speedup": round(old / new, 3),
            "new_tb_s": round(kv_bytes / new / 1e9, 2),
            "max_abs_diff": (new_out.float() - old_out.float()).abs().max().item()}


def prefill_sweep() -> None:
    shipped = pf.tile_config
    try:
        for shape in PREFILL_SHAPES:
            print(json.dumps(_prefill_shape(shape, shipped)), flush=True)
    finally:
        pf.tile_config = shipped


def _prefill_shape(shape: tuple, shipped) -> dict:
    nseq, hkv, group, d, ctx = shape
    nblk = nseq * (-(-ctx // 16))
    cache = torch.randn(2, nblk, 16, hkv, d, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(nblk, device="cuda").view(nseq, -1).to(torch.int32)
    q = torch.randn(nseq * ctx, hkv * group, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    qsl, lens = [i * ctx for i in range(nseq + 1)], [ctx] * nseq
    flops = 4 * nseq * ctx * ctx / 2 * hkv * group * d  # causal
    current = list(shipped(d, torch.bfloat16, ctx * group))
    rows = []
    for cfg in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
        pf.tile_config = lambda *_, c=cfg: c
        plan = pf.plan_prefill(qsl, lens, nseq, group, d, torch.bfloat16, torch.device("cuda"))
        ms = graph_ms(lambda p=plan: pf.prefill_attention(q, cache, tables, p, d ** -0.5, out),
                      calls=3, reps=5)
        rows.append({"tile": list(cfg), "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)})
    return {"shape": list(shape), "shipped": next(r for r in rows if r["tile"] == current),
            "best": sorted(rows, key=lambda r: r["ms"])[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["decode-sweep", "decode-ab", "prefill-sweep"])
    args = ap.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.mode == "decode-sweep":
        decode_sweep(sms)
    elif args.mode == "decode-ab":
        decode_ab(sms)
    else:
        prefill_sweep()


if __name__ == "__main__":
    main()
