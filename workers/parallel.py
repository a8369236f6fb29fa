"""Parallel sampling (``n > 1``): one prompt, n independent samples sharing its blocks.

The prompt runs once; when its logits are ready the sequence forks into n sequences
that share every prompt block by reference count, each with its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ParallelGroup:
    n: int
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    remaining: int = 0
    completion_tokens: int = 0


def fan_out(seq: Sequence, bm: BlockManager) -> list[Sequence]:
    """Fork ``seq`` (prompt computed, nothing sampled) into its n-1 siblings."""
    g: ParallelGroup = seq.parallel
    g.forked = True
    seed = seq.params.seed
    children = []
    for i in range(1, g.n):
        child = replace(seq, token_ids=list(seq.token_ids), block_table=[], block_hashes=[],
                        seq_id=f"{seq.request_id}#{i}", index=i,
                        generator=torch.Generator().manual_seed(seed + i) if seed is not None else None)
        bm.fork(seq, child)
        child.status = SequenceStatus.RUNNING
        children.append(child)
    g.seqs = [seq, *children]
    g.remaining = g.n
    return children
