"""An asyncio front for the engine: a background thread steps it; callers stream chunks.

The engine itself is single-threaded; all calls into it happen on the stepping
thread, and requests/aborts cross over through a locked inbox.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdserve.workers.engine import LLMEngine
from pdserve.workers.errors import InvalidRequestError, PdserveError
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, Any]] = []
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
        self._thread.start()

    # -- caller side (any event loop) ---------------------------------------------
    async def generate(self, request_id: str, prompt: str | None = None,
                       params: SamplingParams | None = None, **kwargs: Any) -> AsyncIterator[TokenChunk]:
        """Stream the request's chunks; leaving the iteration early aborts it."""

        def start(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt, params, **kwargs)

        async for chunk in self.stream(request_id, start):
            yield chunk

    async def stream(self, request_id: str, start: Any, first_only: bool = False) -> AsyncIterator[TokenChunk]:
        """Run ``start(engine)`` on the engine thread (it adds ``request_id``), then stream
        the request's chunks. Errors from ``start`` (validation) reach the caller.

        ``first_only``: end after the first chunk without aborting (a prefill-only request
        hands its blocks to a lease there); leaving before it still aborts."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        done = loop.create_future()
        self._submit(("add", (request_id, start, stream, done)))
        await done
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished or first_only:
                    finished = True
                    if not item.finished:
                        self._submit(("forget", request_id))
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def call(self, fn: Any) -> Any:
        """Run ``fn(engine)`` on the engine thread and wait for its result (blocking)."""
        ev = threading.Event()
        box: list[Any] = []
        self._submit(("call", (fn, ev, box)))
        ev.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def acall(self, fn: Any) -> Any:
        """Run ``fn(engine)`` on the engine thread; await its result without blocking the loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run(engine: LLMEngine) -> None:
            try:
                res = fn(engine)
            except BaseException as e:  # handed back to the caller
                _post(loop, _resolve, fut, e)
            else:
                _post(loop, _set, fut, res)

        self._submit(("run", run))
        return await fut

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread -------------------------------------------------------------
    def _submit(self, item: tuple[str, Any]) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake.set()

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
            self._wake.clear()
        for kind, payload in items:
            if kind == "add":
                rid, start, stream, done = payload
                try:
                    if rid in self._streams:
                        raise InvalidRequestError("request_id", f"{rid!r} is already running")
                    self._streams[rid] = stream
                    start(self.engine)
                    if not _post(stream.loop, _resolve, done, None):
                        self._drop(rid)
                except (PdserveError, ValueError, TypeError, KeyError) as e:
                    if self._streams.get(rid) is stream:  # not a duplicate's running stream
                        del self._streams[rid]
                    _post(stream.loop, _resolve, done, e)
            elif kind == "abort":
                if self.engine.abort_request(payload):
                    logger.debug("request %s aborted by caller", payload)
            elif kind == "forget":
                self._streams.pop(payload, None)
            elif kind == "run":
                payload(self.engine)
            elif kind == "call":
                fn, ev, box = payload
                try:
                    box.append(fn(self.engine))
                except BaseException as e:  # handed back to the caller
                    box.append(e)
                ev.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self.engine.housekeeping()
                self._wake.wait(timeout=0.25)
                continue
            try:
                chunks = self.engine.step()
            except Exception as e:  # a bug: fail every stream loudly rather than hang
                logger.exception("engine step failed")
                for rid, stream in list(self._streams.items()):
                    _post(stream.loop, stream.queue.put_nowait, e)
                    self.engine.abort_request(rid)
                self._streams.clear()
                continue
            for c in chunks:
                stream = self._streams.get(c.request_id)
                if stream is None:
                    continue
                if c.finished:
                    del self._streams[c.request_id]
                if not _post(stream.loop, stream.queue.put_nowait, c):
                    self._drop(c.request_id)

    def _drop(self, request_id: str) -> None:
        """The caller's event loop is closed: nobody reads this stream any more."""
        logger.debug("request %s: caller's event loop closed; aborting", request_id)
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)


def _post(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> bool:
    """Schedule ``fn(*args)`` on a caller's loop; False if that loop has closed. A departed
    caller must not kill the engine thread that serves everyone else."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _set(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _resolve(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
