"""Recent prefix-cache probes, so that prompts sharing leading blocks hash them once.

A probe finds a prompt's cached blocks by hashing it block by block (a BLAKE2b chain,
block_manager.py): ~2 µs of host time a block. A burst of requests on one system prompt
hashed that prompt once per request, on the engine thread: 120 requests on 2,048-token
prompts took 17 ms on the dev CPU and 25-34 ms on the H100's host, in one schedule() call.

The memo keeps the hit blocks of recent probes, keyed by the cache salt and the prompt's
first block of token ids. A prompt whose leading blocks hold the same token ids as a memo's
takes those blocks, as long as each block still holds the very hash object it held when the
memo was made (a block that was evicted or cached again since holds another, or none);
only the rest of the prompt is hashed. Equal token ids under an equal chain mean the hashes
a probe would compute, and the blocks were verified against these token ids when the memo
was made, so a memo hit returns what the full probe would.
"""

from __future__ import annotations

import operator
from collections import OrderedDict

from pdserve.workers.block_pool import Block

Key = tuple  # (cache salt, the first block's token ids)


class _Probe:
    __slots__ = ("ids", "blocks", "hashes")

    def __init__(self, ids: list[int], blocks: list[Block]) -> None:
        self.ids = ids  # the token ids of ``blocks`` (a copy: a prompt's list grows)
        self.blocks = blocks
        self.hashes = [b.block_hash for b in blocks]


def common_blocks(a: list[int], b: list[int], m: int, bs: int) -> int:
    """How many of the first ``m`` blocks of ``bs`` token ids ``a`` and ``b`` share."""
    n = m * bs
    if a[:n] == b[:n]:  # the common case: the whole memo
        return m
    lo, hi = 0, m  # blocks [0, lo) equal; [lo, hi) holds the first difference
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo * bs:mid * bs] == b[lo * bs:mid * bs]:
            lo = mid
        else:
            hi = mid
    return lo


class ProbeMemo:
    """Up to ``variants`` recent probes per key (system prompts that begin alike), keys
    dropped least recently used first past ``max_tokens`` token ids held in all."""

    def __init__(self, block_size: int, max_tokens: int = 1 << 20, variants: int = 4) -> None:
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.variants = variants
        self._entries: OrderedDict[Key, list[_Probe]] = OrderedDict()
        self._tokens = 0
        self.blocks_reused = 0  # blocks a probe took from the memo instead of hashing

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def recall(self, key: Key, ids: list[int], max_blocks: int) -> tuple[list[Block], _Probe | None]:
        """The longest run of leading blocks of ``ids`` (at most ``max_blocks``) that a
        memo holds and that are still cached as they were; and that memo."""
        entries = self._entries.get(key)
        if not entries:
            return [], None
        self._entries.move_to_end(key)
        best, k = None, 0
        for e in entries:
            n = common_blocks(ids, e.ids, min(max_blocks, len(e.blocks)), self.block_size)
            if n > k:
                best, k = e, n
        if best is None:
            return [], None
        blocks = best.blocks[:k]
        same = list(map(operator.is_, [b.block_hash for b in blocks], best.hashes[:k]))
        if not all(same):  # a block was evicted or recached: the memo stops before it
            k = same.index(False)
            self._truncate(key, best, k)
            if not k:
                return [], None
            blocks = blocks[:k]
        self.blocks_reused += k
        return blocks, best

    def _truncate(self, key: Key, entry: _Probe, k: int) -> None:
        """Keep ``entry``'s first ``k`` blocks; with none left, forget it."""
        bs = self.block_size
        self._tokens -= len(entry.ids) - k * bs
        del entry.blocks[k:], entry.hashes[k:], entry.ids[k * bs:]
        if not k:
            entries = self._entries[key]
            entries.remove(entry)
            if not entries:
                del self._entries[key]

    def remember(self, key: Key, ids: list[int], hits: list[Block], used: _Probe | None,
                 reused: int) -> None:
        """Keep a probe's ``hits`` unless the memo ``used`` (of which it took ``reused``
        blocks) already held them all; a memo it extended is replaced."""
        if len(hits) <= reused:
            return
        bs = self.block_size
        entry = _Probe(ids[:len(hits) * bs], list(hits))
        entries = self._entries.setdefault(key, [])
        self._entries.move_to_end(key)
        if used is not None and reused == len(used.blocks):  # extends that memo
            entries.remove(used)
            self._tokens -= len(used.ids)
        entries.append(entry)
        self._tokens += len(entry.ids)
        while len(entries) > self.variants:
            self._tokens -= len(entries.pop(0).ids)
        while self._tokens > self.max_tokens and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= sum(len(e.ids) for e in dropped)

