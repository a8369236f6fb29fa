"""Unit tests of the placement cost model (cluster/placement.py): pure functions, no Ray."""

from __future__ import annotations

import random

import pytest

from pdserve.cluster.placement import CostParams, decode_seconds, place, prefill_seconds
from pdserve.workers.worker import WorkerLoad

BS = 16
MB = 1 << 20


def load(wid: str, role: str, *, running: int = 0, waiting: int = 0, waiting_tokens: int = 0,
         tps: float = 1000.0, step: float = 0.02, block_bytes: int = MB) -> WorkerLoad:
    return WorkerLoad(worker_id=wid, role=role, num_running=running, num_waiting=waiting,
                      waiting_tokens=waiting_tokens, free_blocks=100, total_blocks=100,
                      num_leases=0, prefill_tokens_per_s=tps, decode_step_s=step,
                      block_bytes=block_bytes, time=0.0)


def params(link: float = 1e9, direct_max_tokens: int = 32) -> CostParams:
    return CostParams(BS, max_num_seqs=8, link_bytes_per_s=link,
                      direct_max_tokens=direct_max_tokens)


P0, P1 = load("p0", "prefill"), load("p1", "prefill")
D0, D1 = load("d0", "decode"), load("d1", "decode")


def test_needs_a_decode_worker() -> None:
    with pytest.raises(ValueError):
        place(64, {}, [P0], [], params(), 16)


def test_cold_prompt_is_prefilled_then_handed_off_at_the_modelled_cost() -> None:
    plan = place(100, {}, [P0], [D0], params(link=1e8), 16)
    assert (plan.kind, plan.prefill, plan.decode) == ("pd", "p0", "d0")
    assert (plan.prefix_source, plan.prefix_blocks, plan.have_blocks) == (None, 0, 0)
    n_blocks = 7  # ceil(100 / 16)
    expected = (prefill_seconds(P0, 100) + n_blocks * MB / 1e8
                + decode_seconds(D0, params(), 16))
    assert plan.cost_s == pytest.approx(expected)


def test_without_prefill_workers_everything_runs_direct() -> None:
    plan = place(100, {}, [], [D0, D1], params(), 16)
    assert plan.kind == "direct" and plan.prefill is None


def test_short_uncached_tail_on_the_decode_worker_runs_direct() -> None:
    # d0 holds 4 of 5 blocks: the 16-token tail is cheaper to compute there than to hand off.
    plan = place(80, {"d0": 4}, [P0], [D0, D1], params(), 16)
    assert (plan.kind, plan.decode) == ("direct", "d0")
    # The threshold gates it: a tail over direct_max_tokens always goes through a prefill.
    assert place(80, {"d0": 4}, [P0], [D0], params(direct_max_tokens=15), 16).kind == "pd"
    # ... and no decode hit, no direct (with a prefill worker alive).
    assert place(20, {}, [P0], [D0], params(direct_max_tokens=1000), 16).kind == "pd"


def test_direct_is_avoided_on_a_decode_worker_busy_with_streams() -> None:
    busy = load("d0", "decode", running=7, tps=200.0)
    plan = place(80, {"d0": 4}, [P0], [busy], params(link=1e12), 16)
    assert plan.kind == "pd"


def test_prefill_goes_where_the_prefix_is_cached() -> None:
    plan = place(20 * BS + 5, {"p1": 20}, [P0, P1], [D0], params(link=1e6), 16)
    assert (plan.kind, plan.prefill, plan.have_blocks, plan.prefix_source) == ("pd", "p1", 20, None)


def test_busy_prefill_worker_loses_to_an_idle_one() -> None:
    busy = load("p0", "prefill", waiting=3, waiting_tokens=5000)
    plan = place(64, {}, [busy, P1], [D0], params(), 16)
    assert plan.prefill == "p1"


def test_prefix_is_imported_when_moving_it_beats_computing_it() -> None:
    # p0 holds 10 blocks but is busy; p1 holds 2. Over a fast link p1 imports blocks 2..10.
    busy = load("p0", "prefill", waiting_tokens=20_000)
    hits = {"p0": 10, "p1": 2}
    plan = place(12 * BS, hits, [busy, P1], [D0], params(link=1e12), 16)
    assert (plan.prefill, plan.prefix_source, plan.prefix_blocks, plan.have_blocks) == (
        "p1", "p0", 10, 2)
    # Over a slow link (8 blocks = 8 s) recomputing 128 tokens (0.13 s) is cheaper.
    plan = place(12 * BS, hits, [busy, P1], [D0], params(link=1 * MB), 16)
    assert (plan.prefill, plan.prefix_source, plan.have_blocks) == ("p1", None, 2)


def test_a_decode_worker_can_be_the_prefix_source() -> None:
    plan = place(12 * BS, {"d1": 10}, [P0], [D0, D1], params(link=1e12, direct_max_tokens=0), 16)
    assert (plan.kind, plan.prefill, plan.prefix_source, plan.prefix_blocks) == ("pd", "p0", "d1", 10)


def test_hits_past_the_prompt_are_clamped() -> None:
    plan = place(40, {"p0": 50}, [P0], [D0], params(link=1e6), 16)
    assert plan.have_blocks == 3  # ceil(40 / 16)


def test_less_loaded_decode_worker_is_chosen() -> None:
    busy = load("d0", "decode", running=8, waiting=4)
    plan = place(64, {}, [P0], [busy, D1], params(), 64)
    assert plan.decode == "d1"


@pytest.mark.parametrize("seed", range(5))
def test_random_loads_give_a_consistent_cheapest_plan(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        pre = [load(f"p{i}", "prefill", running=rng.randrange(4), waiting_tokens=rng.randrange(4000),
                    tps=rng.uniform(100, 5000)) for i in range(rng.randrange(0, 4))]
        dec = [load(f"d{i}", "decode", running=rng.randrange(8), waiting=rng.randrange(3),
                    tps=rng.uniform(100, 5000), step=rng.uniform(0.005, 0.1))
               for i in range(rng.randrange(1, 4))]
        n_tokens = rng.randrange(1, 400)
        n_blocks = -(-n_tokens // BS)
        hits = {w.worker_id: rng.randrange(0, n_blocks + 3) for w in pre + dec if rng.random() < 0.5}
        prm = params(link=10 ** rng.uniform(5, 11), direct_max_tokens=rng.choice([0, 16, 32, 64]))
        out = rng.randrange(1, 64)
        plan = place(n_tokens, hits, pre, dec, prm, out)

        assert plan.decode in {w.worker_id for w in dec}
        if plan.kind == "direct":
            d_hit = min(hits.get(plan.decode, 0), n_blocks)
            assert not pre or (d_hit > 0 and n_tokens - d_hit * BS <= prm.direct_max_tokens)
        else:
            assert plan.kind == "pd" and plan.prefill in {w.worker_id for w in pre}
            assert plan.have_blocks == min(hits.get(plan.prefill, 0), n_blocks)
            if plan.prefix_source is not None:
                assert plan.prefix_source != plan.prefill
                assert plan.have_blocks < plan.prefix_blocks <= n_blocks
        # No plain prefill-then-hand-off pair is cheaper than the chosen plan.
        for p in pre:
            for d in dec:
                p_hit = min(hits.get(p.worker_id, 0), n_blocks)
                d_hit = min(hits.get(d.worker_id, 0), n_blocks)
                plain = (prefill_seconds(p, n_tokens - p_hit * BS)
                         + (n_blocks - d_hit) * p.block_bytes / prm.link_bytes_per_s
                         + decode_seconds(d, prm, out))
                assert plan.cost_s <= plain + 1e-12
