"""The draft-model proposer of speculative decoding: a smaller model with the same
tokenizer proposes k tokens autoregressively; its distribution q goes to verification
so that rejection sampling keeps the target's distribution exactly.

The draft keeps a KV cache of its own, in its own block pool, with one shadow sequence
per target sequence. After verification the shadow is cut back to the longest prefix it
shares with the target, so rejected draft KV is simply overwritten later.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.errors import OutOfBlocksError
from pdserve.workers.model_runner import ModelRunner
from pdserve.workers.models.loader import load_model
from pdserve.workers.sampler import filter_probs
from pdserve.workers.scheduler import ScheduledSeq, SchedulerOutput
from pdserve.workers.sequence import Sequence


class DraftModelProposer:
    def __init__(self, model_path: str, dtype: str, device: torch.device, num_blocks: int,
                 block_size: int, vocab_size: int) -> None:
        self.model = load_model(model_path, dtype, device)
        if self.model.config.vocab_size != vocab_size:
            raise ValueError(f"draft vocab {self.model.config.vocab_size} != target {vocab_size}")
        self.bm = BlockManager(num_blocks, block_size, enable_caching=False, worker_id="draft")
        self.runner = ModelRunner(self.model, num_blocks, block_size, device)
        self.shadows: dict[str, Sequence] = {}

    def _shadow(self, seq: Sequence) -> Sequence:
        sh = self.shadows.get(seq.seq_id)
        if sh is None:
            sh = replace(seq, token_ids=[], block_table=[], block_hashes=[], num_computed_tokens=0,
                         drafts=[], spec=None, beam=None, parallel=None, generator=None)
            self.shadows[sh.seq_id] = sh
        # Keep the longest common prefix of what the draft computed and the target's tokens.
        lcp = 0
        for a, b in zip(sh.token_ids[:sh.num_computed_tokens], seq.token_ids, strict=False):
            if a != b:
                break
            lcp += 1
        sh.token_ids = list(seq.token_ids)
        sh.num_computed_tokens = min(lcp, len(sh.token_ids) - 1)
        self.bm.truncate(sh)
        return sh

    def gc(self, live: set[str]) -> None:
        for sid in [s for s in self.shadows if s not in live]:
            self.bm.free(self.shadows.pop(sid))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Drafts (and their distributions for sampled requests) for each sequence."""
        shadows = [self._shadow(s) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for step in range(max(ks, default=0)):
            active = [i for i in active if step < ks[i]]
            if not active:
                break
            out = SchedulerOutput()
            ok = []
            for i in active:
                sh = shadows[i]
                n = sh.num_tokens - sh.num_computed_tokens
                try:
                    out.block_copies += self.bm.allocate(sh, n)
                except OutOfBlocksError:
                    continue  # no room in the draft cache: this sequence stops drafting
                out.scheduled.append(ScheduledSeq(sh, n))
                ok.append(i)
            active = ok
            if not active:
                break
            batch, logits = self.runner.execute(out)
            order = {id(s.seq): j for j, s in enumerate(batch)}
            for s in batch:
                s.seq.num_computed_tokens += s.num_new_tokens
            for i in active:
                row = logits[order[id(shadows[i])]]
                p = seqs[i].params
                if p.temperature == 0.0:
                    tok = int(row.argmax())
                else:
                    q = filter_probs(row.float().cpu(), p.temperature, p.top_k_or_none, p.top_p, p.min_p)
                    tok = int(torch.multinomial(q, 1, generator=seqs[i].generator))
                    probs[i].append(q)
                drafts[i].append(tok)
                shadows[i].token_ids.append(tok)
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, probs, strict=True)]
