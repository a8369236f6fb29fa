"""The decode graphs' input staging (DecodeGraphs._fill) on the CPU: writing only the block-table
entries appended since the last step gives the same buffer as writing every table in full."""

from __future__ import annotations

import random

import numpy as np

from pdserve.workers.decode_graphs import DecodeGraphs


def _graphs(block_size: int, width: int) -> DecodeGraphs:
    g = object.__new__(DecodeGraphs)  # _fill needs no GPU: only its layout fields
    g.block_size, g.width, g._staged = block_size, width, None
    return g


def test_incremental_fill_equals_a_full_fill_over_a_run_of_steps():
    rng = random.Random(0)
    bs, width, b = 16, 12, 16
    inc, full = _graphs(bs, width), _graphs(bs, width)
    buf_inc = np.full(b * (4 + width), 7, dtype=np.int64)  # stale contents must not leak
    buf_full = np.empty_like(buf_inc)
    tables = [[rng.randrange(1000) for _ in range(rng.randint(1, 4))] for _ in range(13)]
    pos = [len(t) * bs - rng.randint(1, bs) for t in tables]
    epoch = 0
    for step in range(200):
        event = rng.random()
        if event < 0.05 and len(tables) > 1:  # a row finishes: the rows shift
            i = rng.randrange(len(tables))
            del tables[i], pos[i]
        elif event < 0.10 and len(tables) < b:  # a row joins
            tables.append([rng.randrange(1000)])
            pos.append(rng.randrange(bs))
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
        inc._fill(buf_inc, b, ids, pos, list(tables), epoch)
        full._fill(buf_full, b, ids, pos, list(tables), None)
        np.testing.assert_array_equal(buf_inc, buf_full, err_msg=f"step {step}")
    assert inc._staged is not None and full._staged is None
