"""The serving front's request path, shared by gRPC and HTTP: identify the caller, validate,
tokenize and fit the prompt, admit it under the rate limits and the queue bound, stream it
from the router, and abort it in the cluster when the caller goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from pdserve.cluster.auth import Admission, ApiKeys, RateLimiter, UnauthenticatedError
from pdserve.cluster.config import ServerConfig
from pdserve.cluster.metrics import Metrics, RequestTimes
from pdserve.cluster.router import RouterRequest
from pdserve.cluster.truncation import Fitted, fit_chat, fit_tokens, later_cuts, prefer_cached
from pdserve.workers.errors import (
    InvalidRequestError,
    PdserveError,
    QueueFullError,
    RequestAbortedError,
    UnavailableError,
)
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.prompt import PromptProcessor
from pdserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
CONTROL_TIMEOUT_S = 10.0  # model_info, ready, stats, abort

# Error kinds, named after the gRPC status each transport maps them to.
KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidRequestError, "INVALID_ARGUMENT"),
    (QueueFullError, "RESOURCE_EXHAUSTED"),
    (UnavailableError, "UNAVAILABLE"),
    (UnauthenticatedError, "UNAUTHENTICATED"),
    (TimeoutError, "DEADLINE_EXCEEDED"),
    (RequestAbortedError, "CANCELLED"),
    (asyncio.CancelledError, "CANCELLED"),
)


def unwrap(e: BaseException) -> BaseException:
    """The pdserve error inside a Ray error; a dead router reads as ``UnavailableError``."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, BaseException):
        return unwrap(e.cause)
    if isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return UnavailableError(f"the router is unavailable: {type(e).__name__}")
    return e


def error_kind(e: BaseException) -> str:
    for cls, kind in KINDS:
        if isinstance(e, cls):
            return kind
    return "INTERNAL"


@dataclass(frozen=True, slots=True)
class FrontRequest:
    """A generation request as either transport parsed it (not yet validated)."""

    request_id: str = ""  # the caller's id; empty: one is assigned
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    fill_max_tokens: bool = False  # max_tokens unset on a chat: up to the end of the context
    priority: int = 0
    cache_salt: str | None = None
    truncation: str = "disabled"
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    vocab_size: int
    max_model_len: int
    block_size: int


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request whose prompt fits: what goes to the router."""

    request_id: str  # the caller's
    internal_id: str  # unique in the cluster
    token_ids: list[int]
    params: SamplingParams
    fitted: Fitted


class FrontStream:
    """One running request. Iterate for its chunks; always ``close()`` (it aborts if needed)."""

    def __init__(self, front: Frontend, caller: str, prep: Prepared, req: FrontRequest,
                 times: RequestTimes) -> None:
        self.front = front
        self.caller = caller
        self.prep = prep
        self.times = times
        self.finished = False
        self.finish_reason: str | None = None
        self.abort_requested = False
        self._closed = False
        # Sessions are per caller, so one caller cannot reach another's pinned blocks.
        session = f"{caller}/{req.session_id}" if req.session_id is not None else None
        rreq = RouterRequest(prep.internal_id, prompt_token_ids=tuple(prep.token_ids),
                             params=prep.params, priority=req.priority, cache_salt=req.cache_salt,
                             session_id=session)
        self._gen = front.router.generate.remote(rreq)
        self._first: TokenChunk | None = None

    @property
    def request_id(self) -> str:
        return self.prep.request_id

    @property
    def truncated_tokens(self) -> int:
        return self.prep.fitted.dropped_tokens

    async def _next(self) -> TokenChunk:
        try:
            chunk: TokenChunk = await (await self._gen.__anext__())
        except StopAsyncIteration:
            raise
        except Exception as e:
            err = unwrap(e)
            if self.abort_requested and not isinstance(err, PdserveError):
                raise RequestAbortedError(f"request {self.request_id} was aborted") from e
            raise err from e
        self.front.metrics.observe_chunk(self.times, time.monotonic(), len(chunk.token_ids))
        self.front.limiter.charge_tokens(self.caller, len(chunk.token_ids))
        if chunk.usage is not None:
            self.times.cached_tokens = chunk.usage.cached_tokens
        if chunk.finished:
            self.finished = True
            self.finish_reason = chunk.finish_reason
        return chunk

    async def first(self) -> TokenChunk:
        """Wait for the first chunk, so that a refusal surfaces before any reply is sent."""
        if self._first is None:
            self._first = await self._next()
        return self._first

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        yield await self.first()
        while not self.finished:
            try:
                chunk = await self._next()
            except StopAsyncIteration:
                return
            yield chunk

    async def abort(self) -> None:
        """Abort in the cluster (the router releases every block and lease of it)."""
        self.abort_requested = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.front.router.abort.remote(self.prep.internal_id),
                                   CONTROL_TIMEOUT_S)

    async def close(self, error: BaseException | None = None) -> None:
        """Idempotent. Aborts an unfinished request and records its metrics."""
        if self._closed:
            return
        self._closed = True
        self.front._release(self)
        if not self.finished:
            logger.info("request %s: closed before it finished (%s); aborting in the cluster",
                        self.prep.internal_id, type(error).__name__ if error else "caller left")
            await asyncio.shield(self.abort())
            if isinstance(self._gen, ray.ObjectRefGenerator):
                with contextlib.suppress(Exception):
                    ray.cancel(self._gen)
        kind = None if error is None and self.finished else error_kind(error or RequestAbortedError())
        self.front.metrics.observe_end(self.times, self.finish_reason, kind and kind.lower())


class Frontend:
    """Everything the gRPC and HTTP servers share; one per serving process."""

    def __init__(self, router: Any, prompts: PromptProcessor, info: ModelInfo,
                 config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.router = router
        self.prompts = prompts
        self.info = info
        self.config = config
        self.keys = ApiKeys(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_tps)
        self.admission = Admission(config.max_queued_requests)
        self.metrics = metrics or Metrics()
        self._running: dict[tuple[str, str], FrontStream] = {}

    @classmethod
    async def connect(cls, router: Any, config: ServerConfig) -> Frontend:
        """Ask the router for the model and load its tokenizer here (the driver holds the
        model folder: the launcher resolved it), so prompts are tokenized off the router."""
        from pdserve.workers.engine import load_tokenizer

        raw = await asyncio.wait_for(router.model_info.remote(), CONTROL_TIMEOUT_S)
        info = ModelInfo(str(raw["model"]), int(raw["vocab_size"]), int(raw["max_model_len"]),
                         int(raw["block_size"]))
        tok = await asyncio.get_running_loop().run_in_executor(None, load_tokenizer, raw["path"])
        return cls(router, PromptProcessor(tok, info.vocab_size, info.max_model_len), info, config)

    # -- callers --------------------------------------------------------------------------
    def identify(self, authorization: str | None) -> str:
        return self.keys.identify(authorization)

    # -- requests -------------------------------------------------------------------------
    def prepare(self, req: FrontRequest) -> Prepared:
        """Validate and tokenize; fit the prompt into the context (or refuse, naming the field)."""
        rid = req.request_id
        for name, v in (("request_id", rid), ("session_id", req.session_id)):
            if v is not None and (not isinstance(v, str) or len(v) > MAX_REQUEST_ID
                                  or not v.isprintable()):
                raise InvalidRequestError(name, f"must be printable, at most {MAX_REQUEST_ID} chars")
        if req.session_id == "":
            raise InvalidRequestError("session_id", "must be non-empty when given")
        rid = rid or uuid.uuid4().hex
        if isinstance(req.priority, bool) or not isinstance(req.priority, int):
            raise InvalidRequestError("priority", "must be an integer")
        if req.cache_salt is not None and (not isinstance(req.cache_salt, str) or not req.cache_salt):
            raise InvalidRequestError("cache_salt", "must be a non-empty string when given")
        params = req.params
        params.validate(self.info.vocab_size)
        max_len = self.info.max_model_len
        reserve = 1 if req.fill_max_tokens else params.max_tokens
        if req.messages is not None and req.prompt is None and req.prompt_token_ids is None:
            fitted = fit_chat(list(req.messages), max_len, reserve, req.truncation,
                              self.prompts.apply_chat_template)
        else:
            ids = self.prompts.encode(req.prompt, None if req.prompt_token_ids is None
                                      else list(req.prompt_token_ids), req.messages)
            fitted = fit_tokens(ids, max_len, reserve, req.truncation,
                                "prompt" if req.prompt is not None else "prompt_token_ids")
        if req.fill_max_tokens:
            params = replace(params, max_tokens=max_len - len(fitted.token_ids))
            params.validate(self.info.vocab_size)
        return Prepared(rid, f"{rid}-{uuid.uuid4().hex[:8]}", fitted.token_ids, params, fitted)

    async def _prefer_cached_cut(self, req: FrontRequest, prep: Prepared) -> Prepared:
        """Cache-aware truncation: try later turn boundaries and keep the cut whose prefix
        the cluster already holds (see truncation.prefer_cached)."""
        cands = later_cuts(list(req.messages), prep.fitted, self.prompts.apply_chat_template)
        if len(cands) == 1:
            return prep
        cached = await asyncio.wait_for(self.router.cached_prefix_tokens.remote(
            [c.token_ids for c in cands], req.cache_salt), CONTROL_TIMEOUT_S)
        best = prefer_cached(cands, cached, self.info.block_size)
        return replace(prep, token_ids=best.token_ids, fitted=best)

    async def open(self, req: FrontRequest, caller: str) -> FrontStream:
        """Admit and start a request; returns once its first chunk is in (or raises)."""
        times = RequestTimes(arrival=time.monotonic())
        stream = None
        try:
            self.limiter.admit(caller)
            prep = self.prepare(req)
            if prep.fitted.dropped_messages:
                prep = await self._prefer_cached_cut(req, prep)
            key = (caller, prep.request_id)
            if key in self._running:
                raise InvalidRequestError("request_id", f"{prep.request_id!r} is already running")
            times.prompt_tokens = len(prep.token_ids)
            times.truncated_tokens = prep.fitted.dropped_tokens
            self.admission.enter()
            try:
                stream = FrontStream(self, caller, prep, req, times)
            except BaseException:
                self.admission.leave()
                raise
            self._running[key] = stream
            self.limiter.charge_tokens(caller, len(prep.token_ids))
            self.metrics.in_flight.set(self.admission.in_flight)
            if prep.fitted.dropped_tokens:
                logger.info("request %s: truncated %d prompt tokens (%d messages)",
                            prep.internal_id, prep.fitted.dropped_tokens,
                            prep.fitted.dropped_messages)
            await stream.first()
            return stream
        except BaseException as e:
            err = unwrap(e)
            if stream is not None:
                await stream.close(err)
            else:
                self.metrics.failures.labels(error_kind(err).lower()).inc()
            if err is e:
                raise
            raise err from e

    def _release(self, stream: FrontStream) -> None:
        self._running.pop((stream.caller, stream.request_id), None)
        self.admission.leave()
        self.metrics.in_flight.set(self.admission.in_flight)

    async def abort(self, caller: str, request_id: str) -> bool:
        """Abort the caller's running request ``request_id``; False if it has none by that id."""
        stream = self._running.get((caller, request_id))
        if stream is None:
            return False
        await stream.abort()
        return True

    def tokenize(self, caller: str, text: str | None = None,
                 messages: list[dict] | None = None) -> list[int]:
        self.limiter.admit(caller)
        if messages is not None:
            return self.prompts.apply_chat_template(messages)
        return self.prompts.encode(text, None, None)

    def token_text(self, token_id: int) -> str:
        return self.prompts.tokenizer.decode([token_id])

    # -- health and metrics -------------------------------------------------------------
    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.router.ready.remote(), CONTROL_TIMEOUT_S))
        except Exception:
            logger.debug("router.ready failed", exc_info=True)
            return False

    async def refresh_metrics(self) -> None:
        """Take the router's worker/router snapshot into the metrics (at scrape time)."""
        try:
            workers, stats = await asyncio.wait_for(asyncio.gather(
                self.router.worker_stats.remote(), self.router.stats.remote()), CONTROL_TIMEOUT_S)
            self.metrics.cluster.update(workers, stats)
        except Exception:
            logger.warning("metrics: router stats unavailable", exc_info=True)
        with contextlib.suppress(Exception):  # an older router has no timing log
            timings = await asyncio.wait_for(self.router.request_timings.remote(), CONTROL_TIMEOUT_S)
            self.metrics.observe_router_timings(timings)
