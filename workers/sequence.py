"""Per-request state that the scheduler, block manager and runner share."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.workers.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass(slots=True)
class Sequence:
    """One sequence of tokens being generated (a request has one; beams have several).

    ``token_ids`` holds prompt then output. ``num_computed_tokens`` of them have
    KV in the sequence's blocks (``block_table``); the rest run in later steps.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: float
    priority: int = 0
    cache_salt: str | None = None
    session_id: str | None = None  # when it finishes, its blocks stay pinned for the next turn
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    # prompt tokens it took from a prompt computed in the same step (riding: scheduler.py)
    num_ridden_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of full blocks, in order
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    # Detokenizer state (see detokenizer.py) and the text produced so far.
    output_text: str = ""
    emitted_text_len: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    # tokenizers' DecodeStream, fed the first detok_fed tokens; False: this sequence uses
    # the offsets. Not init fields: dataclasses.replace (forks, beams) gives the copy a
    # stream of its own.
    detok: Any = field(default=None, init=False, repr=False, compare=False)
    detok_fed: int = field(default=0, init=False, repr=False, compare=False)
    # Set when the sequence only runs the prompt (a prefill worker): keep blocks when done.
    prefill_only: bool = False
    first_scheduled: float | None = None
    first_token_time: float | None = None
    seq_id: str = ""  # unique per sequence; defaults to the request id
    beam: Any = None  # the BeamGroup this sequence is a beam of (beam search only)
    parallel: Any = None  # the ParallelGroup of an n > 1 request
    index: int = 0  # which of the n samples this is
    held_token: int | None = None  # KV-only prefill: the last prompt token, run by decode
    drafts: list[int] = field(default_factory=list)  # speculative tokens appended this step
    spec: Any = None  # AdaptiveK: this sequence's number of drafts
    draft_probs: Any = None  # [k, vocab] draft distribution (draft model, sampled requests)
    overlap_ok: bool | None = None  # overlap.plain's fixed part, once known

    def __post_init__(self) -> None:
        if not self.seq_id:
            self.seq_id = self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float]:
        """Waiting-queue order: lower priority value first, then arrival."""
        return (self.priority, self.arrival)
