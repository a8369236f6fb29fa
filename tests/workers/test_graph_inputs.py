"""The decode graphs' input staging (DecodeGraphs._fill) on the CPU: writing only the block-table
entries appended since the last step gives the same buffer as writing every table in full,
shared-prefix plans included."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("triton")

from pdserve.workers.decode_graphs import DecodeGraphs  # noqa: E402
from pdserve.workers.kernels.shared_prefix import SharedPrefixPlanner  # noqa: E402


def _graphs(block_size: int, width: int, b: int, rows: int) -> DecodeGraphs:
    g = object.__new__(DecodeGraphs)  # _fill needs no GPU: only its layout fields
    g.block_size, g.width, g._staged, g.rows = block_size, width, None, rows
    g.planner = SharedPrefixPlanner(rows, 8, min_saved=1, min_fraction=0.0) if rows > 1 else None
    g.shared_graphs = {b: None} if rows > 1 else {}
    return g


def _regions(g: DecodeGraphs, buf: np.ndarray, b: int, shared: bool) -> list[np.ndarray]:
    """The parts a replay reads: the plain inputs and tables; the plan only if it has one."""
    at = 4 * b + g._plan_size(b)
    return [buf[:4 * b], buf[at:g._size(b)]] + ([buf[4 * b:at]] if shared else [])


@pytest.mark.parametrize("rows", [1, 4])
def test_incremental_fill_equals_a_full_fill_over_a_run_of_steps(rows):
    rng = random.Random(rows)
    bs, width, b = 16, 12, 16
    inc, full = _graphs(bs, width, b, rows), _graphs(bs, width, b, rows)
    buf_inc = np.full(inc._size(b), 7, dtype=np.int64)  # stale contents must not leak
    buf_full = np.empty_like(buf_inc)
    prefixes = [[rng.randrange(1000, 2000) for _ in range(rng.randint(1, 3))] for _ in range(3)]
    tables = [list(rng.choice(prefixes)) + [rng.randrange(1000)] for _ in range(13)]
    pos = [len(t) * bs - rng.randint(1, bs) for t in tables]
    epoch, planned = 0, 0
    for step in range(300):
        event = rng.random()
        if event < 0.05 and len(tables) > 1:  # a row finishes: the rows shift
            i = rng.randrange(len(tables))
            del tables[i], pos[i]
        elif event < 0.10 and len(tables) < b:  # a row joins, often on a shared prefix
            tables.append((list(rng.choice(prefixes)) if rng.random() < 0.7 else []) + [rng.randrange(1000)])
            pos.append((len(tables[-1]) - 1) * bs + rng.randrange(bs))
        elif event < 0.13:  # copy-on-write of a row's last block: counted by the epoch
            i = rng.randrange(len(tables))
            tables[i][-1] = rng.randrange(1000)
            epoch += 1
        elif event < 0.15:  # a row's table replaced (freed and refilled): a new list
            i = rng.randrange(len(tables))
            tables[i] = list(tables[i])
        for i in range(len(tables)):  # every row decodes one token
            pos[i] += 1
            if pos[i] // bs >= len(tables[i]) and len(tables[i]) < width:
                tables[i].append(rng.randrange(1000))
            pos[i] = min(pos[i], len(tables[i]) * bs - 1)
        ids = [rng.randrange(100) for _ in tables]
        shared = inc._fill(buf_inc, b, ids, pos, list(tables), epoch)
        assert full._fill(buf_full, b, ids, pos, list(tables), None) == shared, step
        planned += shared
        for x, y in zip(_regions(inc, buf_inc, b, shared), _regions(full, buf_full, b, shared), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    assert inc._staged is not None and full._staged is None
    assert (planned > 100) == (rows > 1), planned


def test_shared_prefix_plan():
    """Rows group by their first block and share the prefix common to the whole group, never
    the block that takes a row's new token; a chunk holds 2..rows rows (a row left alone gets
    no chunk); a plan that saves too few reads, or too small a part of them, is none."""
    from pdserve.workers.kernels.shared_prefix import plan_shared_prefix

    t = np.array([[5, 6, 7, 40, 0], [5, 6, 7, 41, 0], [5, 6, 8, 42, 0], [9, 10, 43, 0, 0],
                  [5, 6, 7, 44, 45], [11, 46, 0, 0, 0], [11, 47, 0, 0, 0]])
    last = np.array([3, 3, 3, 2, 4, 1, 0])  # row 6 writes into its block 0: nothing to share
    prefix, rows, lens, splits = plan_shared_prefix(t, last, 16, 3, min_saved=0, min_fraction=0)
    assert prefix.tolist() == [32, 32, 32, 0, 0, 0, 0]
    assert rows.tolist() == [[0, 1, 2]] and lens.tolist() == [32] and splits == 1
    prefix, rows, lens, _ = plan_shared_prefix(t, last, 16, 4, min_saved=0, min_fraction=0)
    assert prefix.tolist() == [32, 32, 32, 0, 32, 0, 0]
    assert rows.tolist() == [[0, 1, 2, 4]] and lens.tolist() == [32]
    assert plan_shared_prefix(t, last, 16, 3, min_saved=65, min_fraction=0) is None  # saves 2 x 32
    assert plan_shared_prefix(t, last, 16, 3, min_saved=64, min_fraction=0) is not None
    # of (16 + 7) blocks' reads, 64 tokens saved: 17%
    assert plan_shared_prefix(t, last, 16, 3, min_saved=0, min_fraction=0.18) is None
    assert plan_shared_prefix(t, last, 16, 3, min_saved=0, min_fraction=0.17) is not None
    assert plan_shared_prefix(t[3:4], last[3:4], 16, 3, min_saved=0) is None
    # splits: enough programs for the lanes, >= 256 shared tokens each, at most MAX_SPLITS
    long = np.arange(64 * 3).reshape(3, 64) % 64
    long[:, 63] = [100, 101, 102]
    last = np.array([63, 63, 63])
    assert [plan_shared_prefix(long, last, 16, 4, min_saved=0, lanes=k)[3] for k in (1, 2, 8)] == [1, 2, 3]
