"""Tests of pdserve.workers.sampler, and of every sampling parameter end to end through the engine.

Unit tests use synthetic logits with known distributions; engine tests use SmolLM2, whose
greedy output is the baseline each parameter must move away from (or keep) as it should.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pdserve.workers.sampler import Sampler, filter_probs, sample_on_device
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence

EOS = 2
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def seq(params: SamplingParams, prompt=(5, 6), output=(), seed: int | None = None) -> Sequence:
    s = Sequence(request_id="s", token_ids=list(prompt) + list(output), num_prompt_tokens=len(prompt),
                 params=params, arrival=0.0)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def rows(*r) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float32)


def draw_counts(params: SamplingParams, logits: torch.Tensor, n: int = 2000) -> torch.Tensor:
    sampler, s = Sampler((EOS,)), seq(params, seed=0)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        counts[sampler(logits[None], [s]).token_ids[0]] += 1
    return counts / n


# -- filter_probs ------------------------------------------------------------------------------------
def test_filter_probs_temperature_sharpens_and_flattens():
    logits = PROBS.log()
    assert torch.allclose(filter_probs(logits, 1.0, None, 1.0, 0.0), PROBS)
    cold, hot = filter_probs(logits, 0.5, None, 1.0, 0.0), filter_probs(logits, 2.0, None, 1.0, 0.0)
    assert cold[0] > PROBS[0] > hot[0] and cold[3] < PROBS[3] < hot[3]
    assert filter_probs(logits, 1e-3, None, 1.0, 0.0)[0] > 1 - 1e-6  # T -> 0: greedy


def test_filter_probs_top_k_top_p_min_p_keep_the_right_tokens():
    logits = PROBS.log()
    k2 = filter_probs(logits, 1.0, 2, 1.0, 0.0)
    assert torch.allclose(k2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p keeps the smallest head whose mass reaches p: 0.5 < 0.7 <= 0.8.
    assert torch.allclose(filter_probs(logits, 1.0, None, 0.7, 0.0),
                          torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(filter_probs(logits, 1.0, None, 0.5, 0.0), torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(filter_probs(logits, 1.0, None, 1e-9, 0.0), torch.tensor([1.0, 0, 0, 0]))
    # min_p drops tokens below min_p * max prob: 0.2 * 0.5 = 0.1 removes only the 0.05 token.
    assert torch.allclose(filter_probs(logits, 1.0, None, 1.0, 0.2), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert torch.allclose(filter_probs(logits, 1.0, None, 1.0, 1.0), torch.tensor([1.0, 0, 0, 0]))
    combo = filter_probs(logits, 1.0, 3, 0.9, 0.35)  # k: 3 left, p: 3 left, min_p: 0.175 cut
    assert torch.allclose(combo, torch.tensor([0.625, 0.375, 0.0, 0.0]))


# -- Sampler on synthetic logits ---------------------------------------------------------------------
def test_sampler_draws_follow_the_filtered_distribution():
    logits = PROBS.log()
    freq = draw_counts(SamplingParams(temperature=1.0), logits)
    assert torch.allclose(freq, PROBS, atol=0.04), freq
    freq = draw_counts(SamplingParams(temperature=1.0, top_k=2), logits)
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.04, freq
    assert draw_counts(SamplingParams(temperature=1.0, min_p=0.2), logits)[3] == 0
    assert draw_counts(SamplingParams(temperature=1.0, top_p=0.01), logits, 300)[0] == 1


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2),
    SamplingParams(temperature=1.3, top_p=0.7), SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=3, top_p=0.9, min_p=0.05)])
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_device_sampler_draws_follow_the_filtered_distribution(params, device):
    """The vectorized exponential race draws from exactly what the host sampler draws from,
    row by row, while greedy rows in the same batch keep their argmax."""
    logits = torch.log(PROBS) + 0.3
    n = 20000
    greedy = seq(SamplingParams(temperature=0.0))
    batch = [greedy] + [seq(params)] * n + [greedy]
    gen = torch.Generator(device=device).manual_seed(1)
    toks = sample_on_device(logits.expand(n + 2, -1).to(device).contiguous(), batch, gen).cpu()
    assert toks[0] == toks[-1] == 0
    freq = torch.bincount(toks[1:-1], minlength=4).float() / n
    want = filter_probs(logits, params.temperature, params.top_k_or_none, params.top_p, params.min_p)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
    assert (freq[want == 0] == 0).all()  # filtered tokens are never drawn


def test_top_k_1_and_tiny_temperature_equal_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g) * 3
    sampler = Sampler((EOS,))
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1e-4),
                   SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_p=1e-6)):
        seqs = [seq(params, seed=i) for i in range(64)]
        assert sampler(logits, seqs).token_ids == greedy, params


def test_seed_reproduces_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    params = SamplingParams(temperature=1.5, seed=42)
    alone_seq = seq(params, seed=42)
    alone = [Sampler((EOS,), seed=0)(logits[0:1], [alone_seq]).token_ids[0] for _ in range(20)]
    target = seq(params, seed=42)
    others = [seq(SamplingParams(temperature=1.0)), seq(SamplingParams(temperature=0.7), seed=7),
              seq(SamplingParams(temperature=0.0)), seq(SamplingParams(temperature=1.0, top_k=5))]
    sampler = Sampler((EOS,), seed=999)
    batched = []
    for i in range(20):
        batch = others[: i % 5] + [target] + others[i % 5:]
        lg = torch.cat([logits[1:1 + (i % 5)], logits[0:1], logits[1 + (i % 5):]])
        batched.append(sampler(lg, batch).token_ids[i % 5])
    assert batched == alone
    assert len(set(alone)) > 5  # it really sampled
    other_seed = seq(params, seed=43)
    assert [Sampler((EOS,))(logits[0:1], [other_seed]).token_ids[0] for _ in range(20)] != alone


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = rows([4.0, 3.0, -1.0, -1.5])
    sampler = Sampler((EOS,))
    # token 0 and 2 were seen (prompt): 4 -> 2 loses to 3; -1 -> -2 loses to -1.5.
    s = seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(0, 2))
    assert sampler(logits.clone(), [s]).token_ids == [1]
    masked = logits.clone()
    masked[0, :2] = -10
    assert sampler(masked, [s]).token_ids == [3]
    assert sampler(logits.clone(), [seq(SamplingParams(temperature=0.0), prompt=(0, 2))]).token_ids == [0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = rows([5.0, 4.5, 4.2, 0.0])
    sampler = Sampler((EOS,))
    # token 0 appears once in the prompt only: no effect.
    assert sampler(logits.clone(), [seq(SamplingParams(temperature=0.0, presence_penalty=2.0),
                                        prompt=(0,))]).token_ids == [0]
    pres = seq(SamplingParams(temperature=0.0, presence_penalty=0.6), prompt=(3,), output=(0, 0, 0))
    assert sampler(logits.clone(), [pres]).token_ids == [1]  # 5 - 0.6 < 4.5
    # frequency scales with the count: 0 (x3) drops to 4.1, 1 (x2) to 3.9, so 2 wins; once is not enough.
    freq3 = seq(SamplingParams(temperature=0.0, frequency_penalty=0.3), prompt=(3,), output=(0, 0, 0, 1, 1))
    assert sampler(logits.clone(), [freq3]).token_ids == [2]
    freq1 = seq(SamplingParams(temperature=0.0, frequency_penalty=0.3), prompt=(3,), output=(0,))
    assert sampler(logits.clone(), [freq1]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = rows([0.0, 1.0, 9.0, 8.0, 2.0])  # EOS (2) then stop token 3 are the favourites
    sampler = Sampler((EOS,))
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sampler(logits.clone(), [seq(p, output=(1,))]).token_ids == [4]
    assert sampler(logits.clone(), [seq(p, output=(1, 1))]).token_ids == [2]
    ign = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits.clone(), [seq(ign)]).token_ids == [2]  # EOS is not a stop: allowed


def test_logprobs_are_the_raw_log_softmax_of_chosen_and_top_n():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g)
    lsm = torch.log_softmax(logits, -1)
    seqs = [seq(SamplingParams(temperature=0.0, logprobs=0)),
            seq(SamplingParams(temperature=1.0, logprobs=4, repetition_penalty=1.8), seed=5),
            seq(SamplingParams(temperature=0.0))]
    res = Sampler((EOS,))(logits, seqs)
    lp0, lp1, lp2 = res.logprobs
    assert lp2 is None
    assert lp0.token_id == res.token_ids[0] == int(logits[0].argmax()) and lp0.top == ()
    assert math.isclose(lp0.logprob, float(lsm[0, lp0.token_id]), abs_tol=1e-6)
    # Penalties shape the choice, not the reported distribution.
    assert math.isclose(lp1.logprob, float(lsm[1, res.token_ids[1]]), abs_tol=1e-6)
    top_ids = lsm[1].topk(4).indices.tolist()
    assert [t for t, _ in lp1.top] == top_ids
    assert all(math.isclose(v, float(lsm[1, t]), abs_tol=1e-6) for t, v in lp1.top)


# -- end to end through the engine --------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(smol_engine):
    return smol_engine()


@pytest.fixture(scope="module")
def prompts(engine) -> dict[str, list[int]]:
    chat = engine.apply_chat_template
    return {
        "capital": chat([{"role": "user", "content": "What is the capital of France? "
                                                     "Answer in one short sentence."}]),
        "yes": chat([{"role": "user", "content": "Answer with one word: is the sky blue?"}]),
        "story": engine.tokenizer.encode("Write a long story about a dragon who learns to bake bread."),
        "repeat": engine.tokenizer.encode("Emoji list: 😀 😃 😄 😁 😆 😅 😂"),
    }


def gen(engine, run_engine, ids: list[int], **params):
    """Run one request (params may set max_tokens etc.); returns (token ids, text, chunks)."""
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    engine.add_request("req", prompt_token_ids=ids, params=SamplingParams(**params))
    chunks = run_engine(engine)["req"]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks


def test_engine_top_k_1_top_p_tiny_and_cold_temperature_equal_greedy(engine, run_engine, prompts):
    ids = prompts["story"]
    greedy, _, _ = gen(engine, run_engine, ids)
    assert gen(engine, run_engine, ids, temperature=1.0, top_k=1, seed=1)[0] == greedy
    assert gen(engine, run_engine, ids, temperature=1.0, top_p=1e-6, seed=2)[0] == greedy
    assert gen(engine, run_engine, ids, temperature=1e-4, seed=3)[0] == greedy
    hot = gen(engine, run_engine, ids, temperature=1.5, seed=4)[0]
    assert hot != greedy


def test_engine_seed_reproduces_regardless_of_batch(engine, run_engine, prompts):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234)
    engine.add_request("seeded", prompt_token_ids=prompts["story"], params=sp)
    alone = [t for c in run_engine(engine)["seeded"] for t in c.token_ids]
    engine.add_request("n1", prompt_token_ids=prompts["capital"],
                       params=SamplingParams(temperature=1.0, max_tokens=20))
    engine.add_request("n2", prompt_token_ids=prompts["repeat"],
                       params=SamplingParams(temperature=0.8, max_tokens=5, seed=9))
    engine.step()
    engine.add_request("seeded", prompt_token_ids=prompts["story"], params=sp)
    engine.add_request("n3", prompt_token_ids=prompts["yes"], params=SamplingParams(temperature=0.0))
    out = run_engine(engine)
    assert [t for c in out["seeded"] for t in c.token_ids] == alone
    other = gen(engine, run_engine, prompts["story"], temperature=1.0, top_p=0.95, seed=4321)[0]
    assert other != alone


def test_engine_penalties_reduce_repeats(engine, run_engine, prompts):
    ids = prompts["repeat"]

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    base = repeats(gen(engine, run_engine, ids, max_tokens=20)[0])
    assert base >= 10  # greedy loops on the same emoji
    for kw in ({"repetition_penalty": 1.5}, {"frequency_penalty": 1.0}, {"presence_penalty": 1.5}):
        assert repeats(gen(engine, run_engine, ids, max_tokens=20, **kw)[0]) < base, kw
    assert repeats(gen(engine, run_engine, ids, max_tokens=20, frequency_penalty=-1.0)[0]) >= base


def test_stop_string_ends_output_without_emitting_it(engine, run_engine, prompts):
    ids = prompts["capital"]
    greedy_ids, greedy_text, _ = gen(engine, run_engine, ids, max_tokens=24)
    assert greedy_text == "The capital of France is Paris."
    for stop in (" of France", "Fr", "."):
        tokens, text, chunks = gen(engine, run_engine, ids, max_tokens=24, stop=[stop, "zzz"])
        cut = greedy_text.index(stop)
        assert text == greedy_text[:cut], stop
        assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop
        assert tokens == greedy_ids[:len(tokens)] and len(tokens) < len(greedy_ids)
        emitted = ""
        for c in chunks:  # no prefix of the stop string ever leaks into the stream early
            emitted += c.text
            assert stop not in emitted
            assert greedy_text.startswith(emitted)
    _, text, chunks = gen(engine, run_engine, ids, max_tokens=24, stop=[" of France"],
                          include_stop_str_in_output=True)
    assert text == "The capital of France"


def test_stop_token_ids_and_max_tokens_and_eos(engine, run_engine, prompts):
    ids = prompts["capital"]
    greedy, _, chunks = gen(engine, run_engine, ids, max_tokens=24)
    assert greedy[-1] == 2 and chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason is None
    tokens, _, chunks = gen(engine, run_engine, ids, max_tokens=24, stop_token_ids=[greedy[3]])
    assert tokens == greedy[:4]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", greedy[3])
    tokens, _, chunks = gen(engine, run_engine, ids, max_tokens=3)
    assert tokens == greedy[:3] and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 3


def test_min_tokens_suppresses_eos_and_ignore_eos_runs_past_it(engine, run_engine, prompts):
    ids = prompts["yes"]
    greedy = gen(engine, run_engine, ids, max_tokens=24)[0]
    k = len(greedy)
    assert greedy[-1] == 2 and k < 16
    tokens, _, chunks = gen(engine, run_engine, ids, max_tokens=24, min_tokens=k + 2)
    assert tokens[:k - 1] == greedy[:-1] and 2 not in tokens[:k + 2]
    assert len(tokens) >= k + 2
    tokens, _, chunks = gen(engine, run_engine, ids, max_tokens=k + 3, ignore_eos=True)
    assert tokens[:k] == greedy and len(tokens) == k + 3
    assert chunks[-1].finish_reason == "length"


@pytest.fixture(scope="module")
def hf_smol(smollm2_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def test_engine_logprobs_equal_hf_log_softmax(engine, run_engine, prompts, hf_smol):
    ids = prompts["capital"]
    tokens, _, chunks = gen(engine, run_engine, ids, max_tokens=6, logprobs=3)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == tokens
    with torch.no_grad():
        ref = torch.log_softmax(hf_smol(torch.tensor([ids + tokens])).logits[0].float(), -1)
    for i, lp in enumerate(lps):
        row = ref[len(ids) - 1 + i]
        assert math.isclose(lp.logprob, float(row[lp.token_id]), abs_tol=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top one
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        for t, v in lp.top:
            assert math.isclose(v, float(row[t]), abs_tol=1e-4)
    # Sampled tokens get the logprob of what was drawn, and none when not asked for.
    _, _, chunks = gen(engine, run_engine, ids, max_tokens=4, temperature=1.0, seed=0, logprobs=0)
    assert all(len(c.logprobs) == 1 and c.logprobs[0].top == () for c in chunks)
    _, _, chunks = gen(engine, run_engine, ids, max_tokens=4)
    assert all(c.logprobs == () for c in chunks)
