"""Overlapped scheduling: step N+1 is scheduled and launched while step N's tokens are
still on the device, so the host's work for one step hides behind the GPU's work for
the one before.

A step whose sampling rows are all *plain* (greedy, or drawn without a seed of their own;
no logprobs, no logit edits, no beams, drafts or KV-only prefills) samples on the device
(``sampler.sample_on_device``) and does not wait for its tokens. Each row that may go
on gets a placeholder ``-1 - row`` at the end of ``token_ids``; the scheduler treats it
as a token like any other (one decode token at that position), and the model runner
replaces it on the device with row ``row`` of the step's sampled tokens before the
model reads its inputs. The next step lands the tokens (one copy the GPU made while the
host scheduled) and runs stop checks and detokenization only after its own launch::

    host:  schedule N+1 | launch N+1 | land N (stop checks, text) | schedule N+2 | ...
    GPU:   ....... step N ........... | ........ step N+1 ..........| ...

A row that reaches max_tokens or the context limit with its token gets no placeholder
(it ends whatever the token is). A row that ends by EOS, a stop token or a stop string
is found one step late: the extra row it ran is dropped and its blocks freed; that
extra KV is its real next token, written into a block that is never hashed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.workers.sequence import Sequence


def placeholder(row: int) -> int:
    return -1 - row


def plain(seq: Sequence) -> bool:
    """Whether this row's next token can stay on the device until the next step lands it."""
    ok = seq.overlap_ok
    if ok is None:  # what cannot change while it runs, worked out once
        p = seq.params
        ok = seq.overlap_ok = (
            (p.temperature == 0.0 or p.seed is None) and p.logprobs is None
            and not seq.prefill_only
            and seq.beam is None and (seq.parallel is None or seq.parallel.forked)
            and seq.held_token is None and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)
    return ok and not seq.drafts and seq.num_output_tokens >= seq.params.min_tokens


def resolve_placeholders(ids: torch.Tensor, tokens: torch.Tensor) -> None:
    """In place, on the device: every id ``-1 - i`` in ``ids`` becomes ``tokens[i]``."""
    rows = (-1 - ids).clamp_(min=0)
    ids.copy_(torch.where(ids < 0, tokens[rows], ids))


@dataclass(slots=True)
class InFlight:
    """A step whose sampled tokens have not reached the host yet."""

    seqs: list[Sequence | None]  # its sampling rows in row order; None: dropped (ended)
    tokens: torch.Tensor  # [rows] int64 on the device: what the next step's inputs read
    host: torch.Tensor  # the same tokens, copied without blocking (pinned memory on CUDA)
    copied: torch.cuda.Event | None

    def token_list(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


class TokenStaging:
    """Two pinned host buffers, used in turn: step N's copy lands in one while step N+1's
    tokens are copied into the other."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: list[torch.Tensor] = []
        self.turn = 0

    def launch(self, seqs: list[Sequence | None], tokens: torch.Tensor) -> InFlight:
        if self.device.type != "cuda":
            return InFlight(seqs, tokens, tokens, None)
        n = tokens.numel()
        self.turn ^= 1
        if len(self.bufs) < 2 or self.bufs[self.turn].numel() < n:
            size = max(256, 2 * n)
            self.bufs = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        host = self.bufs[self.turn][:n]
        host.copy_(tokens, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return InFlight(seqs, tokens, host, ev)
