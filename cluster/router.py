"""The router: validates and tokenizes a request, asks the prefix index who holds its
blocks, places it (prefill worker + decode worker, or directly on a decode worker),
drives the handoff and streams tokens back. Cancels and worker deaths are handled
here so that no request hangs and no lease is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from pdserve.cluster.autoscale import RoleScaler
from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.placement import CostParams, Placement, place
from pdserve.cluster.spawn import form_channel, spawn_worker
from pdserve.workers.block_manager import hash_prompt_blocks
from pdserve.workers.detokenizer import resume_point
from pdserve.workers.disagg_engine import SeqState
from pdserve.workers.errors import InvalidRequestError, OutOfBlocksError, UnavailableError
from pdserve.workers.outputs import TokenChunk
from pdserve.workers.prompt import PromptProcessor
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.worker import GenerateRequest, WorkerLoad

logger = logging.getLogger(__name__)

DEAD = (ActorDiedError, ActorUnavailableError, RayActorError)
LOAD_POLL_S = 0.1
# Workers gone (dead or retired) that the router still lists, for stats; older ones are dropped.
KEEP_GONE = 64
# A replacement that fails to start is tried again after this, doubling up to the cap.
REPLACE_BACKOFF_S, REPLACE_BACKOFF_MAX_S = 1.0, 60.0
# The link estimate learns only from handoffs at least this large: one that moved little is
# mostly fixed costs (the hops, the reservation, the first decode step), which would read as
# a slow link.
LINK_SAMPLE_MIN_BYTES = 1 << 20
MAX_ATTEMPTS = 3
FORM_TRIES = 3  # KV channel formations for one new worker (members may die meanwhile)


@dataclass(frozen=True, slots=True)
class RouterRequest:
    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    cache_salt: str | None = None
    session_id: str | None = None  # turns of one chat: its blocks stay on the worker between turns


@dataclass(slots=True)
class _WorkerRef:
    worker_id: str
    role: str
    actor: Any
    load: WorkerLoad | None = None
    alive: bool = True
    draining: bool = False  # retired by autoscaling: finishes what it holds, takes nothing new
    polled_at: float = 0.0  # when ``load`` came (the router's clock)

    @property
    def in_service(self) -> bool:
        """Alive and not draining: placement may send it requests and import from it."""
        return self.alive and not self.draining


@dataclass(slots=True)
class _Active:
    """Who holds a running request right now (for cancel propagation)."""

    holder: _WorkerRef | None = None
    lease: tuple[_WorkerRef, str] | None = None
    target: _WorkerRef | None = None  # the decode worker placement chose (a drain waits for it)
    cancelled: bool = False


class Router:
    def __init__(self, config: ClusterConfig, model_path: str, workers: dict[str, tuple[str, Any]],
                 index: Any, tokenizer: Any = None, vocab_size: int | None = None,
                 max_model_len: int | None = None) -> None:
        self.config = config
        self.model_path = model_path
        self.workers = {wid: _WorkerRef(wid, role, actor) for wid, (role, actor) in workers.items()}
        self.index = index
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len
        self.prompts: PromptProcessor | None = None
        self.active: dict[str, _Active] = {}
        # Configured, or a prior that measured handoffs replace.
        self.link_bytes_per_s = config.link_bytes_per_s or 1e9
        self.counters: dict[str, float] = {"requests": 0, "pd": 0, "direct": 0, "retries": 0,
                                           "prefix_imports": 0, "handoff_bytes": 0,
                                           "handoffs": 0, "handoff_seconds": 0.0,
                                           "recomputed": 0, "replacements": 0,
                                           "channels_formed": 0, "scale_ups": 0,
                                           "scale_downs": 0, "drains": 0}
        self._generation = 0  # replacement ids: "<the first worker's id>~<n>"
        self._suffix = uuid.uuid4().hex[:6]  # added workers: "<role>-up<n>-<suffix>"
        self._closing = False
        self._lifecycle: set[asyncio.Task] = set()  # starting or retiring workers
        self._starting = {"prefill": 0, "decode": 0}
        self._adding: dict[str, set[asyncio.Task]] = {"prefill": set(), "decode": set()}
        self._scalers = {role: RoleScaler(getattr(config, role)) for role in ("prefill", "decode")}
        self._forming = asyncio.Lock()  # replacements join the KV channel one at a time
        self._poller: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # lease clean-ups outliving a request
        self.timings: deque[dict] = deque(maxlen=4096)  # per P/D request, for benchmarks

    async def start(self) -> None:
        if self.prompts is None:
            loop = asyncio.get_running_loop()
            self.prompts = await loop.run_in_executor(None, self._load_prompts)
        await self.refresh_loads()
        self._poller = asyncio.create_task(self._poll_loads())

    def _load_prompts(self) -> PromptProcessor:
        from pdserve.workers.engine import MAX_DEFAULT_CONTEXT, load_tokenizer
        from pdserve.workers.models.config import ModelConfig

        cfg = ModelConfig.from_folder(self.model_path)
        tok = self._tokenizer or load_tokenizer(self.model_path)
        max_len = self._max_model_len or self.config.max_model_len or min(
            cfg.max_position_embeddings, MAX_DEFAULT_CONTEXT)
        return PromptProcessor(tok, self._vocab_size or cfg.vocab_size, max_len)

    # -- loads ---------------------------------------------------------------------------
    async def refresh_loads(self) -> None:
        async def one(w: _WorkerRef) -> None:
            try:
                w.load = await asyncio.wait_for(w.actor.load.remote(), timeout=5)
                w.polled_at = time.monotonic()
            except DEAD:
                await self._mark_dead(w)
            except (TimeoutError, Exception):
                logger.debug("load poll of %s failed", w.worker_id, exc_info=True)

        await asyncio.gather(*(one(w) for w in list(self.workers.values()) if w.alive))

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.sleep(LOAD_POLL_S)
            await self.refresh_loads()
            try:
                self.autoscale(time.monotonic())
            except Exception:  # the poller must live on
                logger.exception("autoscaling failed")

    async def _mark_dead(self, w: _WorkerRef) -> None:
        if not w.alive:
            return
        w.alive = False
        logger.warning("worker %s is dead; dropping it from the index", w.worker_id)
        try:
            await self.index.remove_worker.remote(w.worker_id)
        except Exception:
            logger.warning("index remove_worker(%s) failed", w.worker_id, exc_info=True)
        self._tell_forget(w.worker_id)
        if self.config.replace_dead_workers and not self._closing and not w.draining:
            self._track(self._replace(w))

    def _tell_forget(self, worker_id: str) -> None:
        """With the collective transport, the live workers drop their link to ``worker_id``
        (gone)."""
        if self.config.resolved_transport() == "collective":
            for other in self.workers.values():  # fire and forget: a peer may be gone too
                if other.alive:
                    with contextlib.suppress(Exception):
                        other.actor.forget_peer.remote(worker_id)

    def _track(self, coro: Any) -> asyncio.Task:
        """Run a task that starts or retires a worker (shutdown cancels those left)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._lifecycle.add(task)
        task.add_done_callback(self._lifecycle.discard)
        return task

    async def _replace(self, dead: _WorkerRef) -> None:
        """Start a worker of ``dead``'s role under a new id (see _start_worker)."""
        with contextlib.suppress(Exception):  # an unreachable one must not hold its GPU on
            ray.kill(dead.actor)
        wid = await self._start_worker(dead.role, _replacement_name(dead.worker_id))
        if wid is not None:
            self.counters["replacements"] += 1
            logger.info("worker %s replaces the dead %s", wid, dead.worker_id)

    async def _start_worker(self, role: str, name: Any) -> str | None:
        """Start a worker of ``role`` (id ``name(n)``), as often as it takes: Ray holds the
        actor pending while the cluster has no room for it (an autoscaler may add a node),
        and one that fails to start is tried again after a backoff. With the collective
        transport, it forms a KV channel of its own with the live workers of the other role
        before it takes requests (a process group cannot take a new rank): if that fails,
        its handoffs use the object store. Returns its id; None if the router shut down."""
        delay = REPLACE_BACKOFF_S
        self._starting[role] += 1
        try:
            while not self._closing:
                self._generation += 1
                wid = name(self._generation)
                actor = None
                try:
                    actor = spawn_worker(self.config, role, wid, self.index, self.model_path)
                    await actor.start.remote()
                    load = await actor.load.remote()
                    # One formation at a time, each with the workers in service when it starts:
                    # two replacements formed at once would each link the pair between them,
                    # each side through another channel.
                    async with self._forming:
                        if self._closing:  # shut down while it started
                            ray.kill(actor)
                            return None
                        if self.config.resolved_transport() == "collective":
                            await self._join_channel(wid, role, actor)
                        self.workers[wid] = _WorkerRef(wid, role, actor, load)
                        self._forget_gone()
                except asyncio.CancelledError:  # shut down before it was registered
                    if actor is not None:
                        ray.kill(actor)
                    raise
                except Exception as e:
                    logger.warning("worker %s (%s) failed to start (%r); next try in %.0f s",
                                   wid, role, e, delay)
                    if actor is not None:
                        ray.kill(actor)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, REPLACE_BACKOFF_MAX_S)
                    continue
                return wid
            return None
        finally:
            self._starting[role] -= 1

    def _forget_gone(self) -> None:
        """Keep the newest KEEP_GONE workers that are gone (a long life of replacements and
        scale-downs must not grow the list, nor the shutdown's loop over it, for ever)."""
        gone = [wid for wid, w in self.workers.items() if not w.alive]
        for wid in gone[:max(0, len(gone) - KEEP_GONE)]:
            del self.workers[wid]

    # -- autoscaling (cluster/autoscale.py) ---------------------------------------------------
    def autoscale(self, now: float) -> None:
        """One look at each autoscaling role's load: start or retire a worker if its scaler
        says so."""
        if self._closing:
            return
        for role, scaler in self._scalers.items():
            if not scaler.enabled:
                continue
            serving = self._alive(role)
            ongoing = sum(_ongoing(w) for w in serving)
            move = scaler.decide(ongoing, len(serving) + self._starting[role], now)
            if move > 0:
                task = self._track(self._scale_up(role))
                self._adding[role].add(task)
                task.add_done_callback(self._adding[role].discard)
            elif move < 0 and self._adding[role]:  # one still starting (or pending in Ray)
                self._adding[role].pop().cancel()
            elif move < 0 and len(serving) > scaler.min_replicas:
                # the least busy; among equals the newest (the first workers stay)
                victim = min(reversed(serving), key=_ongoing)
                victim.draining = True  # at once: placement and replacement see it now
                self._track(self._retire(victim))

    async def _scale_up(self, role: str) -> None:
        wid = await self._start_worker(role, lambda n: f"{role}-up{n}-{self._suffix}")
        if wid is not None:
            self.counters["scale_ups"] += 1
            logger.info("autoscaling: worker %s (%s) added", wid, role)

    async def drain_worker(self, worker_id: str, replace: bool = False,
                           timeout_s: float | None = None) -> str | None:
        """Take one worker out of service, as autoscaling retires one (for maintenance, or
        a node to empty): it takes no new request, and stops once it holds none or at
        ``timeout_s`` (None: ``drain_timeout_s``), when what it still holds resumes
        elsewhere. With ``replace``, a new worker of its role is started first and is in
        service before the drain begins. Returns when the worker has stopped: the
        replacement's id, or None; UnavailableError if the router shut down before the
        replacement started (nothing drained). InvalidRequestError (field ``worker_id``) for a worker
        that is unknown, gone or already draining, or the last decode worker in service
        when nothing replaces it."""
        w = self.workers.get(worker_id)
        if w is None or not w.in_service:
            raise InvalidRequestError("worker_id", f"no worker {worker_id!r} in service")
        if w.role == "decode" and not replace and len(self._alive("decode")) <= 1:
            raise InvalidRequestError("worker_id", f"{worker_id!r} is the last decode worker "
                                                   "in service; drain it with replace")
        if timeout_s is not None and not timeout_s >= 0:
            raise InvalidRequestError("timeout_s", f"must be >= 0, got {timeout_s}")
        new = None
        if replace:
            new = await self._start_worker(w.role, _replacement_name(worker_id))
            if new is None:
                raise UnavailableError(f"the router shut down before {worker_id}'s "
                                       "replacement started; nothing was drained")
            self.counters["replacements"] += 1
        if w.in_service:  # (autoscaling may have retired it while the replacement started)
            await self._retire(w, "drain", timeout_s)
        return new

    async def _retire(self, w: _WorkerRef, why: str = "autoscaling",
                      timeout_s: float | None = None) -> None:
        """Take ``w`` out of service: no new request goes to it (and its blocks leave the
        index, so none is imported from it); once it holds nothing, or at the drain
        timeout, it is stopped. A request still on it then resumes elsewhere, as after a
        death."""
        w.draining = True
        if not w.alive:  # it died first (and was not replaced: it was draining)
            return
        self.counters["scale_downs" if why == "autoscaling" else "drains"] += 1
        logger.info("%s: retiring worker %s (%s)", why, w.worker_id, w.role)
        with contextlib.suppress(Exception):
            await self.index.remove_worker.remote(w.worker_id)
        began = time.monotonic()
        deadline = began + (self.config.drain_timeout_s if timeout_s is None else timeout_s)
        while (w.alive and time.monotonic() < deadline and not self._closing
               and not self._idle(w, began)):
            await asyncio.sleep(LOAD_POLL_S)
        if not w.alive:  # it died while it drained: _mark_dead did the rest
            return
        w.alive = False  # retired, not dead: nothing replaces it
        self._tell_forget(w.worker_id)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.actor.shutdown.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(w.actor)
        # again, now that its event pushes have stopped: one sent during the drain looks
        # like a gap to the index, whose resync would have listed the worker again
        with contextlib.suppress(Exception):
            await self.index.remove_worker.remote(w.worker_id)
        logger.info("%s: worker %s stopped", why, w.worker_id)

    def _idle(self, w: _WorkerRef, since: float) -> bool:
        """Nothing of ``w``'s is left: no request the router runs is on it, is bound for it
        or waits on a lease of it, and its load polled after ``since`` shows none."""
        for act in self.active.values():
            if (act.holder is w or act.target is w
                    or (act.lease is not None and act.lease[0] is w)):
                return False
        load = w.load
        return (load is not None and w.polled_at > since and load.num_running == 0
                and load.num_waiting == 0 and load.num_leases == 0)

    async def _join_channel(self, wid: str, role: str, actor: Any) -> None:
        """Form a KV channel between a replacement and the live workers of the other role
        (rank 0, the replacement, serves the rendezvous). A formation that fails because a
        member died meanwhile (two deaths at once: its replacement started before the
        other was found dead) is tried again without it, so the replacement does not keep
        the object store for its whole life."""
        other = "decode" if role == "prefill" else "prefill"
        for _ in range(FORM_TRIES):
            peers = self._alive(other)
            if not peers:
                return
            members = {wid: (role, actor), **{w.worker_id: (w.role, w.actor) for w in peers}}
            formation = asyncio.get_running_loop().run_in_executor(
                None, form_channel, self.config, members)
            try:
                joined = await asyncio.shield(formation)
            except asyncio.CancelledError:
                # The start was cancelled (a lull, a shutdown) and the caller kills the
                # worker; the formation goes on in its thread, and the peers may link to it
                # there. Once it ends, they drop that link: none keeps a link to a dead rank.
                formation.add_done_callback(lambda _: self._tell_forget(wid))
                raise
            self.counters["channels_formed"] += joined
            if not joined:  # it fails fast on a dead member, often before the next poll
                await self.refresh_loads()
            for w in peers:  # died while it formed: the replacement was not told (not registered)
                if not w.alive:
                    actor.forget_peer.remote(w.worker_id)
            if joined or all(w.alive for w in peers):
                return
            logger.warning("the KV channel for %s failed with a member that died meanwhile; "
                           "forming it again without it", wid)

    def _alive(self, role: str) -> list[_WorkerRef]:
        """The role's workers in service (alive, polled once, not draining)."""
        return [w for w in self.workers.values() if w.in_service and w.role == role and w.load]

    # -- requests -------------------------------------------------------------------------
    def validate(self, req: RouterRequest) -> list[int]:
        assert self.prompts is not None, "router not started"
        req.params.validate(self.prompts.vocab_size)
        ids = self.prompts.encode(req.prompt,
                                  list(req.prompt_token_ids) if req.prompt_token_ids is not None else None,
                                  list(req.messages) if req.messages is not None else None)
        self.prompts.check_length(len(ids), req.params.max_tokens)
        return ids

    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        assert self.prompts is not None
        return self.prompts.encode(text, None, messages)

    async def generate(self, req: RouterRequest) -> AsyncIterator[TokenChunk]:
        if not isinstance(req.request_id, str) or not req.request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if req.request_id in self.active:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        ids = self.validate(req)
        self.counters["requests"] += 1
        act = _Active()
        self.active[req.request_id] = act
        greq = GenerateRequest(req.request_id, tuple(ids), req.params, req.priority, req.cache_salt,
                               req.session_id)
        finished = False
        try:
            async for chunk in self._run(greq, act):
                if act.cancelled and not chunk.finished:
                    # The abort reached the worker before the request did (actor calls may
                    # run out of order): abort again now that it is there, and end here.
                    await self._cancel(act, req.request_id)
                    finished = True
                    yield TokenChunk(req.request_id, (), "", finished=True, finish_reason="abort")
                    return
                yield chunk
                if chunk.finished:
                    finished = True
        finally:
            self.active.pop(req.request_id, None)
            if not finished:
                await self._cancel(act, req.request_id)

    async def abort(self, request_id: str) -> bool:
        act = self.active.get(request_id)
        if act is None:
            return False
        act.cancelled = True
        await self._cancel(act, request_id)
        return True

    async def _cancel(self, act: _Active, request_id: str) -> None:
        act.cancelled = True
        calls = []
        if act.holder is not None and act.holder.alive:
            calls.append(act.holder.actor.abort.remote(request_id))
        if act.lease is not None and act.lease[0].alive:
            calls.append(act.lease[0].actor.release.remote(act.lease[1]))
        for c in calls:
            try:
                await c
            except Exception:
                logger.debug("request %s: cancel call failed", request_id, exc_info=True)

    async def _place(self, req: GenerateRequest) -> tuple[Placement, list[bytes]]:
        hashes = hash_prompt_blocks(list(req.prompt_token_ids), self.config.block_size, req.cache_salt)
        hits: dict[str, int] = {}
        if hashes:
            hits = await self.index.lookup.remote(hashes)
        # The index may still list a worker that just died: never import from it.
        hits = {wid: n for wid, n in hits.items()
                if (w := self.workers.get(wid)) is not None and w.in_service}
        prefill = [w.load for w in self._alive("prefill")]
        decode = [w.load for w in self._alive("decode")]
        if not decode:  # degrade: a prefill worker can run whole requests too
            decode, prefill = prefill, []
        if not decode:
            raise UnavailableError("no worker is available")
        params = CostParams(self.config.block_size, self.config.decode.max_num_seqs,
                            self.link_bytes_per_s, self.config.direct_max_tokens)
        return place(len(req.prompt_token_ids), hits, prefill, decode, params,
                     min(req.params.max_tokens, 64)), hashes

    async def _run(self, req: GenerateRequest, act: _Active) -> AsyncIterator[TokenChunk]:
        """Place and run; on a dead worker retry elsewhere (resuming from what was streamed)."""
        streamed: list[TokenChunk] = []
        for attempt in range(MAX_ATTEMPTS):
            if act.cancelled:
                return
            try:
                async for chunk in self._attempt(req, act, streamed):
                    streamed.append(chunk)
                    yield chunk
                return
            except DEAD as e:
                self.counters["retries"] += 1
                logger.warning("request %s: worker died (%s); retry %d", req.request_id,
                               type(e).__name__, attempt + 1)
                for w in list(self.workers.values()):
                    if w.alive and w.actor is not None and act.holder is w:
                        await self._mark_dead(w)
                if act.lease is not None and act.lease[0].alive:  # the decode side died
                    await self._release(act.lease[0], act.lease[1], req.request_id)
                await self.refresh_loads()
                act.holder = act.target = None
                act.lease = None
        raise UnavailableError(f"request {req.request_id} failed after {MAX_ATTEMPTS} attempts")

    async def _attempt(self, req: GenerateRequest, act: _Active,
                       streamed: list[TokenChunk]) -> AsyncIterator[TokenChunk]:
        if streamed:  # resume after a decode worker died: recompute from what was streamed
            state = self._resume_state(req, streamed)
            d = act.target = self.workers[(await self._place(req))[0].decode]
            act.holder = d
            self.counters["recomputed"] += 1
            async for chunk in self._stream(d.actor.decode.remote(state, None, None)):
                yield chunk
            return
        plan, _ = await self._place(req)
        d = act.target = self.workers[plan.decode]
        if plan.kind == "direct":
            self.counters["direct"] += 1
            act.holder = d
            async for chunk in self._stream(d.actor.generate.remote(req)):
                yield chunk
            return
        self.counters["pd"] += 1
        p = self.workers[plan.prefill]  # type: ignore[index]
        src = self.workers[plan.prefix_source].actor if plan.prefix_source else None
        if src is not None:
            self.counters["prefix_imports"] += 1
        act.holder = p
        t_start = time.monotonic()
        # The prefill worker pushes the blocks to the chosen decode worker as soon as the
        # prompt is done (collective transport), so no call sits between the two.
        ref = p.actor.prefill.remote(req, src, plan.prefix_blocks, plan.have_blocks,
                                     d.worker_id if self.config.kv_push else None)
        try:
            res = await ref
        except asyncio.CancelledError:
            # The abort sent on cancel can overtake the prefill on its worker; whatever
            # lease the prefill ends with is released when it arrives.
            self._spawn(self._release_result(p, ref, req.request_id, d))
            raise
        t_prefilled = time.monotonic()
        if res.chunk.token_ids or res.chunk.finished:  # KV-only prefills sample nothing
            yield res.chunk
        if res.chunk.finished or act.cancelled:
            if res.handle is not None:
                self._drop_push(d, res)
                await p.actor.release.remote(res.handle.lease_id)
            return
        act.lease = (p, res.handle.lease_id)
        t0 = time.monotonic()
        for d_try in self._decode_order(d):
            act.holder = d_try
            try:
                first = True
                pushed = res.pushed if d_try is d else None
                gen = d_try.actor.decode.remote(res.state, res.handle, p.actor, pushed,
                                                res.pushed is None)
                async for chunk in self._stream(gen):
                    if first:
                        first = False
                        act.lease = None  # the decode worker has pulled and released it
                        now = time.monotonic()
                        nbytes = (chunk.handoff_bytes if chunk.handoff_bytes is not None
                                  else res.handle.num_blocks * res.handle.bytes_per_block)
                        self._observe_handoff(nbytes, now - t0)
                        self.timings.append({
                            "request_id": req.request_id, "queue_s": res.queue_seconds,
                            "prefill_s": res.prefill_seconds - res.queue_seconds,
                            "first_token_s": t_prefilled - t_start,
                            "second_token_s": now - t_start,
                            "handoff_bytes": nbytes})
                    yield chunk
                return
            except ray.exceptions.RayTaskError as e:
                if not isinstance(e.cause, OutOfBlocksError):
                    raise
                logger.info("request %s: decode %s refused (no room)", req.request_id, d_try.worker_id)
                continue
        raise UnavailableError("every decode worker refused the request (out of KV blocks)")

    async def _release(self, w: _WorkerRef, lease_id: str, request_id: str) -> None:
        try:
            await w.actor.release.remote(lease_id)
        except Exception:  # gone, or already released: its lease expires on its own
            logger.debug("request %s: release of %s failed", request_id, lease_id, exc_info=True)

    async def _release_result(self, p: _WorkerRef, ref: Any, request_id: str,
                              d: _WorkerRef) -> None:
        try:
            res = await ref
        except Exception:
            return
        if res.handle is not None:
            self._drop_push(d, res)
            await self._release(p, res.handle.lease_id, request_id)

    def _drop_push(self, d: _WorkerRef, res: Any) -> None:
        """A push nobody will decode is still read off the channel (its sender waits)."""
        if res.pushed is not None:
            d.actor.drop_pushed.remote(res.handle, res.pushed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _decode_order(self, first: _WorkerRef) -> list[_WorkerRef]:
        rest = [w for w in self._alive("decode") if w is not first]
        rest.sort(key=lambda w: -(w.load.free_blocks if w.load else 0))
        return [first, *rest]

    def _observe_handoff(self, nbytes: int, seconds: float) -> None:
        """``nbytes``: what the handoff moved (not the blocks the decode worker had cached:
        counting them would read a fast link into a handoff that moved little)."""
        self.counters["handoff_bytes"] += nbytes
        self.counters["handoffs"] += 1
        self.counters["handoff_seconds"] += seconds
        if (seconds > 0 and nbytes >= LINK_SAMPLE_MIN_BYTES
                and self.config.link_bytes_per_s is None):
            self.link_bytes_per_s = 0.8 * self.link_bytes_per_s + 0.2 * (nbytes / seconds)

    @staticmethod
    async def _stream(gen: Any) -> AsyncIterator[TokenChunk]:
        async for ref in gen:
            yield await ref

    def _resume_state(self, req: GenerateRequest, streamed: list[TokenChunk]) -> SeqState:
        assert self.prompts is not None
        ids = list(req.prompt_token_ids) + [t for c in streamed for t in c.token_ids]
        text = "".join(c.text for c in streamed)
        full, prefix_offset, read_offset = resume_point(
            self.prompts.tokenizer, ids, len(req.prompt_token_ids), req.params.skip_special_tokens,
            text)
        cached = next((c.usage.cached_tokens for c in streamed if c.usage), 0)
        return SeqState(req.request_id, tuple(ids), len(req.prompt_token_ids), req.params,
                        req.priority, req.cache_salt, full, len(text), prefix_offset,
                        read_offset, cached, session_id=req.session_id)

    # -- introspection ------------------------------------------------------------------
    async def worker_stats(self) -> dict[str, dict]:
        out = {}
        for w in list(self.workers.values()):
            if w.alive:
                try:
                    load = w.load  # the last polled queue lengths (for metrics)
                    out[w.worker_id] = {"role": w.role,
                                        "num_running": load.num_running if load else 0,
                                        "num_waiting": load.num_waiting if load else 0,
                                        **(await w.actor.stats.remote())}
                except DEAD:
                    await self._mark_dead(w)
        return out

    async def cached_prefix_tokens(self, candidates: list[list[int]], cache_salt: str | None
                                   ) -> list[int]:
        """For each candidate prompt, the leading tokens some worker holds in its cache."""
        out = []
        for ids in candidates:
            hashes = hash_prompt_blocks(list(ids), self.config.block_size, cache_salt)
            hits = await self.index.lookup.remote(hashes) if hashes else {}
            out.append(max(hits.values(), default=0) * self.config.block_size)
        return out

    async def request_timings(self) -> list[dict]:
        return list(self.timings)

    async def inflight(self) -> dict[str, dict]:
        """Where each running request is: the worker holding it and the lease it waits on."""
        return {rid: {"holder": a.holder.worker_id if a.holder else None,
                      "role": a.holder.role if a.holder else None,
                      "lease": a.lease[1] if a.lease else None, "cancelled": a.cancelled}
                for rid, a in self.active.items()}

    async def stats(self) -> dict:
        return {"counters": dict(self.counters), "link_bytes_per_s": self.link_bytes_per_s,
                "alive": {w.worker_id: w.alive for w in self.workers.values()},
                "roles": {w.worker_id: w.role for w in self.workers.values()},
                "draining": [w.worker_id for w in self.workers.values() if w.alive and w.draining],
                "active": len(self.active)}

    async def model_info(self) -> dict:
        assert self.prompts is not None
        return {"model": self.config.model or "SmolLM2-135M-Instruct", "path": self.model_path,
                "vocab_size": self.prompts.vocab_size, "max_model_len": self.prompts.max_model_len,
                "block_size": self.config.block_size}

    async def ready(self) -> bool:
        return self.prompts is not None and bool(self._alive("decode"))

    async def worker_table(self) -> list[dict]:
        """Every worker this router has had (the newest gone ones), for ``pdserve workers``:
        id, role, state (serving, draining, gone) and its last polled load."""
        rows = []
        for w in self.workers.values():
            load = w.load
            rows.append({"worker_id": w.worker_id, "role": w.role,
                         "state": "gone" if not w.alive else "draining" if w.draining else "serving",
                         "running": load.num_running if load else 0,
                         "waiting": load.num_waiting if load else 0,
                         "free_blocks": load.free_blocks if load else 0,
                         "total_blocks": load.total_blocks if load else 0})
        return rows

    async def worker_handles(self) -> dict[str, tuple[str, Any]]:
        """Every worker this router has had, replacements included: id -> (role, actor)."""
        return {w.worker_id: (w.role, w.actor) for w in self.workers.values()}

    async def shutdown(self) -> None:
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._lifecycle):
            task.cancel()


def _replacement_name(worker_id: str) -> Any:
    """Ids for a worker taking ``worker_id``'s place: ``<its first id>~<n>``."""
    base = worker_id.split("~")[0]
    return lambda n: f"{base}~{n}"


def _ongoing(w: _WorkerRef) -> int:
    return w.load.num_running + w.load.num_waiting if w.load else 0


RouterActor = ray.remote(max_concurrency=10000)(Router)
