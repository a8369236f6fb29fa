"""Beam search over paged blocks: beams share their prefix blocks by reference count and
copy a block only when a beam writes into a shared partially filled one.

The selection rule follows Hugging Face transformers' beam search (same beams, same
scores): each step takes the top ``max(2, 1 + n_eos) * width`` continuations over all
live beams; the best ``width`` that do not stop continue; stopping ones among the first
``width`` ranks become finished hypotheses scored ``sum_logprobs / gen_len**length_penalty``;
the search ends when no running beam can beat the worst kept hypothesis, when
``early_stopping`` and ``width`` hypotheses are done, or at ``max_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pdserve.workers.outputs import TokenChunk, Usage
from pdserve.workers.sequence import FinishReason, Sequence, SequenceStatus

NEG = -1.0e9


@dataclass(frozen=True, slots=True)
class BeamResult:
    token_ids: tuple[int, ...]  # generated tokens (EOS included when it ended the beam)
    score: float  # length-normalised log-probability
    text: str = ""


@dataclass(slots=True)
class BeamGroup:
    request_id: str
    width: int
    length_penalty: float
    early_stopping: bool
    max_tokens: int
    eos_ids: tuple[int, ...]
    num_prompt_tokens: int
    beams: list[Sequence] = field(default_factory=list)  # live beams, best first
    scores: list[float] = field(default_factory=list)  # their cumulative log-probs
    finished: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    improvable: bool = True
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # seq_id -> logprobs row
    forks: int = 0

    @property
    def beams_to_keep(self) -> int:
        return max(2, 1 + len(self.eos_ids)) * self.width

    def ready(self) -> bool:
        return all(s.seq_id in self.pending for s in self.beams)

    def select(self) -> tuple[list[tuple[int, int, float]], bool]:
        """Consume the pending rows; return the next running beams as (parent index, token,
        cumulative score), best first, and whether the search is over."""
        logprobs = torch.stack([self.pending.pop(s.seq_id) for s in self.beams])
        vocab = logprobs.shape[1]
        acc = (logprobs + torch.tensor(self.scores)[:, None]).reshape(-1)
        k = min(self.beams_to_keep, acc.numel())
        top_scores, top_idx = torch.topk(acc, k)
        gen_len = self.beams[0].num_output_tokens + 1  # all beams have the same length
        at_limit = gen_len >= self.max_tokens
        cands = []
        for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist(), strict=True)):
            parent, token = divmod(idx, vocab)
            stops = at_limit or token in self.eos_ids
            cands.append((rank, parent, token, score, stops))
        # Finished hypotheses: stopping candidates in the first `width` ranks.
        full = len(self.finished) >= self.width and self.early_stopping
        if self.improvable and not full:
            for rank, parent, token, score, stops in cands:
                if stops and rank < self.width:
                    toks = tuple(self.beams[parent].output_token_ids) + (token,)
                    self.finished.append((score / (gen_len ** self.length_penalty), toks))
            self.finished.sort(key=lambda h: -h[0])
            del self.finished[self.width:]
        running = [(parent, token, score) for _, parent, token, score, stops in cands if not stops]
        running = running[: self.width]
        done = not running
        if not done:
            # Early-stop heuristic (transformers' default, early_stopping=False).
            best = running[0][2] / (gen_len ** self.length_penalty)
            worst = min(h[0] for h in self.finished) if len(self.finished) >= self.width else NEG
            self.improvable = self.improvable and best > worst
            if not self.improvable or (self.early_stopping and len(self.finished) >= self.width):
                done = True
        return running, done

    def results(self, n: int) -> list[BeamResult]:
        return [BeamResult(toks, score) for score, toks in self.finished[:n]]


def step_group(g: BeamGroup, scheduler: Any, block_manager: Any, tokenizer: Any
               ) -> TokenChunk | None:
    """One step of a group whose beams' rows are all in: the next beams (a beam with two
    children forks, sharing its blocks; one with none leaves the scheduler), or, when the
    search is over, its final chunk (every beam removed; the caller drops the request)."""
    running, done = g.select()
    if done:
        first = g.beams[0]
        for b in g.beams:
            scheduler.remove(b)
        results = [replace(r, text=tokenizer.decode(
            r.token_ids, skip_special_tokens=first.params.skip_special_tokens))
            for r in g.results(first.params.n)]
        best = results[0]
        stopped = bool(best.token_ids) and best.token_ids[-1] in g.eos_ids
        first.finish_reason = FinishReason.STOP if stopped else FinishReason.LENGTH
        usage = Usage(g.num_prompt_tokens, len(best.token_ids), first.num_cached_tokens)
        return TokenChunk(g.request_id, best.token_ids, best.text, finished=True,
                          finish_reason=first.finish_reason.value, usage=usage,
                          beams=tuple(results))
    old, used = g.beams, set()
    new: list[tuple[Sequence, int, float]] = []
    for parent, token, score in running:
        p = old[parent]
        if parent in used:  # a second child of the same beam: share its blocks
            child = replace(p, token_ids=list(p.token_ids), block_table=[],
                            block_hashes=[], seq_id=f"{g.request_id}#{len(old) + g.forks}")
            g.forks += 1
            block_manager.fork(p, child)
            child.status = SequenceStatus.RUNNING
            scheduler.running.append(child)
            new.append((child, token, score))
        else:
            used.add(parent)
            new.append((p, token, score))
    for i, p in enumerate(old):
        if i not in used:
            scheduler.remove(p)
    for seq, token, _ in new:
        seq.token_ids.append(token)
    g.beams = [s for s, _, _ in new]
    g.scores = [sc for _, _, sc in new]
    return None
