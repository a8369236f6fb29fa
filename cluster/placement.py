"""Where a request runs: a cost model in estimated seconds over the workers' loads.

No weights to tune: each term is a time, estimated from what the workers measure
(prefill tokens/s, decode step time, handoff bytes/s) and what the index knows
(how many leading blocks of the prompt each worker already holds).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.workers.worker import WorkerLoad


@dataclass(frozen=True, slots=True)
class Placement:
    kind: str  # "pd": prefill then hand off; "direct": all on the decode worker
    prefill: str | None
    decode: str
    prefix_source: str | None  # worker to import the prefix from before prefilling
    prefix_blocks: int  # blocks the source holds (import up to here)
    have_blocks: int  # blocks the prefill worker already holds
    cost_s: float


@dataclass(frozen=True, slots=True)
class CostParams:
    block_size: int
    max_num_seqs: int
    link_bytes_per_s: float  # measured handoff bandwidth (prior until measured)
    direct_max_tokens: int = 32  # uncached tail short enough to prefill on a decode worker


def prefill_seconds(load: WorkerLoad, tokens: int) -> float:
    tps = max(load.prefill_tokens_per_s, 1.0)
    return (load.waiting_tokens + tokens) / tps


def decode_seconds(load: WorkerLoad, params: CostParams, out_tokens: int) -> float:
    # A step costs more as the batch fills; the queue adds waiting steps.
    occupancy = (load.num_running + load.num_waiting + 1) / max(params.max_num_seqs, 1)
    return load.decode_step_s * (1.0 + occupancy) * max(out_tokens, 1)


def place(num_tokens: int, hits: dict[str, int], prefill: list[WorkerLoad],
          decode: list[WorkerLoad], params: CostParams, out_tokens: int) -> Placement:
    """Choose the cheapest plan. ``hits`` maps worker id -> leading cached blocks."""
    if not decode:
        raise ValueError("no decode worker available")
    bs = params.block_size
    n_blocks = -(-num_tokens // bs)
    bw = max(params.link_bytes_per_s, 1.0)
    best_holder = max(((w, min(n, n_blocks)) for w, n in hits.items()),
                      key=lambda kv: kv[1], default=(None, 0))

    def transfer(load: WorkerLoad, blocks: int) -> float:
        return blocks * load.block_bytes / bw

    best: Placement | None = None
    for d in decode:
        d_hit = min(hits.get(d.worker_id, 0), n_blocks)
        dec = decode_seconds(d, params, out_tokens)
        # Direct: the decode worker prefills the uncached tail itself.
        tail = num_tokens - d_hit * bs
        if (d_hit > 0 and tail <= params.direct_max_tokens) or not prefill:
            # The tail's prefill also delays every stream running there.
            cost = prefill_seconds(d, tail) * (1 + d.num_running) + dec
            if best is None or cost < best.cost_s:
                best = Placement("direct", None, d.worker_id, None, 0, 0, cost)
        for p in prefill:
            p_hit = min(hits.get(p.worker_id, 0), n_blocks)
            source, src_blocks = None, p_hit
            holder, h_hit = best_holder
            # Import a longer prefix if moving it is faster than computing it.
            if (holder is not None and holder != p.worker_id and h_hit > p_hit
                    and transfer(p, h_hit - p_hit)
                    < prefill_seconds(p, (h_hit - p_hit) * bs) - prefill_seconds(p, 0)):
                source, src_blocks = holder, h_hit
            cached = max(p_hit, src_blocks)
            cost = (prefill_seconds(p, num_tokens - cached * bs)
                    + (transfer(p, src_blocks - p_hit) if source else 0.0)
                    + transfer(p, n_blocks - d_hit) + dec)
            if best is None or cost < best.cost_s:
                best = Placement("pd", p.worker_id, d.worker_id, source, src_blocks, p_hit, cost)
    assert best is not None
    return best
