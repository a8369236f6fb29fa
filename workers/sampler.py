"""Turns the last-position logits of a batch into next tokens, per request parameters.

Order per row: penalties (repetition on prompt+output, presence/frequency on
output) -> min_tokens masking -> greedy argmax, or temperature -> top-k -> top-p
-> min-p -> a draw from the request's own generator (so a seed reproduces
whatever else shares the batch). Logprobs come from the raw model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.workers.sequence import Sequence


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The chosen token's log-probability and, if asked, the top-n alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty divides positive / multiplies negative logits of seen tokens."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                          vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = seq.output_token_ids
            if out:
                ids = torch.tensor(out, dtype=torch.long, device=logits.device)
                counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                    0, ids, torch.ones(len(out), device=logits.device))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def mask_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[i, banned] = float("-inf")


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                 min_p: float) -> torch.Tensor:
    """One row's sampling distribution after temperature, top-k, top-p and min-p."""
    x = logits / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) >= top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _edits_logits(seq: Sequence) -> bool:
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on ``device`` through pinned memory and a non-blocking copy, so the host
    does not wait for the work already queued on the device."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence],
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [rows] (int64, on the logits' device) without a host round trip.

    Greedy rows take the argmax; the others draw from ``filter_probs``'s distribution
    (temperature, top-k, top-p, min-p per row, vectorized) by the exponential race:
    argmax(p / E) with E ~ Exp(1) is an exact sample of p. Rows must not need the host's
    per-request generator (a seed), penalties or logprobs (``overlap.plain``)."""
    greedy = logits.argmax(dim=-1)
    drawn = [i for i, s in enumerate(seqs) if s.params.temperature != 0.0]
    if not drawn:
        return greedy
    rows = [seqs[i].params for i in drawn]
    idx = _to_device(drawn, torch.int64, logits.device)
    temp, top_k, top_p, min_p = _to_device(  # top-k 0: off
        [[p.temperature for p in rows], [float(p.top_k_or_none or 0) for p in rows],
         [p.top_p for p in rows], [p.min_p for p in rows]], torch.float32, logits.device)
    x = logits.index_select(0, idx).float() / temp[:, None]
    if any(p.top_k_or_none is not None for p in rows):
        k = top_k.long().clamp(min=1, max=x.shape[1])
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((top_k[:, None] > 0) & (x < kth), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1.0 for p in rows):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    if any(p.min_p > 0.0 for p in rows):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return greedy.index_copy(0, idx, (probs / race).argmax(dim=-1))


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0,
                 device: torch.device | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded requests
        # unseeded draws made on the device (overlapped steps) take theirs from here
        self.device_generator = (torch.Generator(device=device).manual_seed(seed)
                                 if device is not None else self.generator)

    def on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        return sample_on_device(logits, seqs, self.device_generator)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        logits = logits.float()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(_edits_logits(s) for s in seqs):
            logits = logits.clone()
            apply_penalties(logits, seqs)
            mask_min_tokens(logits, seqs, self.eos_token_ids)
        # Per batch, not per row: the argmax runs on the device and comes back in one copy;
        # rows that draw bring their logits to the host in one more.
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature != 0.0]
        greedy = logits.argmax(dim=-1)
        if sampled:
            rows = logits[sampled].cpu()
        tokens: list[int] = greedy.tolist()  # the greedy rows' tokens; drawn rows overwrite theirs
        for j, i in enumerate(sampled):  # in row order: each draw advances its generator
            seq = seqs[i]
            p = seq.params
            probs = filter_probs(rows[j], p.temperature, p.top_k_or_none, p.top_p, p.min_p)
            gen = seq.generator if seq.generator is not None else self.generator
            tokens[i] = int(torch.multinomial(probs, 1, generator=gen))
        if raw_logprobs is None:
            return SampleResult(tokens, [None] * len(seqs))
        lps: list[Logprobs | None] = []
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                lps.append(None)
                continue
            row = raw_logprobs[i]
            top: tuple[tuple[int, float], ...] = ()
            if n > 0:
                v, ix = row.topk(n)
                top = tuple(zip(ix.tolist(), v.tolist(), strict=True))
            lps.append(Logprobs(tokens[i], float(row[tokens[i]]), top))
        return SampleResult(tokens, lps)
