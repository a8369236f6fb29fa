"""Per-sequence block tables over the block pool, with automatic prefix caching.

A full block's hash chains its parent's hash with its token ids (and, at the
root, an optional cache salt that isolates tenants), so one hash names a whole
prefix. Hits are verified against the stored token ids.

Sessions: when a finished sequence of a session is freed, its cached full blocks
stay pinned (owner ``session:<id>``, replacing the session's previous pin) so the
next turn's prompt hits them. Session pins are dropped, least recently used first,
when their session idles past ``session_ttl_seconds`` or when an allocation would
otherwise fail: a session never costs running work a preemption.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from pdserve.workers.block_pool import Block, BlockPool
from pdserve.workers.errors import OutOfBlocksError
from pdserve.workers.eviction import check_cache_options
from pdserve.workers.kv_events import BlockHash, KVEventBatch, int64s, pack_tokens
from pdserve.workers.probe_memo import ProbeMemo
from pdserve.workers.sequence import Sequence, SequenceStatus

SESSION_OWNER = "session:"


_ROOT = b"pdserve-root\x00"


def _root(salt: str | None) -> bytes:
    return _ROOT + (salt.encode() if salt else b"")


def _link(head: bytes, tokens: bytes) -> BlockHash:
    """One block's hash: BLAKE2b-128 of its parent's hash (or the salted root) and its
    packed token ids. Every block hash in the project is made here (and by the same call
    inlined in `block_keys`' loop, which hashes every block of every prompt)."""
    return hashlib.blake2b(head + tokens, digest_size=16).digest()


def hash_block(parent: BlockHash | None, token_ids: Iterable[int], salt: str | None = None) -> BlockHash:
    """128-bit BLAKE2b of (parent hash or salted root, little-endian int64 token ids)."""
    ids = token_ids if isinstance(token_ids, (tuple, list)) else tuple(token_ids)
    return _link(_root(salt) if parent is None else parent, pack_tokens(ids))


def block_keys(token_ids: list[int], block_size: int, salt: str | None = None,
               parent: BlockHash | None = None, start: int = 0,
               stop: int | None = None) -> tuple[list[BlockHash], list[bytes]]:
    """Chained hashes of the full blocks ``[start, stop)`` of ``token_ids`` (``parent``: the
    hash of block ``start - 1``; None at the root) and each block's packed token ids.

    The same values as `hash_block` block by block, at a third of the host time: the ids
    are packed in one call and each block costs one hash and one slice (a prefix cache
    registers every block of every prompt, so this sits on the step's critical path).
    """
    if stop is None:
        stop = len(token_ids) // block_size
    if stop <= start:
        return [], []
    w = 8 * block_size
    data = pack_tokens(token_ids[start * block_size:stop * block_size])
    chunks = [data[i:i + w] for i in range(0, len(data), w)]
    hashes: list[BlockHash] = []
    p = _root(salt) if parent is None else parent
    blake2b, append = hashlib.blake2b, hashes.append
    for c in chunks:  # _link, inlined: every block of every prompt passes here
        p = blake2b(p + c, digest_size=16).digest()
        append(p)
    return hashes, chunks


def hash_prompt_blocks(token_ids: list[int], block_size: int, salt: str | None = None) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids`` (what the router computes too)."""
    return block_keys(token_ids, block_size, salt)[0]


def _unreferenced(hits: list[Block]) -> int:
    """Hits that are free cached blocks: taking them takes them off the free list."""
    return sum(1 for b in hits if b.ref_count == 0)


class BlockManager:
    """Allocates, shares and frees the blocks of sequences; answers prefix hits.

    ``eviction_policy``, ``cache_ttl_seconds`` and ``tenant_quota_blocks`` go to the pool
    (see `BlockPool`), as does ``keep_events``; ``session_ttl_seconds`` (None: no limit)
    bounds an idle session pin.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True,
                 worker_id: str = "local", *, eviction_policy: str = "lru",
                 cache_ttl_seconds: float | None = None, tenant_quota_blocks: int | None = None,
                 session_ttl_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, keep_events: bool = True) -> None:
        check_cache_options(session_ttl_seconds=session_ttl_seconds)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, worker_id, enable_caching,
                              eviction_policy=eviction_policy,
                              cache_ttl_seconds=cache_ttl_seconds,
                              tenant_quota_blocks=tenant_quota_blocks, clock=clock,
                              keep_events=keep_events)
        self.session_ttl_seconds = session_ttl_seconds
        self._tables: dict[str, list[int]] = {}  # owner id -> block ids (seqs, leases, sessions)
        self._sessions: OrderedDict[str, float] = OrderedDict()  # id -> last turn's end, oldest first
        self.num_sessions_dropped = 0  # pins given up for room (not by TTL)
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of which found
        self.blocks_ridden = 0  # blocks taken while another sequence computed them (in-step)
        # Bumped whenever an entry of a block table is rewritten or dropped in place (all
        # other changes append, or replace the list): lets the decode graphs' input
        # staging copy only the entries appended since the last step (decode_graphs.py).
        self.table_rewrites = 0
        self.memo = ProbeMemo(block_size)  # recent probes' hits: a shared prefix is hashed once

    # -- queries ------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[Block]:
        """Longest run of cached full blocks at the start of ``seq`` (no refs taken).

        At least one token is always left to compute: its logits sample the next token.
        """
        return self.probe_prefix(seq)[0]

    def probe_prefix(self, seq: Sequence) -> tuple[list[Block], BlockHash | None]:
        """``match_prefix``, and the chained hash of the first full block after the hits
        (None if there is none): two sequences with equal values would compute identical
        blocks from there on (the hash chains over everything before) if run side by side."""
        if not self.enable_caching or seq.block_table:
            return [], None
        return self.cached_prefix(seq.token_ids, seq.cache_salt,
                                  (seq.num_tokens - 1) // self.block_size)

    def cached_prefix(self, ids: list[int], salt: str | None,
                      max_blocks: int) -> tuple[list[Block], BlockHash | None]:
        """The cached blocks that hold the first full blocks of ``ids`` (at most
        ``max_blocks``, up to the first miss), and the missed block's hash (`probe_prefix`)."""
        if max_blocks <= 0:
            return [], None
        bs = self.block_size
        key = (salt, tuple(ids[:bs]))
        hits, used = self.memo.recall(key, ids, max_blocks)  # leading blocks hashed before (a new list)
        reused = len(hits)
        lookup = self.pool.lookup
        pack = int64s(bs).pack
        p = hits[-1].block_hash if hits else _root(salt)
        ahead = None
        for i in range(reused, max_blocks):  # block by block (most prompts miss early)
            toks = pack(*ids[i * bs:(i + 1) * bs])
            p = _link(p, toks)
            b = lookup(p, toks)
            if b is None:
                ahead = p
                break
            hits.append(b)
        self.memo.remember(key, ids, hits, used, reused)
        return hits, ahead

    def ahead_of(self, seq: Sequence) -> BlockHash | None:
        """For a sequence part way through its prompt: the hash `probe_prefix` gives a
        newcomer with the same tokens (that of its first block not yet computed in full),
        None without caching or without that block."""
        if not self.enable_caching:
            return None
        bs = self.block_size
        i = seq.num_computed_tokens // bs
        if (i + 1) * bs > seq.num_tokens or len(seq.block_hashes) != i:
            return None
        parent = seq.block_hashes[-1] if i else None
        return block_keys(seq.token_ids, bs, seq.cache_salt, parent, i, i + 1)[0][0]

    # -- allocation -------------------------------------------------------
    def fits_in_place(self, seq: Sequence, num_new_tokens: int) -> bool:
        """True when ``allocate(seq, num_new_tokens)`` would do nothing: the tokens land in
        blocks ``seq`` already holds, and no fork shares the partial block written first.

        The scheduler's per-step fast path for decode rows (most steps of most sequences).
        """
        bs = self.block_size
        c = seq.num_computed_tokens
        table = seq.block_table
        if (c + num_new_tokens + bs - 1) // bs > len(table):
            return False
        return not (c % bs and num_new_tokens) or self.pool.blocks[table[c // bs]].ref_count <= 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None,
                     reserve: int = 0) -> bool:
        """True if `allocate` will succeed and leave ``reserve`` blocks free; drops session
        pins (oldest first) to make room, but only when that makes enough: a request too
        big for the room all pins hold takes none of them."""
        hits = hits or []
        need = (self.blocks_needed_after_hits(seq, num_new_tokens, len(hits))
                + self._needs_copy(seq, num_new_tokens) + reserve)
        if need + _unreferenced(hits) <= self.pool.num_free:
            return True
        if not self._sessions:
            return False
        # What dropping every pin would give: the blocks only session pins hold come free,
        # and a hit only they held turns from referenced into one taken off the free list.
        pins = Counter(i for s in self._sessions for i in self._tables[SESSION_OWNER + s])
        freed = sum(1 for i, n in pins.items() if self.pool.blocks[i].ref_count == n)
        hits_freed = sum(1 for b in hits if b.ref_count and b.ref_count == pins.get(b.block_id))
        if need + _unreferenced(hits) + hits_freed > self.pool.num_free + freed:
            return False
        while need + _unreferenced(hits) > self.pool.num_free:
            if not self._sessions:  # (the sum above says this cannot happen)
                return False
            self.drop_session(next(iter(self._sessions)))
            self.num_sessions_dropped += 1
        return True

    def _needs_copy(self, seq: Sequence, num_new_tokens: int) -> bool:
        """True when the next write lands in a partial block a fork still shares (copy-on-write)."""
        bs = self.block_size
        if not (seq.num_computed_tokens % bs and num_new_tokens):
            return False
        return self.pool.blocks[seq.block_table[seq.num_computed_tokens // bs]].ref_count > 1

    def blocks_needed_after_hits(self, seq: Sequence, num_new_tokens: int, num_hits: int) -> int:
        total = seq.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table) - num_hits)

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None,
                 ridden: list[Block] | None = None) -> list[tuple[int, int]]:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens (after taking ``hits``).

        ``ridden``: blocks after the hits that another sequence fills in this very step
        (the scheduler checked their tokens); ``seq`` reads them in the same step, as
        every layer writes its new K/V before its attention reads any.

        Returns (src, dst) block copies the runner must do first: copy-on-write of a
        partially filled block that a fork still shares.
        """
        hits = hits or []
        taken = hits + ridden if ridden else hits
        if not self.can_allocate(seq, num_new_tokens, taken):
            raise OutOfBlocksError(self.blocks_needed_after_hits(seq, num_new_tokens, len(taken)),
                                   self.pool.num_free)
        if taken:
            assert not seq.block_table and seq.num_computed_tokens == 0
            self.pool.hit(taken)
            seq.block_table.extend(b.block_id for b in taken)
            # the ridden blocks get their hashes when filled (commit takes them from there)
            seq.block_hashes = [b.block_hash for b in hits]  # type: ignore[misc]
            seq.num_computed_tokens = len(taken) * self.block_size
            self.blocks_ridden += len(taken) - len(hits)
        self._tables[seq.seq_id] = seq.block_table
        copies: list[tuple[int, int]] = []
        bs = self.block_size
        if self._needs_copy(seq, num_new_tokens):  # shared partial block about to be written
            idx = seq.num_computed_tokens // bs
            last = self.pool.blocks[seq.block_table[idx]]
            (new,) = self.pool.allocate(1)
            self.pool.free([last])
            seq.block_table[idx] = new.block_id
            self.table_rewrites += 1
            copies.append((last.block_id, new.block_id))
        need = self.blocks_needed(seq, num_new_tokens)
        if need:
            seq.block_table.extend(b.block_id for b in self.pool.allocate(need))
        return copies

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def commit(self, seq: Sequence) -> None:
        """Register blocks that became full of computed tokens in the prefix cache."""
        if not self.enable_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        start = len(seq.block_hashes)
        if n_full <= start:  # no block became full: the common decode step
            return
        table, pool_blocks = seq.block_table, self.pool.blocks
        # Blocks this sequence rode (see allocate) carry the hash their writer gave them
        # (it commits first, in the step's order): the same chain, taken without hashing.
        while start < n_full and (h := pool_blocks[table[start]].block_hash) is not None:
            seq.block_hashes.append(h)
            start += 1
        if n_full <= start:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        new_hashes, chunks = block_keys(seq.token_ids, bs, seq.cache_salt, parent, start, n_full)
        blocks = [self.pool.blocks[i] for i in seq.block_table[start:n_full]]
        self.pool.cache_full_blocks(blocks, new_hashes, chunks, parent, tenant=seq.cache_salt,
                                    depth=start)
        seq.block_hashes.extend(new_hashes)

    def truncate(self, seq: Sequence) -> None:
        """Free the blocks past ``seq.num_computed_tokens`` (rejected speculative KV)."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        extra = seq.block_table[keep:]
        if extra:
            del seq.block_table[keep:]
            self.table_rewrites += 1
            self.pool.free([self.pool.blocks[i] for i in reversed(extra)])
        del seq.block_hashes[seq.num_computed_tokens // self.block_size:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share every block of ``parent`` with ``child`` (beams, n > 1 samples)."""
        for bid in parent.block_table:
            self.pool.touch(self.pool.blocks[bid])
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        self._tables[child.seq_id] = child.block_table

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (tail first) and forget its table.

        A finished sequence of a session first hands its cached blocks to the session.
        """
        if seq.session_id is not None and seq.status is SequenceStatus.FINISHED:
            self.keep_session(seq.session_id, seq.block_hashes)
        self.free_table(seq.seq_id, seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def free_table(self, owner: str, block_ids: list[int]) -> None:
        self._tables.pop(owner, None)
        self.pool.free([self.pool.blocks[i] for i in reversed(block_ids)])

    def pin(self, owner: str, block_ids: list[int]) -> None:
        """Take a reference on blocks for a non-sequence owner (a KV lease)."""
        for bid in block_ids:
            self.pool.touch(self.pool.blocks[bid])
        self._tables[owner] = list(block_ids)

    def unpin(self, owner: str) -> bool:
        ids = self._tables.get(owner)
        if ids is None:
            return False
        if owner.startswith(SESSION_OWNER):
            self._sessions.pop(owner[len(SESSION_OWNER):], None)
        self.free_table(owner, ids)
        return True

    # -- sessions -----------------------------------------------------------------
    def keep_session(self, session_id: str, block_hashes: list[BlockHash]) -> int:
        """Pin the cached blocks of ``block_hashes`` (a chain) for the session's next turn,
        replacing its previous pin; returns how many blocks are pinned.

        The pin goes on the block each hash resolves to (what the next turn's lookup
        finds), up to the first hash no longer cached.
        """
        ids = []
        for h in block_hashes:
            b = self.pool.cached.get(h)
            if b is None:
                break
            ids.append(b.block_id)
        owner = SESSION_OWNER + session_id
        old = self._tables.pop(owner, None)
        self._sessions.pop(session_id, None)
        if ids:  # pin the new blocks before unpinning the old: shared ones stay referenced
            self.pin(owner, ids)
            self._sessions[session_id] = self.pool.clock()
        if old is not None:
            self.pool.free([self.pool.blocks[i] for i in reversed(old)])
        return len(ids)

    def drop_session(self, session_id: str) -> bool:
        """Unpin a session's blocks (they stay cached until evicted); False if none."""
        self._sessions.pop(session_id, None)
        return self.unpin(SESSION_OWNER + session_id)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def expire(self, now: float | None = None) -> None:
        """Between steps: drop idle sessions past their TTL, and blocks the policy expires."""
        now = self.pool.clock() if now is None else now
        ttl = self.session_ttl_seconds
        if ttl is not None:
            while self._sessions:
                session_id, last = next(iter(self._sessions.items()))
                if last + ttl > now:
                    break
                self.drop_session(session_id)
        self.pool.expire(now)

    def owners(self) -> list[str]:
        return list(self._tables)

    def take_events(self) -> KVEventBatch | None:
        return self.pool.take_events()

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def check_integrity(self) -> None:
        """Pool invariants plus: each block's ref_count equals the tables that hold it."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for owner, table in self._tables.items():
            assert len(set(table)) == len(table), f"{owner} holds a block twice"
            for bid in table:
                refs[bid] += 1
        for b in self.pool.blocks:
            assert b.ref_count == refs[b.block_id], (
                f"block {b.block_id}: ref_count {b.ref_count} but {refs[b.block_id]} holders")
        pinned = {o[len(SESSION_OWNER):] for o in self._tables if o.startswith(SESSION_OWNER)}
        assert pinned == set(self._sessions), "session pins and the session list disagree"
