"""The lean Triton launch path (workers/kernels/launch.py): its specialization key, and on a
GPU, launches through the cached launcher equal to Triton's own."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pdserve.workers.kernels.launch import _spec  # noqa: E402


def test_the_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert _spec(base) == _spec(torch.zeros(64, dtype=torch.bfloat16))
    assert _spec(base[1:]) != _spec(base)  # 2 bytes off: not 16-byte aligned
    assert _spec(base[8:]) == _spec(base)  # 16 bytes off: aligned again
    assert _spec(base.float()) != _spec(base)  # dtype
    assert _spec(1) != _spec(17)  # 1 is a constexpr to Triton
    assert _spec(16) == _spec(4096) != _spec(17)  # divisibility by 16
    assert _spec(2**31) != _spec(2**31 - 16)  # 64-bit vs 32-bit ints
    assert _spec(17) == _spec(33) and _spec(0.5) == _spec(1e-6)
    assert _spec(True) != _spec(False) and _spec(None) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_launches_equal_tritons_and_new_specializations_compile():
    from pdserve.workers.kernels import fused
    from pdserve.workers.models.layers import rms_norm

    kernel = fused._rms_norm_kernel
    kernel.cache.clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(896, device="cuda", dtype=torch.bfloat16, generator=g)
    for rows in (32, 32, 17, 1, 48):  # 32 twice: the second launch is a cache hit
        big = torch.randn(rows + 1, 896, device="cuda", dtype=torch.bfloat16, generator=g)
        for x in (big[:rows], big[1:]):  # aligned, and 896 * 2 bytes off (still aligned)
            res = torch.randn_like(x)
            y, r = fused.add_rms_norm(x, res, w, 1e-6)
            ref_r = x + res
            torch.testing.assert_close(r, ref_r, rtol=0, atol=0)
            torch.testing.assert_close(y, rms_norm(ref_r, w, 1e-6), rtol=2.0 ** -6, atol=1e-5)
    # one entry per (rows == 1, rows % 16 == 0) class seen: 32/48, 17, 1
    assert len(kernel.cache) == 3
    # A pointer off 16-byte alignment is a new specialization, not the cached one.
    flat = torch.randn(896 * 4 + 1, device="cuda", dtype=torch.bfloat16, generator=g)
    for x, entries in ((flat[:-1].view(4, 896), 4), (flat[1:].view(4, 896), 5)):
        for _ in range(2):
            torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6),
                                       rtol=2.0 ** -6, atol=1e-5)
        assert len(kernel.cache) == entries


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hits_take_the_direct_path_unless_a_launch_hook_is_installed(monkeypatch):
    from triton import knobs

    from pdserve.workers.kernels import fused, launch

    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    fused.rms_norm(x, w, 1e-6)  # compiled and cached
    via_triton = []
    jit = fused._rms_norm_kernel.fn
    monkeypatch.setattr(fused._rms_norm_kernel, "fn", _Spy(jit, via_triton))
    fused.rms_norm(x, w, 1e-6)
    assert not via_triton and not launch._hooked()
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        assert launch._hooked()
        fused.rms_norm(x, w, 1e-6)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert via_triton and seen


class _Spy:
    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.fn[grid]
