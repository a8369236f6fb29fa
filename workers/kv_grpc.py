"""KV transfer over gRPC for a peer outside the Ray cluster: msgpack frames, bounded size.

One server-streaming method, ``/pdserve.kv.v1.KVTransfer/Pull``: the request is a
msgpack map ``{"lease_id": str, "start_block": int}``; the response is the frame
stream of :func:`pdserve.workers.kv_transfer.encode_frames`. No pickle anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
import msgpack

from pdserve.workers.kv_transfer import (
    KVHandle,
    KVPayload,
    KVTransferError,
    decode_frames,
    encode_frames,
)

logger = logging.getLogger(__name__)

METHOD = "/pdserve.kv.v1.KVTransfer/Pull"
MAX_FRAME_BYTES = 1 << 20
_OPTIONS = [("grpc.max_send_message_length", 4 * MAX_FRAME_BYTES),
            ("grpc.max_receive_message_length", 4 * MAX_FRAME_BYTES)]

ExportFn = Callable[[str, int], Awaitable[KVPayload]]


def _identity(b: bytes) -> bytes:
    return b


async def start_server(export: ExportFn, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, str]:
    """Serve this worker's leased blocks; returns the server and its bound address."""

    async def pull(request: bytes, context: grpc.aio.ServicerContext):
        try:
            req = msgpack.unpackb(request, raw=False, strict_map_key=True)
            lease_id, start = req["lease_id"], req["start_block"]
            if not isinstance(lease_id, str) or not isinstance(start, int) or start < 0:
                raise ValueError("lease_id must be a string and start_block an int >= 0")
        except Exception as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad pull request: {e}")
            return
        try:
            payload = await export(lease_id, start)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            return
        for frame in encode_frames(payload, MAX_FRAME_BYTES):
            yield frame

    handler = grpc.method_handlers_generic_handler("pdserve.kv.v1.KVTransfer", {
        "Pull": grpc.unary_stream_rpc_method_handler(pull, request_deserializer=_identity,
                                                     response_serializer=_identity)})
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, f"{host}:{bound}"


async def pull(handle: KVHandle, start_block: int, timeout: float = 30.0) -> KVPayload:
    if not handle.grpc_address:
        raise KVTransferError(f"worker {handle.worker_id} serves no gRPC address")
    async with grpc.aio.insecure_channel(handle.grpc_address, options=_OPTIONS) as channel:
        call = channel.unary_stream(METHOD, request_serializer=_identity,
                                    response_deserializer=_identity)
        req = msgpack.packb({"lease_id": handle.lease_id, "start_block": start_block})
        frames = []
        try:
            async for frame in call(req, timeout=timeout):
                frames.append(frame)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from e
            raise KVTransferError(f"gRPC pull from {handle.grpc_address}: {e.code().name} {e.details()}") from e
    return decode_frames(frames)
