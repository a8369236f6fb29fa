"""Greedy output and last-step logits equal Hugging Face transformers, whatever the batching.

One HF model per module is the reference; our engines come from the session ``smol_engine``
factory. Every scenario that changes *how* tokens are computed (prefix-cache hits, chunked
prefill, preemption with recompute, requests joining a running batch) must leave *what* is
computed unchanged: the same tokens, token for token, EOS included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.workers.sampling_params import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
SYSTEM = ("You are a meticulous assistant for a public library. You answer questions about "
          "opening hours, borrowing rules, late fees and the reading room. Keep answers short, "
          "polite and factual, and never invent rules that were not given to you.")


def hf_greedy(model, ids: list[int], max_new: int, ignore_eos: bool = False) -> list[int]:
    kw = {"min_new_tokens": max_new} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def our_last_logits(engine, ids: list[int]) -> torch.Tensor:
    """Schedule the prompt by hand, run one step through the runner, return its logits row."""
    rid = "logits-probe"
    engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0))
    sched = engine.scheduler.schedule()
    batch, logits = engine.runner.execute(sched)
    engine.scheduler.finish_step(batch)
    assert logits.shape[0] == 1 and logits.dtype == torch.float32
    assert engine.abort_request(rid)
    engine.step()  # drains the abort's final chunk
    return logits[0]


def generate(engine, run_engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Submit all at once, run to completion; {rid: (tokens, last chunk)}."""
    for rid, (ids, sp) in requests.items():
        engine.add_request(rid, prompt_token_ids=ids, params=sp)
    chunks = run_engine(engine)
    return {rid: ([t for c in cs for t in c.token_ids], cs[-1]) for rid, cs in chunks.items()}


# -- SmolLM2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_smol(smollm2_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cases(smol_engine) -> dict[str, list[int]]:
    """Prompt token ids: chat and plain, 1 token to several blocks; two share a long prefix."""
    eng = smol_engine()
    tok = eng.tokenizer

    def chat(*user: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": u} for u in user]
        return eng.apply_chat_template(msgs)

    story = ("Once upon a time, in a small village at the edge of a vast forest, there lived an old "
             "clockmaker who repaired every clock in the valley. Each morning he opened his shop, "
             "wound the great pendulum clock by the door, and listened to the ticking of a hundred "
             "small machines. Children pressed their noses against the window to watch the gears turn, and "
             "the baker next door set her ovens by the chime of his tower clock, which had not missed "
             "an hour in forty years. One winter night a stranger knocked on his door carrying a clock that "
             "had no hands at all, and asked him")
    c = {
        "chat_yes": chat("Answer with one word: is the sky blue?"),
        "chat_capital": chat("What is the capital of France? Answer in one short sentence."),
        "chat_hi": chat("Say hi."),
        "chat_hours": chat("When does the library open on Saturdays?", system=SYSTEM),
        "chat_fees": chat("How much is the late fee for a book that is two days overdue?",
                          system=SYSTEM),
        "plain_story": tok.encode(story),
        "plain_code": tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        "plain_list": tok.encode("The planets of the solar system, in order from the sun, are"),
        "plain_emoji": tok.encode("Emoji list: 😀 😃 😄 😁 😆 😅 😂"),
        "one_token": [tok.encode("The")[0]],
    }
    lens = sorted(len(v) for v in c.values())
    assert lens[0] == 1 and lens[-1] >= 100, lens  # several 16-token blocks
    return c


@pytest.fixture(scope="module")
def refs(hf_smol, cases) -> dict[str, list[int]]:
    return {k: hf_greedy(hf_smol, ids, MAX_TOKENS) for k, ids in cases.items()}


def assert_matches(got: dict, refs: dict[str, list[int]]) -> None:
    for rid, (tokens, last) in got.items():
        ref = refs[rid]
        assert tokens == ref, f"{rid}: ours {tokens} != HF {ref}"
        assert last.finished
        if len(ref) < MAX_TOKENS or ref[-1] == 2:
            assert (last.finish_reason, ref[-1]) == ("stop", 2), rid
        else:
            assert last.finish_reason == "length", rid


def test_references_cover_eos_and_length(refs):
    stopped = [k for k, r in refs.items() if r[-1] == 2 and len(r) < MAX_TOKENS]
    ran_out = [k for k, r in refs.items() if len(r) == MAX_TOKENS and 2 not in r]
    assert stopped and ran_out, (stopped, ran_out)


def test_greedy_matches_hf_batched(smol_engine, run_engine, cases, refs):
    """All at once on an empty cache: the two chats on one system prompt share its blocks
    in the step that fills them (one rides the other's), and both still match HF."""
    eng = smol_engine()
    bm = eng.block_manager
    assert bm.pool.reset_prefix_cache()
    ridden = bm.blocks_ridden
    got = generate(eng, run_engine, {k: (ids, GREEDY) for k, ids in cases.items()})
    assert_matches(got, refs)
    assert bm.blocks_ridden - ridden >= 3
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_greedy_matches_hf_one_at_a_time(smol_engine, run_engine, cases, refs):
    eng = smol_engine()
    for k in ("chat_hours", "plain_story", "one_token"):
        assert_matches(generate(eng, run_engine, {k: (cases[k], GREEDY)}), refs)


def test_last_step_logits_match_hf(smol_engine, hf_smol, cases):
    eng = smol_engine()
    assert eng.block_manager.pool.reset_prefix_cache()  # full prompts, no cache hit
    for k in ("chat_fees", "plain_story", "one_token"):
        ours, theirs = our_last_logits(eng, cases[k]), hf_last_logits(hf_smol, cases[k])
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_prefix_cache_hit_keeps_output(smol_engine, run_engine, cases, refs):
    eng = smol_engine()
    bm = eng.block_manager
    assert bm.pool.reset_prefix_cache()
    first = generate(eng, run_engine, {"chat_hours": (cases["chat_hours"], GREEDY)})
    assert first["chat_hours"][1].usage.cached_tokens == 0
    hits_before = bm.prefix_hits
    second = generate(eng, run_engine, {"chat_fees": (cases["chat_fees"], GREEDY)})
    assert_matches({**first, **second}, refs)
    # The shared system prompt spans several full blocks; all of them are served from cache.
    shared = next(i for i, (a, b) in enumerate(zip(cases["chat_hours"], cases["chat_fees"],
                                                    strict=False)) if a != b)
    cached = second["chat_fees"][1].usage.cached_tokens
    assert cached == shared // eng.config.block_size * eng.config.block_size >= 3 * 16
    assert bm.prefix_hits - hits_before == cached


def test_logits_after_prefix_hit_match_hf(smol_engine, hf_smol, cases, run_engine):
    eng = smol_engine()
    ids = cases["plain_story"]
    generate(eng, run_engine, {"warm": (ids, SamplingParams(max_tokens=1, temperature=0))})
    probe = ids[:-3] + [ids[-1]]  # differs in its tail only: the leading blocks are hits
    hits = eng.block_manager.prefix_hits
    torch.testing.assert_close(our_last_logits(eng, probe), hf_last_logits(hf_smol, probe),
                               atol=1e-4, rtol=0)
    assert eng.block_manager.prefix_hits > hits


def test_chunked_prefill_matches_hf(smol_engine, run_engine, cases, refs):
    eng = smol_engine(long_prefill_token_threshold=7)
    assert eng.block_manager.pool.reset_prefix_cache()
    steps = eng.num_steps
    got = generate(eng, run_engine, {k: (ids, GREEDY) for k, ids in cases.items()})
    assert_matches(got, refs)
    longest = max(len(v) for v in cases.values())
    assert eng.num_steps - steps >= -(-longest // 7) + MAX_TOKENS - 1


def test_preemption_and_resume_match_hf(smol_engine, run_engine, cases, refs):
    # 14 blocks of 16 tokens hold the longest request (10 blocks) but not the batch: preempt.
    eng = smol_engine(num_blocks=14)
    before = eng.scheduler.num_preemptions
    got = generate(eng, run_engine, {k: (ids, GREEDY) for k, ids in cases.items()})
    assert eng.scheduler.num_preemptions > before
    assert_matches(got, refs)
    assert eng.block_manager.num_free_blocks == 14


def test_staggered_batch_of_32_matches_hf(smol_engine, cases, refs):
    """32 requests of mixed prompt and output lengths join a running batch 4 per step."""
    eng = smol_engine()
    names = sorted(cases)
    reqs = []
    for i in range(32):
        name = names[(i * 3) % len(names)]
        reqs.append((f"r{i}-{name}", cases[name], 4 + (i * 7) % (MAX_TOKENS - 3)))
    out: dict[str, list[int]] = {}
    last: dict[str, object] = {}
    pending = list(reqs)
    while pending or eng.has_unfinished():
        for rid, ids, n in pending[:4]:
            eng.add_request(rid, prompt_token_ids=ids,
                            params=SamplingParams(max_tokens=n, temperature=0))
        pending = pending[4:]
        for c in eng.step():
            out.setdefault(c.request_id, []).extend(c.token_ids)
            last[c.request_id] = c
        eng.check_integrity()
    assert eng.scheduler.num_running == 0 and len(out) == 32
    for rid, _, n in reqs:
        ref = refs[rid.split("-", 1)[1]][:n]
        assert out[rid] == ref, f"{rid}: ours {out[rid]} != HF {ref}"
        reason = "stop" if ref[-1] == 2 else "length"
        assert last[rid].finish_reason == reason, rid


def test_bfloat16_loads_and_generates(smol_engine, run_engine, cases):
    eng = smol_engine(dtype="bfloat16", num_blocks=64)
    assert next(eng.model.parameters()).dtype == torch.bfloat16
    assert eng.runner.kv_caches[0].dtype == torch.bfloat16
    got = generate(eng, run_engine, {k: (cases[k], GREEDY) for k in ("chat_capital", "plain_list")})
    for tokens, last in got.values():
        assert 1 <= len(tokens) <= MAX_TOKENS and all(0 <= t < eng.vocab_size for t in tokens)
        assert last.finish_reason in ("stop", "length")
    text = eng.tokenizer.decode(got["chat_capital"][0], skip_special_tokens=True)
    assert "Paris" in text, text  # bf16 rounding must not turn the model into noise


# -- tiny random Llama / Qwen2 / Qwen3 ---------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_hf(model_type, tiny_model_factory, engine_factory, run_engine):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(model_type)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = engine_factory(path, num_blocks=48, long_prefill_token_threshold=40)
    g = torch.Generator().manual_seed(7)
    prompts = {f"p{n}": torch.randint(3, eng.vocab_size, (n,), generator=g).tolist()
               for n in (1, 5, 17, 90)}
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = generate(eng, run_engine, {k: (ids, sp) for k, ids in prompts.items()})
    for k, ids in prompts.items():
        assert got[k][0] == hf_greedy(hf, ids, 16, ignore_eos=True), (model_type, k)
        assert got[k][1].finish_reason == "length"
        torch.testing.assert_close(our_last_logits(eng, ids), hf_last_logits(hf, ids),
                                   atol=1e-4, rtol=0)
