"""The router places a session's next turn on the decode worker whose cache holds the session's
blocks: the worker's pinned turn reaches the global index as KV events, and placement follows
the index (cluster/router.py `_place`, no Ray actors needed)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.prefix_index import PrefixIndex
from pdserve.cluster.router import Router
from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence, SequenceStatus
from pdserve.workers.worker import GenerateRequest, WorkerLoad

BS = 16


class _Remote:
    """Stands in for a Ray actor method: ``await method.remote(...)``."""

    def __init__(self, fn) -> None:
        self._fn = fn

    async def remote(self, *args):
        return self._fn(*args)


class _IndexHandle:
    def __init__(self, index: PrefixIndex) -> None:
        self.lookup = _Remote(index.lookup)


def load(worker_id: str, role: str) -> WorkerLoad:
    return WorkerLoad(worker_id, role, num_running=0, num_waiting=0, waiting_tokens=0,
                      free_blocks=64, total_blocks=64, num_leases=0, prefill_tokens_per_s=2000.0,
                      decode_step_s=0.05, block_bytes=100_000, time=0.0)


def finished_turn(bm: BlockManager, tokens: list[int], num_output: int) -> list[int]:
    """What a decode worker does for one turn of session "chat"; returns prompt + output."""
    seq = Sequence(request_id="turn1", token_ids=list(tokens), num_prompt_tokens=len(tokens),
                   params=SamplingParams(), arrival=0.0, session_id="chat")
    n = len(tokens) + num_output - 1  # the last sampled token has no KV
    seq.token_ids += [900 + i for i in range(num_output)]
    bm.allocate(seq, n)
    seq.num_computed_tokens = n
    bm.commit(seq)
    seq.status = SequenceStatus.FINISHED
    bm.free(seq)
    return list(seq.token_ids)


@pytest.fixture
def router_and_index():
    index = PrefixIndex()
    workers = {"p0": ("prefill", None), "d0": ("decode", None), "d1": ("decode", None)}
    router = Router(ClusterConfig(block_size=BS), "unused", workers, _IndexHandle(index))
    for w in router.workers.values():
        w.load = load(w.worker_id, w.role)
    return router, index


@pytest.mark.parametrize("new_tokens", [10, 100])  # a short tail runs direct; a long one P/D
def test_next_turn_goes_to_the_decode_worker_holding_the_session(router_and_index, new_tokens):
    router, index = router_and_index
    d1 = BlockManager(64, BS, worker_id="d1")
    history = finished_turn(d1, list(range(1, 65)), 20)  # 83 tokens with KV: 5 full blocks
    # A fresh prompt ties: the first decode worker wins.
    fresh = GenerateRequest("x", tuple(range(5000, 5100)), SamplingParams())
    plan, _ = asyncio.run(router._place(fresh))
    assert plan.decode == "d0"
    # Unrelated traffic on d1 would evict an unpinned turn; the session keeps it indexed.
    for r in range(6):
        other = Sequence(request_id=f"o{r}", token_ids=[10_000 * (r + 1) + j for j in range(160)],
                         num_prompt_tokens=160, params=SamplingParams(), arrival=0.0)
        d1.allocate(other, 160)
        other.num_computed_tokens = 160
        d1.commit(other)
        d1.free(other)
    batch = d1.take_events()
    assert batch is not None and index.apply(batch).applied
    assert index.snapshot("d1") == d1.pool.cached_hashes()
    turn2 = GenerateRequest("turn2", tuple(history + list(range(7000, 7000 + new_tokens))),
                            SamplingParams(), session_id="chat")
    plan, hashes = asyncio.run(router._place(turn2))
    assert index.lookup(hashes) == {"d1": 5}
    assert plan.decode == "d1"
    assert plan.kind == ("direct" if new_tokens == 10 else "pd")
