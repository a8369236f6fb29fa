"""The Triton kernel tests on CPU: test_kernels.py, test_kernels_fused.py and
test_kernels_engine.py again, in a fresh process under the Triton interpreter (TRITON_INTERPRET=1), with tiny shapes.

A separate process because the interpreter is chosen when a kernel is decorated, at the
import of its module: setting the variable in this process would also turn the kernels of
any later GPU test in the session into interpreted ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent

# triton 3.6's interpreter converts one-element arrays with int(), which numpy >= 2.4
# refuses (triton-lang/triton#9171, fixed upstream): a loop bound read from memory fails.
# Patched in the child process only, before any kernel runs.
RUN = """
import sys

import pytest
from triton.runtime import interpreter

patch_tensor = interpreter._patch_lang_tensor


def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = patched
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    files = [str(HERE / f"test_kernels{part}.py") for part in ("", "_fused", "_engine")]
    r = subprocess.run([sys.executable, "-c", RUN, "-q", "-p", "no:cacheprovider", *files],
                       env=env, cwd=HERE.parent.parent, capture_output=True, text=True,
                       timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
