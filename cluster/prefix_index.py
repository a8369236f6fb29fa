"""The global prefix-cache index: which worker holds which cached KV block, fed by KV events."""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve.workers.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

logger = logging.getLogger(__name__)

_DECODE_CACHE_SIZE = 4096  # distinct holder masks whose worker names are remembered

# Layout (one entry per distinct block hash, however many workers hold it):
#
#   _holders:  BlockHash -> int      bit s set  <=>  the worker in slot s holds the block
#   _workers:  worker_id -> _Worker  (slot, bit = 1 << slot, last_seq, blocks: set[BlockHash])
#   _slots:    slot -> worker_id     (None for a free slot; free slots are reused lowest first)
#
# Invariant (check_integrity): bit s of _holders[h] is set iff h is in the blocks of the worker
# in slot s, and no mask is 0. The per-worker sets make remove_worker, AllBlocksCleared and
# resync cost O(blocks of that worker) instead of a scan of the whole index. A block shared by
# k workers costs one dict entry plus k set entries (and up to k equal bytes objects when the
# hashes arrived in different batches: the dict keeps the first, each set its own).


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `PrefixIndex.apply` did with one batch.

    ``applied`` False and ``needs_resync`` False: a duplicate, ignored.
    ``needs_resync`` True: a gap (or an unknown worker not starting at seq 1); the batch was not
    applied and the worker's entries stay as they were (stale) until `PrefixIndex.resync`.
    ``expected_seq``: the seq the index wants next from this worker.
    """

    applied: bool
    needs_resync: bool
    expected_seq: int


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counters and sizes of a `PrefixIndex`."""

    num_workers: int
    num_blocks: int  # distinct block hashes
    num_entries: int  # (worker, block) pairs
    batches_applied: int
    batches_duplicate: int
    gaps: int
    resyncs: int
    lookups: int


@dataclass(slots=True)
class _Worker:
    slot: int
    bit: int
    last_seq: int
    blocks: set[BlockHash]


class PrefixIndex:
    """Maps block hashes to the workers caching them; answers longest-cached-prefix lookups.

    Thread-safe: every public method holds one lock. Entries are routing hints, not truth:
    a worker still verifies a prefix hit against its own block manager.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[BlockHash, int] = {}
        self._workers: dict[str, _Worker] = {}
        self._slots: list[str | None] = []
        self._free_slots: list[int] = []  # heap
        self._names: dict[int, tuple[str, ...]] = {}  # mask -> worker ids; reset on slot changes
        self._batches_applied = 0
        self._batches_duplicate = 0
        self._gaps = 0
        self._resyncs = 0
        self._lookups = 0

    # ---- event intake -------------------------------------------------------------------

    def apply(self, batch: KVEventBatch) -> ApplyResult:
        """Apply one worker's batch in order, unless it is a duplicate or follows a gap."""
        with self._lock:
            worker = self._workers.get(batch.worker_id)
            if worker is None:
                if batch.seq != 1:
                    return self._gap(batch, expected=1)
                worker = self._add_worker(batch.worker_id, last_seq=0)
            elif batch.seq <= worker.last_seq:
                self._batches_duplicate += 1
                return ApplyResult(False, False, worker.last_seq + 1)
            elif batch.seq != worker.last_seq + 1:
                return self._gap(batch, expected=worker.last_seq + 1)
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self._store(worker, event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    self._drop(worker, event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    self._drop_all(worker)
                else:
                    raise TypeError(f"unknown KV event {type(event).__name__}")
            worker.last_seq = batch.seq
            self._batches_applied += 1
            return ApplyResult(True, False, batch.seq + 1)

    def resync(self, worker_id: str, block_hashes: Iterable[BlockHash], seq: int) -> None:
        """Replace a worker's entries by its snapshot taken right after event batch ``seq``.

        The snapshot is authoritative: it is accepted even if ``seq`` is below what was
        already applied. The next batch expected from the worker is ``seq + 1``.
        """
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        new = set(block_hashes)
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None:
                worker = self._add_worker(worker_id, last_seq=seq)
            old = worker.blocks
            self._drop(worker, old - new)
            self._store(worker, new - old)
            worker.last_seq = seq
            self._resyncs += 1
        logger.info(
            "prefix index: resynced worker %s at seq %d (%d blocks)", worker_id, seq, len(new)
        )

    def remove_worker(self, worker_id: str) -> bool:
        """Drop a (dead) worker and all its entries; False if it was not known."""
        with self._lock:
            worker = self._workers.pop(worker_id, None)
            if worker is None:
                return False
            num = len(worker.blocks)
            self._drop_all(worker)
            self._slots[worker.slot] = None
            heapq.heappush(self._free_slots, worker.slot)
            self._names.clear()
        logger.info("prefix index: removed worker %s (%d blocks)", worker_id, num)
        return True

    # ---- queries ------------------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """For each worker holding at least the first block: how many leading blocks it holds.

        Workers that do not hold ``block_hashes[0]`` are absent (they match 0 blocks).
        """
        result: dict[str, int] = {}
        with self._lock:
            self._lookups += 1
            get = self._holders.get
            alive = -1  # every slot; narrowed by each block of the chain
            depth = 0
            for h in block_hashes:
                still = alive & get(h, 0)
                if still != alive:
                    if depth:
                        self._credit(alive & ~still, depth, result)
                    if not still:
                        return result
                    alive = still
                depth += 1
            if depth:
                self._credit(alive, depth, result)
        return result

    def workers_holding(self, block_hash: BlockHash) -> frozenset[str]:
        """The workers whose cache holds ``block_hash``."""
        with self._lock:
            found: dict[str, int] = {}
            self._credit(self._holders.get(block_hash, 0), 1, found)
        return frozenset(found)

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Distinct indexed blocks, or the blocks one worker holds (0 for an unknown worker)."""
        with self._lock:
            if worker_id is None:
                return len(self._holders)
            worker = self._workers.get(worker_id)
            return 0 if worker is None else len(worker.blocks)

    def snapshot(self, worker_id: str) -> set[BlockHash]:
        """A copy of the block hashes indexed for one worker (empty for an unknown worker)."""
        with self._lock:
            worker = self._workers.get(worker_id)
            return set() if worker is None else set(worker.blocks)

    def last_seq(self, worker_id: str) -> int | None:
        """The last batch seq applied (or resynced to) for a worker; None if unknown."""
        with self._lock:
            worker = self._workers.get(worker_id)
            return None if worker is None else worker.last_seq

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(
                num_workers=len(self._workers),
                num_blocks=len(self._holders),
                num_entries=sum(len(w.blocks) for w in self._workers.values()),
                batches_applied=self._batches_applied,
                batches_duplicate=self._batches_duplicate,
                gaps=self._gaps,
                resyncs=self._resyncs,
                lookups=self._lookups,
            )

    def check_integrity(self) -> None:
        """Raise AssertionError if the bitmasks and the per-worker sets disagree."""
        with self._lock:
            expected: dict[BlockHash, int] = {}
            for worker_id, worker in self._workers.items():
                if self._slots[worker.slot] != worker_id or worker.bit != 1 << worker.slot:
                    raise AssertionError(f"slot of worker {worker_id} is inconsistent")
                for h in worker.blocks:
                    expected[h] = expected.get(h, 0) | worker.bit
            if expected != self._holders:
                bad = [h.hex() for h in expected.keys() ^ self._holders.keys()][:3]
                raise AssertionError(f"holder masks disagree with worker sets, e.g. {bad}")
            used = {w.slot for w in self._workers.values()}
            free = {s for s, wid in enumerate(self._slots) if wid is None}
            if used & free or used | free != set(range(len(self._slots))):
                raise AssertionError("slot table is inconsistent")
            if set(self._free_slots) != free:
                raise AssertionError("free-slot heap is inconsistent")

    # ---- internals (caller holds the lock) ----------------------------------------------

    def _gap(self, batch: KVEventBatch, expected: int) -> ApplyResult:
        self._gaps += 1
        logger.warning(
            "prefix index: worker %s sent seq %d, expected %d; needs resync",
            batch.worker_id,
            batch.seq,
            expected,
        )
        return ApplyResult(False, True, expected)

    def _add_worker(self, worker_id: str, last_seq: int) -> _Worker:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._slots[slot] = worker_id
        else:
            slot = len(self._slots)
            self._slots.append(worker_id)
        worker = _Worker(slot=slot, bit=1 << slot, last_seq=last_seq, blocks=set())
        self._names.clear()
        self._workers[worker_id] = worker
        return worker

    def _store(self, worker: _Worker, hashes: Iterable[BlockHash]) -> None:
        holders = self._holders
        blocks = worker.blocks
        bit = worker.bit
        for h in hashes:
            if h not in blocks:
                blocks.add(h)
                mask = holders.get(h)
                # A block's first holder stores the worker's own bit object: most blocks have
                # one holder, and a fresh int per block would cost ~40 bytes past slot 30.
                holders[h] = bit if mask is None else mask | bit

    def _drop(self, worker: _Worker, hashes: Iterable[BlockHash]) -> None:
        holders = self._holders
        blocks = worker.blocks
        bit = worker.bit
        for h in hashes:
            if h in blocks:
                blocks.remove(h)
                mask = holders[h] ^ bit
                if mask:
                    holders[h] = mask
                else:
                    del holders[h]

    def _drop_all(self, worker: _Worker) -> None:
        old = worker.blocks
        worker.blocks = set()  # a fresh set gives the old table's memory back
        holders = self._holders
        bit = worker.bit
        for h in old:
            mask = holders[h] ^ bit
            if mask:
                holders[h] = mask
            else:
                del holders[h]

    def _credit(self, mask: int, depth: int, result: dict[str, int]) -> None:
        names = self._names.get(mask)
        if names is None:
            names = self._decode(mask)
        if len(names) == 1:
            result[names[0]] = depth
        else:
            result.update(dict.fromkeys(names, depth))

    def _decode(self, mask: int) -> tuple[str, ...]:
        # Decoding bit by bit costs ~0.25 us per worker; the same few masks (e.g. the workers
        # that hold a popular system prompt) recur in lookup after lookup, so they are cached.
        slots = self._slots
        names = []
        m = mask
        while m:
            low = m & -m
            names.append(slots[low.bit_length() - 1])
            m ^= low
        if len(self._names) >= _DECODE_CACHE_SIZE:
            self._names.clear()
        result = self._names[mask] = tuple(names)
        return result
