"""A small client of the pdserve.v1 gRPC API, built only on the generated stubs and grpcio
(no Ray, no pdserve internals): what ``pdserve chat``/``generate``/``bench`` use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pdserve.cluster.api import pdserve_pb2 as pb
from pdserve.cluster.api import pdserve_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """Where and how to connect: address, API key, and TLS files (all optional)."""

    address: str
    api_key: str | None = None
    tls: bool = False
    ca_cert: str | None = None  # the server's CA; None with tls: the system roots
    client_cert: str | None = None  # mutual TLS
    client_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.keepalive_time_ms", 60_000)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca_cert or self.client_cert):
            return None

        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key),
                                            read(self.client_cert))

    def channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.address, options=self.options())
        return grpc.secure_channel(self.address, creds, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.address, options=self.options())
        return grpc.aio.secure_channel(self.address, creds, options=self.options())


def sampling(**fields: object) -> pb.SamplingParams:
    """SamplingParams with only the given (non-None) fields set."""
    return pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def chat_request(messages: list[dict], params: pb.SamplingParams, request_id: str = "",
                 truncation: str = "disabled", session_id: str | None = None
                 ) -> pb.GenerateRequest:
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return pb.GenerateRequest(request_id=request_id, chat=pb.ChatMessages(messages=msgs),
                              sampling_params=params, truncation=truncation_enum(truncation),
                              session_id=session_id)


def text_request(text: str, params: pb.SamplingParams, request_id: str = "",
                 truncation: str = "disabled") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, text=text, sampling_params=params,
                              truncation=truncation_enum(truncation))


def token_request(ids: list[int], params: pb.SamplingParams, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=ids),
                              sampling_params=params)


def truncation_enum(mode: str) -> int:
    return {"disabled": pb.TRUNCATION_DISABLED, "auto": pb.TRUNCATION_AUTO}[mode]


class Client:
    """Blocking client; ``generate`` yields responses as they stream in."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._channel = target.channel()
        self.stub = pb_grpc.PdServeStub(self._channel)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None
                 ) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout, metadata=self.target.metadata)

    def model_info(self, timeout: float | None = 30) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                   metadata=self.target.metadata)

    def tokenize(self, text: str, timeout: float | None = 30) -> list[int]:
        r = self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout,
                               metadata=self.target.metadata)
        return list(r.token_ids)

    def abort(self, request_id: str, timeout: float | None = 30) -> bool:
        r = self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                            metadata=self.target.metadata)
        return r.aborted

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client` (``generate`` is an async iterator)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._channel = target.aio_channel()
        self.stub = pb_grpc.PdServeStub(self._channel)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> Any:
        return self.stub.Generate(request, timeout=timeout, metadata=self.target.metadata)

    async def model_info(self, timeout: float | None = 30) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                         metadata=self.target.metadata)

    async def close(self) -> None:
        await self._channel.close()
