"""Offline API: ``LLM(...).generate(prompts, params)`` and ``LLM.chat(messages, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any

from pdserve.workers.config import EngineConfig
from pdserve.workers.engine import LLMEngine
from pdserve.workers.outputs import RequestOutput, TokenChunk
from pdserve.workers.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs batches of prompts to completion with continuous batching."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        config = EngineConfig(model=model, **engine_kwargs)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt (text, or a list of token ids), in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                         and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                rid = f"offline-{next(self._ids)}"
                if isinstance(p, str):
                    self.engine.add_request(rid, p, sp)
                else:
                    self.engine.add_request(rid, prompt_token_ids=list(p), params=sp)
                ids.append(rid)
        except BaseException:
            self._abort(ids)  # a bad prompt fails the whole call: queue none of it
            raise
        return self._run(ids)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids: list[str] = []
        try:
            for conv in convs:
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, params=params, messages=conv)  # type: ignore[arg-type]
                ids.append(rid)
        except BaseException:
            self._abort(ids)
            raise
        return self._run(ids)

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:  # their final "abort" chunks are dropped by the next call's _run
            self.engine.abort_request(rid)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        prompts = {rid: tuple(self.engine.requests[rid].prompt_token_ids) for rid in ids}
        chunks: dict[str, list[TokenChunk]] = {rid: [] for rid in ids}
        pending = set(ids)
        while pending:
            for c in self.engine.step():
                if c.request_id in chunks:
                    chunks[c.request_id].append(c)
                    if c.finished:
                        pending.discard(c.request_id)
        return [collect(rid, prompts[rid], chunks[rid]) for rid in ids]


def collect(request_id: str, prompt_ids: tuple[int, ...], chunks: list[TokenChunk]) -> RequestOutput:
    """Fold a request's chunks into one output; with n > 1, ``choices`` holds each sample."""
    indices = sorted({c.index for c in chunks})
    if indices != [0]:
        choices = tuple(_fold(request_id, prompt_ids, [c for c in chunks if c.index == i],
                              chunks[-1]) for i in indices)
        return replace(choices[0], usage=chunks[-1].usage, choices=choices)
    return _fold(request_id, prompt_ids, chunks, chunks[-1])


def _fold(request_id: str, prompt_ids: tuple[int, ...], chunks: list[TokenChunk],
          last_of_request: TokenChunk) -> RequestOutput:
    last = chunks[-1]
    assert last_of_request.usage is not None
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        text="".join(c.text for c in chunks),
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        usage=last_of_request.usage,
        beams=last.beams,
    )


__all__ = ["LLM", "SamplingParams", "RequestOutput", "collect"]
