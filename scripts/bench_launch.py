"""Host time of one kernel launch by path, on a CUDA GPU (trivial GPU work, so the host's
cost is what is timed): a PyTorch op, Triton's ``kernel[grid]``, the compiled launcher that
``workers/kernels/launch.py`` calls directly, and our fused RMSNorm wrapper. Prints one JSON
line of microseconds per call.

    python scripts/bench_launch.py
"""

from __future__ import annotations

import json
import time

import torch
from triton.runtime import driver

from pdserve.workers.kernels import fused


def per_call_us(fn, n: int = 3000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return round(dt * 1e6, 2)


def main() -> None:
    x = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.ones(896, device="cuda", dtype=torch.bfloat16)
    y, ro = torch.empty_like(x), torch.empty_like(x)
    jit = fused._rms_norm_kernel.fn  # Triton's JITFunction under our fast() wrapper
    args = (x, r, w, y, ro, 64, 896, 896, 896, 896, 1e-6)
    kw = dict(N=896, BLOCK_N=1024, ROWS=4, ADD=True, num_warps=4)
    compiled = jit[(16,)](*args, **kw)
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    run, fn, meta = compiled.run, compiled.function, compiled.packed_metadata
    tail = (896, 1024, 4, True)
    res = {
        "torch_add": per_call_us(lambda: torch.add(x, r, out=y)),
        "torch_empty": per_call_us(lambda: torch.empty(x.shape, dtype=x.dtype, device=x.device)),
        "triton_jit_launch": per_call_us(lambda: jit[(16,)](*args, **kw)),
        "fast_launch": per_call_us(lambda: fused._rms_norm_kernel[(16,)](*args, **kw)),
        "compiled_launcher": per_call_us(
            lambda: run(16, 1, 1, stream, fn, meta, None, None, None, *args, *tail)),
        "add_rms_norm_wrapper": per_call_us(lambda: fused.add_rms_norm(x, r, w, 1e-6)),
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
