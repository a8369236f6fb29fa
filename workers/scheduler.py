"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first (a decode token each,
or the next chunk of a long prompt); waiting ones are admitted in (priority,
arrival) order while budget, sequence slots and blocks last. When blocks run out
the lowest-priority running sequence is preempted by recompute: its blocks are
freed and it returns to the waiting queue, later resuming where it left off.

A waiting sequence that shares uncached blocks with a prompt computed in the same step
does not compute them again. It *rides* them: it takes the blocks the other one fills in
this step and runs beside it (each layer writes all new K/V before its attention reads
any, so the shared blocks are complete when it reads them). A rider that goes on past what
it shares is ridden in turn by those that share more with it (a system prompt, then the
same few-shot examples). Where the other one fills shared blocks in a later step (a
chunked prompt), it is held back until then instead, unless that is a single block
(cheaper to compute twice than to wait a step for); while held it keeps its place, a
sequence slot and the blocks of its first chunk, from lower-priority requests. Ridden
tokens are not cache hits: ``num_cached_tokens`` and the hit counters count only blocks
found cached.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import operator
from dataclasses import dataclass, field

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sequence import Sequence, SequenceStatus
from pdserve.workers.spec_decode import drop_drafts

logger = logging.getLogger(__name__)

_sort_key = operator.attrgetter("priority", "arrival")  # Sequence.sort_key, without the property call


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None  # chunk size cap per prompt per step
    max_model_len: int = 2048


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens run this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so its logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    table_epoch: int = 0  # the block manager's table_rewrites once this step was scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: list[tuple[int, float, int, Sequence]] = []  # heap
        self.running: list[Sequence] = []
        self._tiebreak = itertools.count()
        self.num_preemptions = 0

    # -- queue ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (seq.priority, seq.arrival, next(self._tiebreak), seq))

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of whichever queue holds it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            for i, entry in enumerate(self.waiting):
                if entry[3] is seq:
                    self.waiting[i] = self.waiting[-1]
                    self.waiting.pop()
                    heapq.heapify(self.waiting)
                    break
        if seq.block_table:
            self.bm.free(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunk_cap = self.config.long_prefill_token_threshold or budget

        # 1. Running sequences, highest priority first; preempt from the back on OOM.
        running = self.running
        running.sort(key=_sort_key)
        scheduled = out.scheduled
        fits_in_place = self.bm.fits_in_place
        bs, blocks = self.bm.block_size, self.bm.pool.blocks
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            c = seq.num_computed_tokens
            left = len(seq.token_ids) - c
            if left == 1 and not seq.drafts:  # a decode row: fits_in_place(seq, 1), inlined
                table = seq.block_table
                if c // bs < len(table) and (not c % bs or blocks[table[c // bs]].ref_count <= 1):
                    scheduled.append(ScheduledSeq(seq, 1))
                    budget -= 1
                    i += 1
                    continue
            n = min(left, budget, chunk_cap)
            if seq.drafts and n < left:
                drop_drafts(seq)  # drafts are verified in one pass or not at all
                n = min(1, budget)
            if n <= 0:
                i += 1
                continue
            if fits_in_place(seq, n):  # a decode token in a block it owns: nothing to allocate
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            while not self.bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.block_copies.extend(self.bm.allocate(seq, n))
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: no room for anything later either

        # 2. Waiting sequences, in (priority, arrival) order, while room lasts. One that
        #    would compute the same uncached blocks as a prompt computed in this step rides
        #    them, or waits until they are cached (a burst sharing a new system prompt
        #    computes it once). ``computing``: the hash of each prompt chunk's first block in
        #    this step (probe_prefix's) -> (its sequence, the blocks it has filled by the end);
        #    ``branches``: (a writer, a block index) -> a rider that took the writer's blocks
        #    up to there and computes on from there (a longer shared prefix: others ride it).
        if (not out.preempted and self.waiting and budget > 0
                and len(self.running) < self.config.max_num_seqs):  # (else nothing is admitted)
            computing: dict[bytes, tuple[Sequence, int]] = {}
            branches: dict[tuple[int, int], tuple[Sequence, int]] = {}
            for s in scheduled:  # running prompts, part way through (chunked)
                if s.num_new_tokens > 1 and not s.seq.drafts:
                    ahead = self.bm.ahead_of(s.seq)
                    if ahead is not None:
                        computing.setdefault(
                            ahead, (s.seq, (s.seq.num_computed_tokens + s.num_new_tokens) // bs))
            later: list[tuple[int, float, int, Sequence]] = []
            held = held_blocks = 0  # a held request keeps its place: a slot and its blocks
            while (self.waiting and budget > 0
                   and len(self.running) + held < self.config.max_num_seqs):
                seq = self.waiting[0][3]
                hits, ahead = (self.bm.probe_prefix(seq) if seq.num_computed_tokens == 0
                               else ([], None))
                ridden, writer = None, None
                if ahead is not None and ahead in computing:
                    ride = self._ride(seq, len(hits), *computing[ahead], branches)
                    if ride is None:
                        later.append(heapq.heappop(self.waiting))
                        held += 1
                        held_blocks += self._own_blocks(seq, len(hits), computing[ahead][0],
                                                        chunk_cap)
                        continue
                    ridden, writer = ride
                taken = len(hits) + len(ridden or ())
                computed = seq.num_computed_tokens + taken * bs
                n = min(seq.num_tokens - computed, budget, chunk_cap)
                if not self.bm.can_allocate(seq, n, hits + ridden if ridden else hits,
                                            held_blocks):
                    break
                heapq.heappop(self.waiting)
                if seq.first_scheduled is None and seq.num_output_tokens == 0:
                    # tokens served from the cache (not those ridden: computed in this step)
                    seq.num_cached_tokens = len(hits) * bs
                    seq.num_ridden_tokens = len(ridden or ()) * bs
                    self.bm.record_prefix_query(seq.num_prompt_tokens, seq.num_cached_tokens)
                out.block_copies.extend(self.bm.allocate(seq, n, hits, ridden))
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                filled = (seq.num_computed_tokens + n) // bs
                if ridden:  # it branches off its (last) writer where its own blocks begin
                    branches.setdefault((id(writer), taken), (seq, filled))
                elif ahead is not None:
                    computing.setdefault(ahead, (seq, filled))
            for entry in later:
                heapq.heappush(self.waiting, entry)
        out.table_epoch = self.bm.table_rewrites
        return out

    def _ride(self, seq: Sequence, first: int, writer: Sequence, filled: int,
              branches: dict[tuple[int, int], tuple[Sequence, int]]
              ) -> tuple[list, Sequence] | None:
        """What ``seq`` takes, from block ``first`` on, of the blocks filled in this step:
        ``writer``'s while their tokens equal its own, among those it has filled by the
        step's end (``filled``), then those of a rider that branched off ``writer`` where
        ``seq`` parts from it (and so on), leaving ``seq`` at least one token to compute.
        Returns them and the last writer they came from; None: ``seq`` waits, as that writer
        fills the next shared block in a later step (with nothing to take now, only if two
        or more such blocks follow). ``seq`` and ``writer`` agree on every token up to the
        end of block ``first`` (their chained hashes of it matched)."""
        bs = self.bm.block_size
        ids = seq.token_ids
        own_max = (seq.num_tokens - 1) // bs  # blocks seq may take: its last token computes

        def same(w: Sequence, k: int) -> bool:
            return ids[k * bs:(k + 1) * bs] == w.token_ids[k * bs:(k + 1) * bs]

        blocks, taken = self.bm.pool.blocks, []
        i = first
        while True:
            j, end = i, min(filled, own_max)
            while j < end and same(writer, j):
                j += 1
            taken += [blocks[b] for b in writer.block_table[i:j]]
            i = j
            if i >= own_max:
                break
            branch = branches.get((id(writer), i))  # seq parts from writer at block i
            if branch is not None and same(branch[0], i):
                writer, filled = branch
                continue
            if i == filled:
                break
            return taken, writer
        later = 0  # shared blocks from i on that writer fills in later steps (counted to 2)
        while (later < 2 and i + later < own_max and (i + later + 1) * bs <= len(writer.token_ids)
               and same(writer, i + later)):
            later += 1
        if later >= (1 if taken else 2):
            return None
        return taken, writer

    def _own_blocks(self, seq: Sequence, first: int, writer: Sequence, chunk_cap: int) -> int:
        """The blocks a request held back for ``writer`` will allocate when it is admitted:
        those of its first chunk past the blocks it shares with ``writer`` (from block
        ``first`` on, the cached ones before it). Kept free while lower-priority requests
        are admitted in its step, so they do not take its place (sharing with a rider that
        branches off ``writer`` is not counted: the estimate errs on the side of room)."""
        bs = self.bm.block_size
        ids, other = seq.token_ids, writer.token_ids
        k, end = first, min((seq.num_tokens - 1) // bs, len(other) // bs)
        while k < end and ids[k * bs:(k + 1) * bs] == other[k * bs:(k + 1) * bs]:
            k += 1
        return -(-min(seq.num_tokens - k * bs, chunk_cap) // bs)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        logger.debug("request %s preempted (recompute)", seq.request_id)
        self.running.remove(seq)
        drop_drafts(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        out.scheduled[:] = [s for s in out.scheduled if s.seq is not seq]  # in place: schedule holds it
        self.add(seq)

    def finish_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Advance computed-token counts and cache blocks that became full."""
        bs = self.bm.block_size
        for s in scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            # drafts' blocks are cached only after verification; most steps fill no block
            if not seq.drafts and seq.num_computed_tokens // bs > len(seq.block_hashes):
                self.bm.commit(seq)
