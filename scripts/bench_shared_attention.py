"""Shared-prefix decode attention on the GPU, per layer: the per-row decode kernel against the
shared-prefix plan (its own split choice, a CUDA graph's grid, fixed split counts), over
random block tables where groups of rows share leading blocks. Prints one JSON line per case."""
from __future__ import annotations

import json
import random

import numpy as np
import torch
from triton.testing import do_bench_cudagraph

from pdserve.workers.kernels.paged_attention import decode_attention, num_splits_for
from pdserve.workers.kernels.shared_prefix import (
    SharedPrefix,
    flat_plan,
    plan_shared_prefix,
    rows_per_chunk,
)

dev, bf = "cuda", torch.bfloat16
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def case(name, hq, hkv, d, groups, per, shared, tail, bs=16):
    rng = random.Random(0)
    rows = groups * per
    lens = [shared + rng.randint(tail // 2, tail) for _ in range(rows)]
    need = [-(-n // bs) for n in lens]
    nb = groups * (shared // bs) + sum(need) + 16
    ids = iter(rng.sample(range(nb), nb))
    tables = np.zeros((rows, max(need)), dtype=np.int64)
    i = 0
    for _ in range(groups):
        common = [next(ids) for _ in range(shared // bs)]
        for _row in range(per):
            tables[i, :need[i]] = common + [next(ids) for _ in range(need[i] - len(common))]
            i += 1
    cache = torch.randn(2, nb, bs, hkv, d, dtype=bf, device=dev)
    q = torch.randn(rows, hq, d, dtype=bf, device=dev)
    t = torch.from_numpy(tables).to(dev)
    sl = torch.tensor(lens, device=dev)
    out = torch.empty_like(q)
    s = num_splits_for(rows, hkv, max(lens), SMS)
    res = {"case": name, "rows": rows, "splits": s}
    res["per_row_us"] = do_bench_cudagraph(lambda: decode_attention(q, cache, t, sl, 0.125, s, out=out),
                                           rep=100) * 1e3
    ref = out.clone()
    R = rows_per_chunk(hq // hkv, d)
    plan = plan_shared_prefix(tables, (np.array(lens) - 1) // bs, bs, R, lanes=SMS // hkv)
    res["plan"] = plan is not None
    if plan is None:
        plan = plan_shared_prefix(tables, (np.array(lens) - 1) // bs, bs, R, lanes=SMS // hkv, min_fraction=0)
    res["auto_splits"] = plan[3]
    own = num_splits_for(rows, hkv, int((np.array(lens) - plan[0]).max()), SMS)
    res["own_splits"] = own
    for label, chunks, P in [("auto", len(plan[2]), plan[3]), ("graph_layout", rows // 2, plan[3]),
                             ("P2", len(plan[2]), 2), ("P4", len(plan[2]), 4), ("P8", len(plan[2]), 8), ("P16", len(plan[2]), 16)]:
        flat = np.empty(SharedPrefix.size(rows, chunks, R), dtype=np.int64)
        flat_plan((*plan[:3], P), rows, chunks, flat)
        sp = SharedPrefix.view(torch.from_numpy(flat).to(dev), rows, chunks, R,
                               max(chunks, 2 * (SMS // hkv)) if label == "graph_layout" else chunks * P)
        for o in ((own, s) if label == "graph_layout" else (own,)):
            us = do_bench_cudagraph(lambda o=o, sp=sp: decode_attention(q, cache, t, sl, 0.125, o, out=out, shared=sp), rep=100) * 1e3
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            assert err < 1e-2, (label, err)
            res[f"{label}_own{o}_us"] = round(us, 1)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
    case("qwen0.5b 8x16 2048+128", 14, 2, 64, 8, 16, 2048, 170)
    case("qwen0.5b 2x64 2048+128", 14, 2, 64, 2, 64, 2048, 170)
    case("qwen0.5b 32x8 1024+256", 14, 2, 64, 32, 8, 1024, 256)
    case("qwen0.5b 64x2 512+64", 14, 2, 64, 64, 2, 512, 64)
    case("qwen0.5b 16x16 4096+64", 14, 2, 64, 16, 16, 4096, 64)
    case("llama8b 8x16 2048+128", 32, 8, 128, 8, 16, 2048, 170)
    case("llama8b 1x64 1024+512", 32, 8, 128, 1, 64, 1024, 512)
    case("qwen3-0.6b 8x16 2048+128", 16, 8, 128, 8, 16, 2048, 170)
