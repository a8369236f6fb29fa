"""Prometheus metrics of the serving front and the cluster, vLLM-style names under ``pdserve:``.

Request latencies (TTFT, inter-token, TPOT, end to end, decode) are measured at the front,
where the client sees them; worker and router figures (queue and prefill time, KV usage,
prefix-cache queries/hits, preemptions, handoffs) come from the router's snapshot taken when
``/metrics`` is scraped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

P = "pdserve:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                         0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
SEEN_TIMINGS = 16384  # > the router's timing log, so no entry is counted twice
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class RequestTimes:
    """One request's timestamps (monotonic seconds) and token counts, filled as it runs."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    truncated_tokens: int = 0
    generation_tokens: int = 0


class ClusterCollector(Collector):
    """Exposes the last snapshot of the router's worker and router statistics."""

    def __init__(self) -> None:
        self.workers: dict[str, dict] = {}
        self.router: dict = {}

    def update(self, workers: dict[str, dict], router: dict) -> None:
        self.workers, self.router = workers, router

    def collect(self) -> Iterator[Metric]:
        labels = ["worker_id", "role"]

        def per_worker(kind: type, name: str, doc: str, key: Callable[[dict], float]) -> Metric:
            fam = kind(P + name, doc, labels=labels)
            for wid, s in sorted(self.workers.items()):
                fam.add_metric([wid, s.get("role", "")], float(key(s)))
            return fam

        def usage(s: dict) -> float:
            total = s.get("total_blocks") or 0
            return (total - s.get("free_blocks", 0)) / total if total else 0.0

        ws = list(self.workers.values())
        yield per_worker(GaugeMetricFamily, "num_requests_running",
                         "Requests in the worker's running batch.", lambda s: s.get("num_running", 0))
        yield per_worker(GaugeMetricFamily, "num_requests_waiting",
                         "Requests waiting in the worker's queue.", lambda s: s.get("num_waiting", 0))
        yield per_worker(GaugeMetricFamily, "kv_cache_usage_perc",
                         "Fraction of the worker's KV blocks in use (1 = full).", usage)
        yield per_worker(GaugeMetricFamily, "kv_leases",
                         "Prefill KV handles pinned under a lease, awaiting their decode pull.",
                         lambda s: s.get("leases", 0))
        yield per_worker(CounterMetricFamily, "prefix_cache_queries",
                         "Prompt tokens looked up in the worker's prefix cache.",
                         lambda s: s.get("prefix_queries", 0))
        yield per_worker(CounterMetricFamily, "prefix_cache_hits",
                         "Prompt tokens found in the worker's prefix cache.",
                         lambda s: s.get("prefix_hits", 0))
        yield per_worker(CounterMetricFamily, "num_preemptions",
                         "Sequences preempted (recomputed) for lack of KV blocks.",
                         lambda s: s.get("preemptions", 0))
        total_blocks = sum(s.get("total_blocks", 0) for s in ws)
        free_blocks = sum(s.get("free_blocks", 0) for s in ws)
        yield GaugeMetricFamily(P + "cluster_kv_cache_usage_perc",
                                "Fraction of all workers' KV blocks in use.",
                                value=(total_blocks - free_blocks) / total_blocks if total_blocks else 0.0)
        for key, name in (("prefix_queries", "queries"), ("prefix_hits", "hits")):
            yield CounterMetricFamily(P + f"cluster_prefix_cache_{name}",
                                      f"Prefix-cache {name} (tokens) summed over all workers.",
                                      value=sum(s.get(key, 0) for s in ws))
        for key in ("running", "waiting"):
            yield GaugeMetricFamily(P + f"cluster_num_requests_{key}",
                                    f"Requests {key} summed over all workers.",
                                    value=sum(s.get(f"num_{key}", 0) for s in ws))
        c = self.router.get("counters", {})
        yield CounterMetricFamily(P + "kv_handoff_bytes",
                                  "KV bytes moved from prefill to decode workers "
                                  "(not blocks already cached there).",
                                  value=c.get("handoff_bytes", 0))
        yield SummaryMetricFamily(P + "kv_handoff_time_seconds",
                                  "Prefill-to-decode handoffs: time from the prefill result to "
                                  "the first decoded token (pull included).",
                                  count_value=c.get("handoffs", 0), sum_value=c.get("handoff_seconds", 0.0))
        paths = CounterMetricFamily(P + "router_requests", "Requests placed by the router, by path.",
                                    labels=["path"])
        for path in ("pd", "direct"):
            paths.add_metric([path], c.get(path, 0))
        yield paths
        yield CounterMetricFamily(P + "router_retries", "Requests retried after a worker died.",
                                  value=c.get("retries", 0))
        alive = self.router.get("alive", {})
        yield GaugeMetricFamily(P + "workers_alive", "Workers the router considers alive.",
                                value=sum(1 for v in alive.values() if v))
        roles, draining = self.router.get("roles", {}), set(self.router.get("draining", ()))
        by_state = GaugeMetricFamily(P + "workers", "Live workers by role and state: serving, or "
                                     "draining (retired by autoscaling, finishing what it holds).",
                                     labels=["role", "state"])
        for role in ("prefill", "decode"):
            live = [w for w, up in alive.items() if up and roles.get(w) == role]
            by_state.add_metric([role, "serving"], sum(1 for w in live if w not in draining))
            by_state.add_metric([role, "draining"], sum(1 for w in live if w in draining))
        yield by_state
        changes = CounterMetricFamily(P + "router_worker_changes", "Workers the router started "
                                      "or retired: replacements (of dead or drained ones), "
                                      "autoscaling's additions and retirements, drains.", labels=["kind"])
        for kind, key in (("replacement", "replacements"), ("scale_up", "scale_ups"),
                          ("scale_down", "scale_downs"), ("drain", "drains")):
            changes.add_metric([kind], c.get(key, 0))
        yield changes


class Metrics:
    """The registry of one serving front (not Prometheus' global one: several fronts may run
    in one process, e.g. in tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._seen_timings: OrderedDict[str, None] = OrderedDict()
        self.cluster = ClusterCollector()
        r.register(self.cluster)
        self.in_flight = Gauge(P + "num_requests_in_flight",
                               "Requests accepted by this front and not finished.", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds",
                             "Time between successive streamed chunks of a request.",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(P + "request_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (tokens - 1).",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds",
                               "Time in the prefill worker's waiting queue (P/D requests).",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram(P + "request_prefill_time_seconds",
                                 "Prefill compute on the prefill worker, queue excluded "
                                 "(P/D requests).", buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram(P + "request_decode_time_seconds",
                                "First token to the last token (handoff and decode).",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.failures = Counter(P + "request_failure", "Requests that ended in an error, by code.",
                                ["code"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.cached_tokens = Counter(P + "prompt_tokens_cached",
                                     "Prompt tokens served from a prefix cache.", registry=r)
        self.truncated_tokens = Counter(P + "prompt_tokens_truncated",
                                        "Prompt tokens dropped by automatic truncation.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", registry=r)

    def observe_chunk(self, t: RequestTimes, now: float, num_tokens: int) -> None:
        if t.first_token is None:
            t.first_token = now
            self.ttft.observe(now - t.arrival)
        elif t.last_token is not None:
            self.itl.observe(now - t.last_token)
        t.last_token = now
        t.generation_tokens += num_tokens

    def observe_end(self, t: RequestTimes, finish_reason: str | None, code: str | None) -> None:
        """Once per request: ``finish_reason`` when it finished, else the error ``code``."""
        if code is not None:
            self.failures.labels(code).inc()
        else:
            self.success.labels(finish_reason or "unknown").inc()
        self.prompt_tokens.inc(t.prompt_tokens)
        self.cached_tokens.inc(t.cached_tokens)
        self.truncated_tokens.inc(t.truncated_tokens)
        self.generation_tokens.inc(t.generation_tokens)
        if t.first_token is None or t.last_token is None:
            return
        self.decode.observe(t.last_token - t.first_token)
        self.e2e.observe(t.last_token - t.arrival)
        if t.generation_tokens > 1:
            self.tpot.observe((t.last_token - t.first_token) / (t.generation_tokens - 1))

    def observe_router_timings(self, entries: list[dict]) -> None:
        """The router's per-request split of P/D requests; each entry is counted once."""
        for e in entries:
            rid = e.get("request_id")
            if rid in self._seen_timings:
                continue
            self._seen_timings[rid] = None
            if len(self._seen_timings) > SEEN_TIMINGS:
                self._seen_timings.popitem(last=False)
            self.queue.observe(max(0.0, e.get("queue_s", 0.0)))
            self.prefill.observe(max(0.0, e.get("prefill_s", 0.0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
