"""A leaner launch path for our Triton kernels.

``kernel[grid](*args, **constexprs)`` costs ~20 µs of host time per call in Triton 3.6: it
binds the arguments, builds a cache key from their specialization and the options'
string, checks the kernel's globals and asks for launch metadata before the compiled
launcher runs (~7 µs). A prefill step of a 24-layer model makes ~190 such launches, and on
a slow host that is what bounds the step, not the GPU.

``fast(kernel)[grid](...)`` keeps the same call syntax. The first call with a given
specialization goes through Triton (which compiles and launches); later ones call the
compiled launcher directly. The key is what Triton specializes on, computed here: each
tensor's dtype and 16-byte alignment, each int's ``== 1``, divisibility by 16 and 32/64-bit
width, each bool's and None's value; plus the constexpr and option keywords. Calls that
are equal under this key are equal under Triton's, so the cached kernel is the one Triton
would pick. While a Triton launch hook is installed (a profiler such as proton), every
call takes Triton's path; without one, Triton still builds launch metadata and calls its
empty hook chain twice per launch, which the direct call skips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _hooked() -> bool:
    """Whether a launch hook is installed (Triton 3.6 always has a HookChain; empty: none)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _spec(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return 1 if a == 1 else (a % 16 == 0, _I32_MIN <= a <= _I32_MAX)
    if isinstance(a, float):
        return float
    return a  # bool, None: by value


class FastKernel:
    """A ``@triton.jit`` function whose runtime arguments are passed positionally and whose
    constexprs (all after them in its signature) and options by keyword."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        params = getattr(fn, "params", None) or []  # the interpreter's functions: Triton's path
        self.num_runtime = sum(1 for p in params if not p.is_constexpr)
        # the launcher takes every parameter in order; constexprs must trail the rest
        self.ordered = bool(params) and all(p.is_constexpr for p in params[self.num_runtime:])
        self.constexpr_names = [p.name for p in params[self.num_runtime:]]
        self.cache: dict[tuple, tuple] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        key = (tuple(map(_spec, args)), tuple(kwargs.items()))
        hit = self.cache.get(key)
        if hit is None or _hooked():
            compiled = self.fn[grid](*args, **kwargs)
            if (hit is None and self.ordered and len(args) == self.num_runtime
                    and hasattr(compiled, "packed_metadata")):
                tail = tuple(kwargs[n] for n in self.constexpr_names if n in kwargs)
                if len(tail) == len(self.constexpr_names):  # no constexpr left to its default
                    self.cache[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                       tail)
            return
        run, function, metadata, tail = hit
        n = len(grid)
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, metadata,
            None, None, None, *args, *tail)


fast = FastKernel  # as a decorator over @triton.jit
