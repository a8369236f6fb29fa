"""Tests of pdserve.workers.engine: request lifecycle, aborts at every stage, ordering, budget.

A tiny random Llama keeps these fast; exactness against HF lives in test_exactness.py.
"""

from __future__ import annotations

import pytest

from pdserve.workers.sampling_params import SamplingParams

LONG = list(range(100, 160))  # 60 tokens: 4 blocks, 9 chunks of 7


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture
def engine(engine_factory, tiny_llama):
    eng = engine_factory(tiny_llama, num_blocks=32, long_prefill_token_threshold=7)
    assert eng.block_manager.pool.reset_prefix_cache()
    return eng


def free_blocks(eng) -> int:
    return eng.block_manager.num_free_blocks


def assert_aborted(eng, rid: str, start_free: int) -> None:
    chunks = eng.step()  # the abort's final chunk comes out of the next step
    final = [c for c in chunks if c.request_id == rid]
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "abort"
    assert final[0].usage is not None
    assert rid not in eng.requests
    assert free_blocks(eng) == start_free
    eng.check_integrity()
    assert not eng.abort_request(rid)  # a second abort: unknown now


def test_abort_while_waiting(engine):
    start, steps = free_blocks(engine), engine.num_steps
    engine.add_request("w", prompt_token_ids=LONG, params=SamplingParams(max_tokens=4))
    assert engine.abort_request("w")
    assert_aborted(engine, "w", start)
    assert engine.num_steps == steps  # the model never ran
    assert not engine.has_unfinished()


def test_abort_mid_chunked_prefill(engine):
    start = free_blocks(engine)
    seq = engine.add_request("c", prompt_token_ids=LONG, params=SamplingParams(max_tokens=4))
    engine.step()
    engine.step()
    assert seq.num_computed_tokens == 14 and seq.num_output_tokens == 0
    assert free_blocks(engine) < start
    assert engine.abort_request("c")
    assert_aborted(engine, "c", start)


def test_abort_while_decoding(engine):
    start = free_blocks(engine)
    seq = engine.add_request("d", prompt_token_ids=LONG[:10],
                             params=SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert seq.num_output_tokens == 4
    assert engine.abort_request("d")
    assert_aborted(engine, "d", start)


def test_abort_after_finish_returns_false(engine, run_engine):
    start = free_blocks(engine)
    engine.add_request("f", prompt_token_ids=LONG[:5], params=SamplingParams(max_tokens=3,
                                                                              ignore_eos=True))
    chunks = run_engine(engine)["f"]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3
    assert not engine.abort_request("f")
    assert not engine.abort_request("never-existed")
    assert free_blocks(engine) == start and engine.step() == []
    engine.check_integrity()


def test_abort_one_of_many_leaves_the_others_exact(engine, run_engine):
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {f"q{i}": LONG[i * 5:i * 5 + 9 + i] for i in range(4)}
    for rid, ids in prompts.items():
        engine.add_request(rid, prompt_token_ids=ids, params=sp)
    alone = run_engine(engine)
    start = free_blocks(engine)
    for rid, ids in prompts.items():
        engine.add_request(rid, prompt_token_ids=ids, params=sp)
    engine.add_request("victim", prompt_token_ids=LONG, params=sp)
    early = engine.step() + engine.step()
    assert engine.abort_request("victim")
    together = run_engine(engine)
    for c in early:
        together[c.request_id].insert(0, c)
    assert together.pop("victim")[-1].finish_reason == "abort"
    assert {k: [t for c in v for t in c.token_ids] for k, v in together.items()} == \
        {k: [t for c in v for t in c.token_ids] for k, v in alone.items()}
    assert free_blocks(engine) == start


def test_priority_orders_the_waiting_queue(engine_factory, tiny_llama, run_engine):
    eng = engine_factory(tiny_llama, num_blocks=32, max_num_seqs=1)
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    for rid, prio, arrival in [("late-low", 2, 1.0), ("early-low", 2, 0.5), ("urgent", -5, 9.0),
                               ("normal", 0, 3.0)]:
        eng.add_request(rid, prompt_token_ids=LONG[:6], params=sp, priority=prio, arrival=arrival)
    finished: list[str] = []
    while eng.has_unfinished():
        finished += [c.request_id for c in eng.step() if c.finished]
    assert finished == ["urgent", "normal", "early-low", "late-low"]


def test_every_step_respects_the_token_budget(engine_factory, tiny_llama, run_engine, monkeypatch):
    eng = engine_factory(tiny_llama, num_blocks=64, max_num_batched_tokens=12)
    seen: list[int] = []
    execute = eng.runner.execute

    def spy(out, *args, **kwargs):
        seen.append(out.num_tokens)
        return execute(out, *args, **kwargs)

    monkeypatch.setattr(eng.runner, "execute", spy)
    for i in range(6):
        eng.add_request(f"b{i}", prompt_token_ids=list(range(1000 * i, 1000 * i + 5 + 7 * i)),
                        params=SamplingParams(max_tokens=4, ignore_eos=True))
    out = run_engine(eng)
    assert all(o[-1].usage.completion_tokens == 4 for o in out.values()) and len(out) == 6
    assert max(seen) == 12 and all(n <= 12 for n in seen)
    assert sum(seen) == sum(5 + 7 * i for i in range(6)) + 6 * 3  # prompts + 3 decodes each


def test_usage_and_chunks_describe_the_request(engine, run_engine):
    engine.add_request("u", prompt_token_ids=LONG[:20],
                       params=SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    chunks = run_engine(engine)["u"]
    assert [len(c.token_ids) for c in chunks] == [1] * 5
    assert [c.finished for c in chunks] == [False] * 4 + [True]
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (20, 5, 0)
    engine.add_request("u2", prompt_token_ids=LONG[:20],
                       params=SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    again = run_engine(engine)["u2"]
    assert again[-1].usage.cached_tokens == 16
    assert [c.token_ids for c in again] == [c.token_ids for c in chunks]


@pytest.mark.parametrize("chunk", [None, 20])
def test_a_burst_sharing_a_new_prefix_computes_it_once_with_the_same_output(engine_factory, tiny_llama,
                                                                            run_engine, chunk):
    """Four requests arrive together with the same 48-token prefix: one computes it, the
    others ride its blocks in the step that fills them (with ``chunk``, the prompt's last
    chunk, after waiting through the first two); the tokens equal an engine without
    prefix caching, and every step ran the riders' tails beside the writer."""
    shared = list(range(2000, 2048))
    outs = {}
    for caching in (True, False):
        eng = engine_factory(tiny_llama, num_blocks=64, enable_prefix_caching=caching,
                             long_prefill_token_threshold=chunk)
        if caching:
            eng.block_manager.pool.reset_prefix_cache()
            ridden, steps = eng.block_manager.blocks_ridden, eng.num_steps
        for i in range(4):
            eng.add_request(f"burst{i}", prompt_token_ids=shared + [3000 + i] * 5,
                            params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        outs[caching] = run_engine(eng)
        if caching:
            # 48 shared tokens, 3 blocks of 16: each rider takes all three in the writer's
            # step, or with chunks the last one (the first two are cached by then)
            assert eng.block_manager.blocks_ridden - ridden == 3 * (1 if chunk else 3)
            # prefill steps (53 tokens, chunks of 20: 3) plus the 3 other tokens' steps
            assert eng.num_steps - steps == (3 if chunk else 1) + 3
            eng.block_manager.check_integrity()
    tokens = {c: {r: [t for ch in chunks for t in ch.token_ids] for r, chunks in o.items()}
              for c, o in outs.items()}
    assert tokens[True] == tokens[False]
    # cached tokens count cache hits only: with chunks, the riders found two blocks cached
    cached = sorted(o[-1].usage.cached_tokens for o in outs[True].values())
    assert cached == ([0, 32, 32, 32] if chunk else [0, 0, 0, 0])


def test_an_engine_makes_no_kv_events_until_a_consumer_takes_them(engine_factory, tiny_llama,
                                                                  run_engine):
    """An offline engine has nobody taking its KV events: it makes none (a queue of them
    was thousands of objects for the cyclic GC to walk). A consumer's first take sees the
    skipped ones as a gap in the sequence numbers; from then on every change is an event."""
    eng = engine_factory(tiny_llama, num_blocks=24, max_num_seqs=3)  # this test's own engine
    pool = eng.block_manager.pool
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    eng.add_request("quiet", prompt_token_ids=list(range(500, 540)), params=params)
    run_engine(eng)
    assert pool.cached_hashes() and pool._events == [] and pool.event_seq == 0
    gap = eng.block_manager.take_events()  # the skipped events: a gap, reported at once
    assert gap is not None and gap.seq == 2 and gap.events == () and pool.event_seq == 2
    eng.add_request("heard", prompt_token_ids=list(range(600, 640)), params=params)
    run_engine(eng)
    batch = eng.block_manager.take_events()
    assert batch is not None and batch.seq == 3 and batch.events
