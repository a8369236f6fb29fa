"""The gRPC front (pdserve.v1.PdServe, grpc.health.v1, reflection) over a :class:`Frontend`;
the only server-side module that imports the generated protobuf code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.cluster.api import pdserve_pb2 as pb
from pdserve.cluster.auth import ApiKeys, UnauthenticatedError, load_tls
from pdserve.cluster.config import ServerConfig
from pdserve.cluster.frontend import Frontend, FrontRequest, FrontStream, error_kind, unwrap
from pdserve.cluster.wire import invalid_utf8_field
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["PdServe"].full_name
OPEN_METHODS = (f"/{health.SERVICE_NAME}/",)  # reachable without an API key
HEALTH_POLL_S = 1.0
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
          "abort": pb.FINISH_REASON_ABORT}
TRUNCATION = {pb.TRUNCATION_UNSPECIFIED: "disabled", pb.TRUNCATION_DISABLED: "disabled",
              pb.TRUNCATION_AUTO: "auto"}
# Field paths of the wire format -> the logical names errors use (the same over HTTP).
LOGICAL = (("chat.messages", "messages"), ("token_ids.ids", "prompt_token_ids"), ("text", "prompt"))
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # ping idle clients so dead peers are noticed
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 600_000),
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
]


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes), *KEEPALIVE_OPTIONS]


def logical_field(path: str) -> str:
    for wire, name in LOGICAL:
        if path == wire or path.startswith((wire + "[", wire + ".")):
            return name + path[len(wire):]
    return path


def parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except Exception as e:
        path = invalid_utf8_field(cls.DESCRIPTOR, data)
        if path is not None:
            raise InvalidRequestError(logical_field(path), "is not valid UTF-8") from e
        raise InvalidRequestError("request", f"not a valid {cls.DESCRIPTOR.full_name}") from e


# -- messages <-> front ------------------------------------------------------------------------
def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.is_repeated:
            values = getattr(msg, f.name)
            if values:
                kwargs[f.name] = tuple(values)
        elif msg.HasField(f.name):
            kwargs[f.name] = getattr(msg, f.name)
    return SamplingParams(**kwargs)


def front_request(msg: pb.GenerateRequest) -> FrontRequest:
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("prompt", "give one of text, token_ids or chat")
    if msg.truncation not in TRUNCATION:
        raise InvalidRequestError("truncation", f"unknown value {msg.truncation}")
    sp = msg.sampling_params
    common = dict(request_id=msg.request_id, params=sampling_params(sp), priority=msg.priority,
                  cache_salt=msg.cache_salt if msg.HasField("cache_salt") else None,
                  truncation=TRUNCATION[msg.truncation],
                  session_id=msg.session_id if msg.HasField("session_id") else None)
    if which == "text":
        return FrontRequest(prompt=msg.text, **common)
    if which == "token_ids":
        return FrontRequest(prompt_token_ids=tuple(msg.token_ids.ids), **common)
    messages = tuple({"role": m.role, "content": m.content} for m in msg.chat.messages)
    return FrontRequest(messages=messages, fill_max_tokens=not sp.HasField("max_tokens"), **common)


def response(chunk: TokenChunk, stream: FrontStream, first: bool) -> pb.GenerateResponse:
    r = pb.GenerateResponse(request_id=stream.request_id, index=chunk.index,
                            token_ids=chunk.token_ids, text=chunk.text, finished=chunk.finished)
    for lp in chunk.logprobs:
        r.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                       top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
    if chunk.finish_reason is not None:
        r.finish_reason = FINISH.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    if isinstance(chunk.stop_reason, str):
        r.stop_string = chunk.stop_reason
    elif isinstance(chunk.stop_reason, int):
        r.stop_token_id = chunk.stop_reason
    if chunk.usage is not None:
        r.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.usage.prompt_tokens,
                                  completion_tokens=chunk.usage.completion_tokens,
                                  cached_prompt_tokens=chunk.usage.cached_tokens,
                                  truncated_prompt_tokens=stream.truncated_tokens))
    if first:
        r.prompt_tokens = len(stream.prep.token_ids)
        r.truncated_prompt_tokens = stream.truncated_tokens
    for b in chunk.beams:
        r.beams.add(token_ids=b.token_ids, text=b.text, score=b.score)
    return r


def caller_key(context: grpc.aio.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            return v
    return None


async def fail(context: grpc.aio.ServicerContext, e: BaseException) -> None:
    """End the call with the status of ``e`` (re-raises cancellation)."""
    if isinstance(e, asyncio.CancelledError):
        raise e
    kind = error_kind(e)
    details = str(e) or type(e).__name__
    if kind == "INTERNAL":
        logger.error("internal error in a gRPC call", exc_info=e)
        details = "internal error"
    trailing = (("pdserve-field", e.field),) if isinstance(e, InvalidRequestError) else ()
    await context.abort(getattr(grpc.StatusCode, kind), details, trailing)


class Servicer:
    """The PdServe methods. Requests arrive as bytes so that a bad one is INVALID_ARGUMENT."""

    def __init__(self, front: Frontend) -> None:
        self.front = front

    async def Generate(self, data: bytes, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        stream: FrontStream | None = None
        try:
            caller = self.front.identify(caller_key(context))
            req = front_request(parse(pb.GenerateRequest, data))
            async with asyncio.timeout(context.time_remaining()):
                stream = await self.front.open(req, caller)
                first = True
                async for chunk in stream:
                    yield response(chunk, stream, first)
                    first = False
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            if stream is not None:
                await stream.close(asyncio.CancelledError())
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            error = unwrap(e)
            if stream is not None:
                await stream.close(error)
            await fail(context, error)
        finally:
            if stream is not None:
                await stream.close()

    async def Abort(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            caller = self.front.identify(caller_key(context))
            msg = parse(pb.AbortRequest, data)
            return pb.AbortResponse(aborted=await self.front.abort(caller, msg.request_id))
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await fail(context, unwrap(e))
            raise

    async def Tokenize(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            caller = self.front.identify(caller_key(context))
            msg = parse(pb.TokenizeRequest, data)
            which = msg.WhichOneof("input")
            if which is None:
                raise InvalidRequestError("prompt", "give one of text or chat")
            messages = ([{"role": m.role, "content": m.content} for m in msg.chat.messages]
                        if which == "chat" else None)
            ids = self.front.tokenize(caller, msg.text if which == "text" else None, messages)
            return pb.TokenizeResponse(token_ids=ids, max_model_len=self.front.info.max_model_len)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await fail(context, unwrap(e))
            raise

    async def ModelInfo(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        i = self.front.info
        return pb.ModelInfoResponse(model=i.model, vocab_size=i.vocab_size,
                                    max_model_len=i.max_model_len, block_size=i.block_size)

    def handler(self) -> grpc.GenericRpcHandler:
        def out(name: str) -> Callable[[Any], bytes]:
            return getattr(pb, name).SerializeToString

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, response_serializer=out("GenerateResponse")),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort, response_serializer=out("AbortResponse")),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.Tokenize, response_serializer=out("TokenizeResponse")),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.ModelInfo, response_serializer=out("ModelInfoResponse")),
        })


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health without a valid ``authorization: Bearer <key>``."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not self.keys.enabled or details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        auth = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.keys.identify(auth)
        except UnauthenticatedError as e:
            return _deny(await continuation(details), str(e))
        return await continuation(details)


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    # Same shape as the real method; the request is not even deserialized.
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_stream_rpc_method_handler(streaming)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    _watch: asyncio.Task

    async def stop(self, grace: float = 5.0) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def _watch_health(front: Frontend, servicer: health.aio.HealthServicer) -> None:
    """SERVING only while the router is ready (model loaded, a decode worker alive)."""
    last = None
    while True:
        status = (health_pb2.HealthCheckResponse.SERVING if await front.ready()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != last:
            for name in ("", SERVICE):
                await servicer.set(name, status)
            logger.info("gRPC health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            last = status
        await asyncio.sleep(HEALTH_POLL_S)


async def start_grpc_server(front: Frontend, cfg: ServerConfig, port: int | None = None) -> GrpcServer:
    """Bind ``cfg.host:port`` (``cfg.grpc_port`` by default; 0 picks a free port) and serve."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(front.keys)],
                             options=server_options(cfg))
    server.add_generic_rpc_handlers((Servicer(front).handler(),))
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    address = f"{cfg.host}:{cfg.grpc_port if port is None else port}"
    tls = load_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                            require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, creds)
    await server.start()
    watch = asyncio.create_task(_watch_health(front, health_servicer))
    logger.info("gRPC server on %s:%d (%s)", cfg.host, bound,
                "insecure" if tls is None else "mTLS" if tls.client_ca else "TLS")
    return GrpcServer(server, bound, health_servicer, watch)
