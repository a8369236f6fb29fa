"""Turning a prompt (text, token ids or chat messages) into validated token ids."""

from __future__ import annotations

from typing import Any

from pdserve.workers.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool")


class PromptProcessor:
    """Shared by the engine and the router so both validate a prompt the same way."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                      messages: list[dict] | None = None) -> list[int]:
        """Token ids of a text prompt, token ids or chat messages; validates them."""
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, prompt_token_ids, messages")
        if messages is not None:
            ids = self.apply_chat_template(messages)
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError("prompt", f"must be a string, got {type(prompt).__name__}")
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            if not isinstance(prompt_token_ids, (list, tuple)):
                raise InvalidRequestError(
                    "prompt_token_ids", f"must be a list of ints, got {type(prompt_token_ids).__name__}")
            ids = list(prompt_token_ids)
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise InvalidRequestError(
                        f"prompt_token_ids[{i}]", f"{t!r} is outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise InvalidRequestError("prompt" if prompt_token_ids is None else "prompt_token_ids",
                                      "must not be empty")
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]", "needs string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise InvalidRequestError(f"messages[{i}].role", f"unknown role {m['role']!r}")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        max_len = self.max_model_len
        if num_prompt_tokens + max_tokens > max_len:
            field = "prompt" if num_prompt_tokens >= max_len else "sampling_params.max_tokens"
            raise InvalidRequestError(
                field, f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                       f"the model's context of {max_len} tokens")
