"""One serving process: a :class:`Frontend` with its gRPC and HTTP servers on one event loop,
run in the foreground (``pdserve serve``) or on a background thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.config import ServerConfig
from pdserve.cluster.frontend import Frontend
from pdserve.cluster.http_api import HttpServer, start_http_server
from pdserve.cluster.server import GrpcServer, start_grpc_server

logger = logging.getLogger(__name__)


@dataclass
class Serving:
    front: Frontend
    grpc: GrpcServer
    http: HttpServer

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def http_port(self) -> int:
        return self.http.port

    @classmethod
    async def start(cls, router: Any, cfg: ServerConfig, grpc_port: int | None = None,
                    http_port: int | None = None) -> Serving:
        """``cfg`` holds the final API keys (the CLI merged the env var's in)."""
        front = await Frontend.connect(router, cfg)
        grpc_server = await start_grpc_server(front, cfg, grpc_port)
        try:
            http_server = await start_http_server(front, cfg, http_port)
        except BaseException:
            await grpc_server.stop(0)
            raise
        return cls(front, grpc_server, http_server)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, then abort them."""
        await asyncio.gather(self.grpc.stop(grace), self.http.stop())


class BackgroundServing:
    """:class:`Serving` on its own thread and event loop; ``stop()`` joins it."""

    def __init__(self, router: Any, cfg: ServerConfig, grpc_port: int | None = 0,
                 http_port: int | None = 0, timeout: float = 60.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pdserve-serving",
                                        daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            Serving.start(router, cfg, grpc_port, http_port), self.loop)
        try:
            self.serving: Serving = fut.result(timeout)
        except BaseException:
            self._halt()
            raise

    @property
    def grpc_port(self) -> int:
        return self.serving.grpc_port

    @property
    def http_port(self) -> int:
        return self.serving.http_port

    @property
    def front(self) -> Frontend:
        return self.serving.front

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run ``coro`` on the serving loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.serving.stop(grace), timeout=grace + 30)
        finally:
            self._halt()

    def _halt(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()
