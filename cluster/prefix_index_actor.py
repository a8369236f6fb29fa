"""The Ray actor shell around `PrefixIndex`; all logic lives in `prefix_index`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ray

from pdserve.cluster.prefix_index import ApplyResult, IndexStats, PrefixIndex
from pdserve.workers.kv_events import BlockHash, KVEventBatch


@ray.remote
class PrefixIndexActor:
    """One per cluster; workers (or their shells) push KV event batches, the router looks up."""

    def __init__(self) -> None:
        self._index = PrefixIndex()

    def apply(self, batch: KVEventBatch) -> ApplyResult:
        return self._index.apply(batch)

    def resync(self, worker_id: str, block_hashes: Iterable[BlockHash], seq: int) -> None:
        self._index.resync(worker_id, block_hashes, seq)

    def remove_worker(self, worker_id: str) -> bool:
        return self._index.remove_worker(worker_id)

    def lookup(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        return self._index.lookup(block_hashes)

    def snapshot(self, worker_id: str) -> set[BlockHash]:
        return self._index.snapshot(worker_id)

    def stats(self) -> IndexStats:
        return self._index.stats()
