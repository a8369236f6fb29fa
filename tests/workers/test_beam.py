"""Beam search equals transformers' beam search (same beams, same scores) and forks share
blocks, copying exactly one block when a beam writes into a shared partial block."""

from __future__ import annotations

import pytest
import torch

from pdserve.workers.block_manager import BlockManager
from pdserve.workers.config import EngineConfig
from pdserve.workers.engine import LLMEngine
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence

NUM_BLOCKS = 160


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return LLMEngine(EngineConfig(num_blocks=NUM_BLOCKS), model_path=smollm2_path)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def _run(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams):
    engine.add_request(rid, prompt_token_ids=ids, params=params)
    final = None
    while engine.has_unfinished():
        for c in engine.step():
            if c.finished:
                final = c
    return final


def _hf_beams(hf, ids, width, max_tokens, lp, es, eos=2):
    g = hf.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width,
                    max_new_tokens=max_tokens, do_sample=False, length_penalty=lp,
                    early_stopping=es, output_scores=True, return_dict_in_generate=True)
    beams = []
    for s in g.sequences:
        t = s[len(ids):].tolist()
        beams.append(tuple(t[: t.index(eos) + 1] if eos in t else t))
    return beams, g.sequences_scores.tolist()


@pytest.mark.parametrize("width,max_tokens,lp,early", [(3, 12, 1.0, False), (4, 10, 0.5, True)])
def test_beam_search_matches_transformers(engine, hf, width, max_tokens, lp, early):
    prompts = [
        engine.apply_chat_template([{"role": "user", "content": "Name a color."}]),
        engine.tokenizer.encode("The history of Rome began"),
        engine.tokenizer.encode("def fibonacci(n):"),
    ]
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_tokens=max_tokens, use_beam_search=True, n=width,
                            length_penalty=lp, early_stopping=early, temperature=0)
        out = _run(engine, f"beam-{width}-{i}", ids, sp)
        beams, scores = _hf_beams(hf, ids, width, max_tokens, lp, early)
        assert [b.token_ids for b in out.beams] == beams
        assert [b.score for b in out.beams] == pytest.approx(scores, abs=2e-4)
        assert out.token_ids == beams[0]
        assert out.text == engine.tokenizer.decode(beams[0], skip_special_tokens=True)
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_beam_fork_copies_only_written_shared_block(engine):
    copies: list[tuple[int, int]] = []
    orig = engine.runner.copy_blocks

    def spy(c):
        copies.extend(c)
        orig(c)

    engine.runner.copy_blocks = spy
    try:
        ids = engine.tokenizer.encode("Once upon a time, in a land far away,")  # partial block
        sp = SamplingParams(max_tokens=6, use_beam_search=True, n=3, temperature=0)
        _run(engine, "beam-copies", ids, sp)
    finally:
        engine.runner.copy_blocks = orig
    # Each copy is one block (src, dst) and only ever of a partially filled shared block.
    assert copies and all(s != d for s, d in copies)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_fork_then_write_copies_exactly_one_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Sequence("r", list(range(10)), 10, SamplingParams(), 0.0, seq_id="r#0")
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    child = Sequence("r", list(range(10)), 10, SamplingParams(), 0.0, seq_id="r#1")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    child.token_ids.append(99)
    copies = bm.allocate(child, 1)
    assert len(copies) == 1 and copies[0][0] == parent.block_table[-1]
    assert child.block_table[:2] == parent.block_table[:2]  # full blocks stay shared
    bm.check_integrity()
    bm.free(child)
    bm.free(parent)
    bm.check_integrity()
    assert bm.num_free_blocks == 8


def test_beam_abort_frees_every_beam(engine):
    ids = engine.tokenizer.encode("A long story about the sea and the ships that sail it")
    engine.add_request("beam-abort", prompt_token_ids=ids,
                       params=SamplingParams(max_tokens=30, use_beam_search=True, n=4, temperature=0))
    for _ in range(4):
        engine.step()
    assert engine.abort_request("beam-abort")
    engine.step()
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_beam_search_rejects_stop_strings(engine):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("beam-bad", prompt="hi", params=SamplingParams(
            use_beam_search=True, n=2, stop=("x",), temperature=0))
    assert e.value.field == "sampling_params.use_beam_search"


def test_parallel_sampling_shares_prompt_blocks_and_reproduces(engine):
    from pdserve.workers.llm import collect

    ids = engine.apply_chat_template([{"role": "user", "content": "Tell me a joke."}])

    def run(rid: str, with_neighbour: bool):
        engine.add_request(rid, prompt_token_ids=ids,
                           params=SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=7))
        if with_neighbour:
            engine.add_request(rid + "-other", prompt="Hello",
                               params=SamplingParams(max_tokens=5, temperature=1.0))
        chunks = []
        forked_tables = None
        while engine.has_unfinished():
            for c in engine.step():
                if c.request_id == rid:
                    chunks.append(c)
            g = engine.requests.get(rid)
            if g is not None and g.parallel.forked and forked_tables is None:
                forked_tables = [s.block_table[: len(ids) // 16] for s in g.parallel.seqs]
        return collect(rid, tuple(ids), chunks), forked_tables

    alone, tables = run("par-a", False)
    crowded, _ = run("par-b", True)
    assert len(alone.choices) == 4
    assert [c.token_ids for c in alone.choices] == [c.token_ids for c in crowded.choices]
    assert len({c.token_ids for c in alone.choices}) > 1  # independent samples
    assert all(t == tables[0] for t in tables)  # the prompt's full blocks are shared
    assert alone.usage.completion_tokens == sum(len(c.token_ids) for c in alone.choices)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, use_beam_search=True, n=3, temperature=0),
    SamplingParams(max_tokens=8, n=3, temperature=1.0, seed=11),
])
def test_beams_and_samples_over_a_handoff(engine, smollm2_path, params):
    """Split: the prefill side computes the prompt's KV (all but the last token), the decode
    side pulls it and forks beams / samples over the received blocks: same result as one engine."""
    from pdserve.workers.disagg_engine import DisaggEngine
    from pdserve.workers.llm import collect

    pre = DisaggEngine(EngineConfig(num_blocks=64, worker_id="p"), smollm2_path,
                       tokenizer=engine.tokenizer)
    dec = DisaggEngine(EngineConfig(num_blocks=64, worker_id="d"), smollm2_path,
                       tokenizer=engine.tokenizer)
    ids = engine.tokenizer.encode("The three primary colors are red, and then what else? Tell me.")
    pre.add_request("split", prompt_token_ids=ids, params=params, prefill_only=True)
    while pre.lease_for("split") is None:
        pre.step()
    lease = pre.lease_for("split")
    assert lease.handle.num_tokens == len(ids) - 1
    start = dec.reserve(lease.state, lease.handle.num_tokens)
    dec.complete("split", start, pre.export_lease(lease.lease_id, start), lease.handle.num_tokens)
    assert pre.release_lease(lease.lease_id)
    chunks = []
    while dec.has_unfinished():
        chunks += dec.step()
    split = collect("split", tuple(ids), chunks)
    engine.add_request("whole", prompt_token_ids=ids, params=params)
    whole_chunks = []
    while engine.has_unfinished():
        whole_chunks += engine.step()
    whole = collect("whole", tuple(ids), whole_chunks)
    if params.use_beam_search:
        assert [b.token_ids for b in split.beams] == [b.token_ids for b in whole.beams]
    else:
        assert [c.token_ids for c in split.choices] == [c.token_ids for c in whole.choices]
    for e in (pre, dec):
        e.check_integrity()
        assert e.block_manager.num_free_blocks == 64
