"""Per-request sampling parameters and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.workers.errors import InvalidRequestError

_PREFIX = "sampling_params"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` means greedy. ``top_k`` of ``-1`` (or ``None``) disables
    top-k; ``top_p == 1`` and ``min_p == 0`` disable those filters.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top-n
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept lists/single strings from callers and keep the dataclass hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and not self.use_beam_search

    @property
    def beam_width(self) -> int:
        return self.best_of or self.n

    @property
    def top_k_or_none(self) -> int | None:
        return None if self.top_k in (None, -1) else self.top_k

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field."""

        def bad(name: str, msg: str) -> None:
            raise InvalidRequestError(f"{_PREFIX}.{name}", msg)

        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, f"must be a number, got {type(value).__name__}")
            if not math.isfinite(value):  # type: ignore[arg-type]
                bad(name, f"must be finite, got {value}")
            return float(value)  # type: ignore[arg-type]

        def integer(name: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, f"must be an integer, got {type(value).__name__}")
            return value  # type: ignore[return-value]

        if integer("max_tokens", self.max_tokens) < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if number("temperature", self.temperature) < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            k = integer("top_k", self.top_k)
            if k == 0:
                bad("top_k", "0 is meaningless; use -1 (or omit it) to disable top-k")
            if k < -1:
                bad("top_k", f"must be -1 (disabled) or >= 1, got {k}")
        top_p = number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= number("min_p", self.min_p) <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= number("presence_penalty", self.presence_penalty) <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= number("frequency_penalty", self.frequency_penalty) <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and not 0 <= integer("seed", self.seed) < 2**63:
            bad("seed", f"must be in [0, 2**63), got {self.seed}")
        if integer("min_tokens", self.min_tokens) < 0:
            bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= 20:
            bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if integer("n", self.n) < 1:
            bad("n", f"must be at least 1, got {self.n}")
        if self.use_beam_search:
            if self.temperature != 0.0 and self.temperature != 1.0:
                bad("temperature", "beam search is deterministic; leave temperature unset")
            if self.stop or self.logprobs is not None:
                bad("use_beam_search", "stop strings and logprobs are not supported with beams")
            if self.beam_width > 16:
                bad("n", f"at most 16 beams, got {self.beam_width}")
        if self.best_of is not None and integer("best_of", self.best_of) < self.n:
            bad("best_of", f"must be >= n ({self.n}), got {self.best_of}")
        number("length_penalty", self.length_penalty)
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                bad(f"stop[{i}]", "must be a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            t = integer(f"stop_token_ids[{i}]", t)
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                bad(f"stop_token_ids[{i}]", f"token id {t} outside the vocabulary [0, {vocab_size})")
