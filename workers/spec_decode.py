"""Speculative decoding: proposers, exact verification, and rollback bookkeeping.

A running sequence gets ``k`` draft tokens appended; the target model scores all of
them in one forward pass (k + 1 logit rows). Greedy keeps the longest prefix that equals
the target's argmax, then the target's own token. Sampling uses rejection sampling, so
the output distribution is exactly the target's: a draft x with draft probability q(x)
is kept with probability min(1, p(x)/q(x)); on rejection the token is drawn from
normalise(max(0, p - q)). The KV written for rejected drafts is rolled back by the
engine (token count and blocks) before any block is registered in the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdserve.workers.sampler import filter_probs
from pdserve.workers.sequence import Sequence


@dataclass(frozen=True, slots=True)
class SpecConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) or "draft" (a smaller model)
    num_tokens: int = 4  # the most drafts per step
    adaptive: bool = True  # shrink/grow k with the measured acceptance rate
    ngram_max: int = 3
    ngram_min: int = 1
    draft_model: str | None = None


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n from ngram_max down to ngram_min) and propose the tokens that followed it."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose(self, tokens: list[int], k: int) -> list[int]:
        n_tok = len(tokens)
        for n in range(min(self.ngram_max, n_tok - 1), self.ngram_min - 1, -1):
            tail = tokens[n_tok - n:]
            for start in range(n_tok - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow
        return []


def target_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    return torch.stack([filter_probs(row, p.temperature, p.top_k_or_none, p.top_p, p.min_p)
                        for row in logits.float()])


def verify(seq: Sequence, drafts: list[int], logits: torch.Tensor,
           draft_probs: torch.Tensor | None) -> list[int]:
    """Tokens to emit: the accepted drafts, then one token from the target (k + 1 rows).

    ``draft_probs`` [k, vocab] is the draft distribution (None: a deterministic proposer).
    """
    if seq.params.temperature == 0.0:
        target = logits.argmax(dim=-1).tolist()
        out = []
        for i, d in enumerate(drafts):
            if target[i] != d:
                return out + [target[i]]
            out.append(d)
        return out + [target[len(drafts)]]
    probs = target_probs(logits, seq)
    gen = seq.generator
    out = []
    for i, d in enumerate(drafts):
        p = probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        accept = min(1.0, float(p[d]) / q_d) if q_d > 0 else 0.0
        if float(torch.rand((), generator=gen)) < accept:
            out.append(d)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp(min=0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p
        return out + [int(torch.multinomial(residual, 1, generator=gen))]
    return out + [int(torch.multinomial(probs[len(drafts)], 1, generator=gen))]


@dataclass(slots=True)
class AdaptiveK:
    """Per-sequence number of drafts, steered by an exponential average of acceptance."""

    k_max: int
    k: int = 0
    rate: float = 0.7

    def __post_init__(self) -> None:
        self.k = self.k_max

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.rate = 0.7 * self.rate + 0.3 * (accepted / proposed)
        # Expected accepted run length under a per-token acceptance rate r is r/(1-r).
        target = self.rate / max(1e-3, 1.0 - self.rate)
        self.k = max(1, min(self.k_max, round(target) + 1))


class SpecDecoder:
    """Chooses which running sequences speculate this step and appends their drafts."""

    def __init__(self, config: SpecConfig, max_model_len: int, draft: Any = None) -> None:
        if config.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method {config.method!r} is not available")
        if config.method == "draft" and draft is None:
            raise ValueError("the draft method needs a draft model")
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.ngram_max, config.ngram_min)
        self.draft = draft  # DraftModelProposer for method "draft"
        self.num_proposed = 0
        self.num_accepted = 0
        self.num_steps = 0

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        p = seq.params
        return (seq.num_computed_tokens == seq.num_tokens - 1 and seq.num_output_tokens > 0
                and seq.beam is None and not seq.prefill_only and p.logprobs is None
                and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and seq.num_output_tokens >= p.min_tokens)

    def propose(self, running: list[Sequence]) -> None:
        chosen: list[tuple[Sequence, int]] = []
        for seq in running:
            if seq.drafts or not self.eligible(seq):
                continue
            if seq.spec is None:
                seq.spec = AdaptiveK(self.config.num_tokens)
            k = seq.spec.k if self.config.adaptive else self.config.num_tokens
            room = min(seq.params.max_tokens - seq.num_output_tokens,
                       self.max_model_len - seq.num_tokens) - 1
            k = min(k, room)
            if k > 0:
                chosen.append((seq, k))
        if self.draft is not None:
            self.draft.gc({s.seq_id for s in running})
            proposals = self.draft.propose([s for s, _ in chosen], [k for _, k in chosen])
        else:
            proposals = [(self.proposer.propose(s.token_ids, k), None) for s, k in chosen]
        for (seq, _), (drafts, q) in zip(chosen, proposals, strict=True):
            if drafts:
                seq.drafts = drafts
                seq.draft_probs = q
                seq.token_ids.extend(drafts)

    def settle(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Verify ``seq``'s k drafts against its k + 1 rows of target ``logits`` and take
        them off its tokens (the caller appends what holds); returns the tokens to emit."""
        k = len(seq.drafts)
        drafts, seq.drafts = seq.drafts, []
        q, seq.draft_probs = seq.draft_probs, None
        emit = verify(seq, drafts, logits, q)
        del seq.token_ids[-k:]
        self.record(seq, k, len(emit) - 1)
        return emit

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        self.num_proposed += proposed
        self.num_accepted += accepted
        self.num_steps += 1
        if seq.spec is not None:
            seq.spec.update(proposed, accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0


def drop_drafts(seq: Sequence) -> None:
    """Take unverified drafts back off the sequence (it could not run them this step)."""
    if seq.drafts:
        del seq.token_ids[-len(seq.drafts):]
        seq.drafts = []
        seq.draft_probs = None
