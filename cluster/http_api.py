"""The OpenAI-compatible HTTP front (/v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics) over a :class:`Frontend`, with the same keys and limits as gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from pdserve.cluster.auth import load_tls
from pdserve.cluster.config import ServerConfig
from pdserve.cluster.frontend import Frontend, FrontStream, error_kind, unwrap
from pdserve.cluster.metrics import CONTENT_TYPE
from pdserve.cluster.openai_protocol import (
    Options,
    http_field,
    parse_body,
    parse_chat,
    parse_completion,
)
from pdserve.cluster.openai_responses import (
    completion_response,
    error_body,
    sse_data,
    stream_choice,
    stream_event,
    usage_json,
)
from pdserve.workers.errors import InvalidRequestError

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})  # reachable without an API key
# error kind -> (HTTP status, OpenAI error type, code)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_value"),
    "UNAUTHENTICATED": (401, "authentication_error", "invalid_api_key"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UNAVAILABLE": (503, "service_unavailable_error", "unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout_error", "timeout"),
    "CANCELLED": (499, "cancelled_error", "cancelled"),
    "INTERNAL": (500, "server_error", "internal_error"),
}
CLIENT_GONE = (ConnectionResetError, ConnectionError)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_json(e: BaseException) -> tuple[dict, int]:
    kind = error_kind(e)
    status, type_, code = STATUS[kind]
    param = None
    message = str(e) or type(e).__name__
    if isinstance(e, InvalidRequestError):
        param = None if e.field == "body" else http_field(e.field)
        message = f"{param}: {e.message}" if param else e.message
    if kind == "INTERNAL":
        logger.error("internal error in an HTTP request", exc_info=e)
        message = "internal error"
    return error_body(message, type_, param, code), status


def error_response(e: BaseException) -> web.Response:
    body, status = error_json(e)
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 (body over the limit)
        if e.status < 400:
            raise
        type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
        code = "request_too_large" if e.status == 413 else None
        return web.json_response(error_body(e.reason, type_, None, code), status=e.status)
    except Exception as e:
        return error_response(unwrap(e))


class HttpApi:
    def __init__(self, front: Frontend) -> None:
        self.front = front

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            self.caller(request)
        return await handler(request)

    def caller(self, request: web.Request) -> str:
        return self.front.identify(request.headers.get("Authorization"))

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes,
                              middlewares=[errors_middleware, self.auth_middleware])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if await self.front.ready():
            return web.json_response({"status": "ok"})
        return web.json_response(error_body("no worker is ready", "service_unavailable_error",
                                            None, "unavailable"), status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        await self.front.refresh_metrics()
        return web.Response(body=self.front.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        i = self.front.info
        return web.json_response({"object": "list", "data": [
            {"id": i.model, "object": "model", "created": 0, "owned_by": "pdserve",
             "max_model_len": i.max_model_len, "vocab_size": i.vocab_size}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = parse_body(await request.read())
        parse = parse_chat if kind == "chat" else parse_completion
        req, opts = parse(body, self.front.info.model)
        if opts.stream and req.params.use_beam_search:
            raise InvalidRequestError("use_beam_search", "beam search cannot be streamed")
        stream = await self.front.open(req, self.caller(request))
        headers = {"X-Request-Id": stream.request_id,
                   "X-Pdserve-Truncated-Tokens": str(stream.truncated_tokens)}
        created = int(time.time())
        try:
            if not opts.stream:
                chunks = [c async for c in stream]
                return web.json_response(completion_response(
                    kind, stream.request_id, created, self.front.info.model, chunks,
                    len(stream.prep.token_ids), stream.truncated_tokens, self.front.token_text),
                    headers=headers)
            resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            try:
                await self._sse(resp, stream, kind, opts, created)
            except CLIENT_GONE:
                await stream.close(asyncio.CancelledError())
                return resp
            except Exception as e:  # after the headers: report in the stream, then end it
                err = unwrap(e)
                await stream.close(err)
                body, _ = error_json(err)
                await resp.write(sse_data(body))
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            await stream.close()

    async def _sse(self, resp: web.StreamResponse, stream: FrontStream, kind: str, opts: Options,
                   created: int) -> None:
        model, rid = self.front.info.model, stream.request_id
        offsets: dict[int, int] = {}
        usage, generated = None, 0
        async for chunk in stream:
            first = chunk.index not in offsets
            offset = offsets.setdefault(chunk.index, 0)
            choice = stream_choice(chunk, opts.chat, first, self.front.token_text, offset)
            offsets[chunk.index] = offset + len(chunk.text)
            generated += len(chunk.token_ids)
            usage = chunk.usage or usage
            await resp.write(stream_event(kind, rid, created, model, [choice],
                                          with_usage=opts.include_usage))
        if opts.include_usage:
            u = usage_json(usage, stream.truncated_tokens, (len(stream.prep.token_ids), generated))
            await resp.write(stream_event(kind, rid, created, model, [], u, with_usage=True))
        await resp.write(b"data: [DONE]\n\n")


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


def ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cfg.tls_client_ca)
    return ctx


async def start_http_server(front: Frontend, cfg: ServerConfig, port: int | None = None,
                            shutdown_timeout: float = 5.0) -> HttpServer:
    """Bind ``cfg.host:port`` (``cfg.http_port`` by default; 0 picks a free port) and serve.
    On stop, running requests get ``shutdown_timeout`` seconds before they are cancelled."""
    load_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)  # refuses half a TLS configuration
    app = HttpApi(front).app(cfg.max_message_bytes)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the cluster at once rather than at the next write.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.http_port if port is None else port,
                       ssl_context=ssl_context(cfg), reuse_port=False)
    await site.start()
    bound = runner.addresses[0][1]
    logger.info("HTTP server on %s:%d", cfg.host, bound)
    return HttpServer(runner, bound)
