"""The engine's prefill/decode side: leases on a prefill's blocks, export and import of
blocks, and admission of a request whose prompt KV was computed elsewhere.

Everything here runs on the engine thread (except ``outgoing``, see there); the worker wraps
it for asyncio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pdserve.workers.block_manager import block_keys
from pdserve.workers.engine import LLMEngine
from pdserve.workers.errors import InvalidRequestError, OutOfBlocksError
from pdserve.workers.kv_transfer import (
    DeviceBlocks,
    KVHandle,
    KVPayload,
    Outgoing,
    layout_of,
    pack_blocks,
    unpack_blocks,
    write_blocks,
)
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SeqState:
    """A request's state after its first token: what a decode worker needs to go on."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + outputs so far
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    cache_salt: str | None
    output_text: str
    emitted_text_len: int
    prefix_offset: int
    read_offset: int
    num_cached_tokens: int
    generator_state: bytes | None = None
    session_id: str | None = None


@dataclass(slots=True)
class Lease:
    lease_id: str
    block_ids: list[int]
    handle: KVHandle
    state: SeqState
    expires_at: float
    queue_seconds: float = 0.0  # arrival -> first scheduled on the prefill worker
    ridden_tokens: int = 0  # prompt tokens another prompt computed (Sequence.num_ridden_tokens)


def state_of(seq: Sequence) -> SeqState:
    gen = bytes(seq.generator.get_state().numpy().tobytes()) if seq.generator is not None else None
    if seq.held_token is not None:  # KV-only prefill: hand over the whole prompt
        n = seq.num_prompt_tokens + 1
        return SeqState(seq.request_id, (*seq.token_ids, seq.held_token), n, seq.params,
                        seq.priority, seq.cache_salt, "", 0, max(0, n - 5), n,
                        seq.num_cached_tokens, gen, seq.session_id)
    return SeqState(seq.request_id, tuple(seq.token_ids), seq.num_prompt_tokens, seq.params,
                    seq.priority, seq.cache_salt, seq.output_text, seq.emitted_text_len,
                    seq.prefix_offset, seq.read_offset, seq.num_cached_tokens, gen,
                    seq.session_id)


def seq_from_state(st: SeqState) -> Sequence:
    seq = Sequence(request_id=st.request_id, token_ids=list(st.token_ids),
                   num_prompt_tokens=st.num_prompt_tokens, params=st.params,
                   arrival=time.monotonic(), priority=st.priority, cache_salt=st.cache_salt,
                   session_id=st.session_id)
    seq.output_text = st.output_text
    seq.emitted_text_len = st.emitted_text_len
    seq.prefix_offset, seq.read_offset = st.prefix_offset, st.read_offset
    seq.num_cached_tokens = st.num_cached_tokens
    if st.generator_state is not None:
        seq.generator = torch.Generator()
        seq.generator.set_state(torch.frombuffer(bytearray(st.generator_state), dtype=torch.uint8))
    return seq


class DisaggEngine(LLMEngine):
    """An engine that can serve as a prefill worker, a decode worker, or both."""

    def __init__(self, *args, lease_seconds: float = 30.0, grpc_address: str | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lease_seconds = lease_seconds
        self.grpc_address = grpc_address
        self.leases: dict[str, Lease] = {}
        self.reserved: dict[str, Sequence] = {}  # decode admissions waiting for their KV
        self.layout = layout_of(self.runner.kv_caches)
        self.num_expired_leases = 0
        self.runner_block_bytes = self.handle_bytes_per_block()

    def handle_bytes_per_block(self) -> int:
        c = self.runner.kv_caches[0]
        return len(self.runner.kv_caches) * c[:, 0].numel() * c.element_size()

    # -- prefill side --------------------------------------------------------------
    def _on_prefill_done(self, seq: Sequence) -> None:
        lease_id = f"{self.config.worker_id}:{seq.request_id}"
        n_blocks = -(-seq.num_computed_tokens // self.config.block_size)
        block_ids = seq.block_table[:n_blocks]
        self.block_manager.pin(lease_id, block_ids)
        handle = KVHandle(seq.request_id, self.config.worker_id, lease_id, seq.num_computed_tokens,
                          n_blocks, tuple(seq.block_hashes), self.layout, self.grpc_address)
        queued = (seq.first_scheduled or seq.arrival) - seq.arrival
        self.leases[lease_id] = Lease(lease_id, list(block_ids), handle, state_of(seq),
                                      time.monotonic() + self.lease_seconds, queued,
                                      seq.num_ridden_tokens)
        self.requests.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def lease_for(self, request_id: str) -> Lease | None:
        return self.leases.get(f"{self.config.worker_id}:{request_id}")

    def lease_blocks(self, lease_id: str, start_block: int = 0) -> list[int]:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise KeyError(f"lease {lease_id} is unknown, released or expired")
        return lease.block_ids[start_block:]

    def export_lease(self, lease_id: str, start_block: int = 0) -> KVPayload:
        return pack_blocks(self.runner.kv_caches, self.lease_blocks(lease_id, start_block))

    def outgoing(self, lease_id: str | None, start_block: int = 0) -> Outgoing:
        """A lease's blocks gathered for the KV channel (``lease_id`` None: none, a ping).

        The one method that runs off the engine thread (on the channel's send thread, so a
        send does not wait for the current step): a lease's blocks are pinned and written no
        more, and their writes ended before the lease existed. A lease id is never reused, so
        if the lease is still there after the copy, it was there all along."""
        try:
            ids = [] if lease_id is None else self.lease_blocks(lease_id, start_block)
        except KeyError:
            return Outgoing(self.layout, None)
        out = Outgoing.gather(self.layout, self.runner.kv_caches, ids)
        return out if lease_id is None or lease_id in self.leases else Outgoing(self.layout, None)

    def release_lease(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        self.block_manager.unpin(lease_id)
        return True

    def housekeeping(self) -> None:
        super().housekeeping()
        if self.leases:
            self.expire_leases(time.monotonic())

    def expire_leases(self, now: float) -> int:
        expired = [lid for lid, lease in self.leases.items() if lease.expires_at <= now]
        for lid in expired:
            logger.warning("lease %s expired before it was released", lid)
            self.release_lease(lid)
        self.num_expired_leases += len(expired)
        return len(expired)

    def abort_request(self, request_id: str) -> bool:
        found = super().abort_request(request_id)
        lease = self.lease_for(request_id)
        if lease is not None:
            self.release_lease(lease.lease_id)
            found = True
        seq = self.reserved.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)
            found = True
        return found

    # -- prefix sharing between workers ---------------------------------------------
    def export_prefix(self, token_ids: list[int], salt: str | None, start_block: int,
                      max_blocks: int) -> tuple[int, KVPayload | None]:
        """Pack this worker's cached blocks [start_block, start_block+n) of the chain."""
        bs = self.config.block_size
        hits = self.block_manager.cached_prefix(token_ids, salt, min(max_blocks, len(token_ids) // bs))[0]
        ids = [b.block_id for b in hits[start_block:]]  # hashed up to the first miss only
        if not ids:
            return 0, None
        return len(ids), pack_blocks(self.runner.kv_caches, ids)

    def import_prefix(self, token_ids: list[int], salt: str | None, start_block: int,
                      payload: KVPayload) -> int:
        """Write another worker's blocks into this cache as cached, unreferenced blocks."""
        bs = self.config.block_size
        n = payload.num_blocks
        if (start_block + n) * bs > len(token_ids):
            raise ValueError(f"payload: {n} blocks from block {start_block} overrun the "
                             f"{len(token_ids)}-token prompt")
        if self.block_manager.num_free_blocks < n:
            return 0
        blocks = self.block_manager.pool.allocate(n)
        try:
            unpack_blocks(self.runner.kv_caches, [b.block_id for b in blocks], payload)
        except Exception:
            self.block_manager.pool.free(blocks)
            raise
        hashes, chunks = block_keys(token_ids, bs, salt, stop=start_block + n)
        first_parent = hashes[start_block - 1] if start_block else None
        self.block_manager.pool.cache_full_blocks(blocks, hashes[start_block:], chunks[start_block:],
                                                  first_parent, tenant=salt, depth=start_block)
        self.block_manager.pool.free(list(reversed(blocks)))
        return n

    # -- decode side ------------------------------------------------------------------
    def reserve(self, state: SeqState, num_kv_tokens: int) -> int:
        """Take blocks for a handed-off request; returns the first block index still to pull
        (blocks before it were prefix-cache hits here). Raises OutOfBlocksError to refuse."""
        rid = state.request_id
        if rid in self.requests or rid in self.reserved:
            raise InvalidRequestError("request_id", f"{rid!r} is already running here")
        seq = seq_from_state(state)
        if not seq.num_output_tokens:
            self.attach_groups(seq)
        hits = self.block_manager.match_prefix(seq)
        hits = hits[: num_kv_tokens // self.config.block_size]
        n_new = num_kv_tokens - len(hits) * self.config.block_size
        if not self.block_manager.can_allocate(seq, n_new, hits):
            raise OutOfBlocksError(self.block_manager.blocks_needed_after_hits(seq, n_new, len(hits)),
                                   self.block_manager.num_free_blocks)
        self.block_manager.allocate(seq, n_new, hits)
        self.reserved[rid] = seq
        return len(hits)

    def complete(self, request_id: str, start_block: int,
                 payload: KVPayload | DeviceBlocks | None, num_kv_tokens: int) -> bool:
        """Write pulled blocks and start decoding; with ``payload=None`` recompute instead
        (unless every block was already a prefix hit here). False if aborted meanwhile."""
        seq = self.reserved.pop(request_id, None)
        if seq is None:
            return False  # aborted meanwhile
        written = start_block >= len(seq.block_table)  # every block was a prefix hit here
        if payload is not None and not written:
            try:
                write_blocks(self.runner.kv_caches, seq.block_table[start_block:], payload)
                written = True
            except Exception:
                logger.warning("request %s: KV import failed; recomputing", request_id, exc_info=True)
        if written:
            seq.num_computed_tokens = num_kv_tokens
            self.block_manager.commit(seq)
        else:
            self.block_manager.free(seq)  # recompute the prompt (prefix hits still apply)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return True

    def admit_recompute(self, state: SeqState) -> None:
        """Go on with a request from its state alone (no KV): recompute its tokens here."""
        seq = seq_from_state(state)
        if not seq.num_output_tokens:
            self.attach_groups(seq)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def snapshot(self) -> tuple[list[bytes], int]:
        """Cached hashes and the event sequence they reflect (pending events are dropped)."""
        self.block_manager.take_events()
        return sorted(self.block_manager.pool.cached_hashes()), self.block_manager.pool.event_seq

