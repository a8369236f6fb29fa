"""Speculative decoding: greedy output identical to plain greedy, the sampled output
distribution is the target's (rejection sampling), and rejected KV leaves no trace."""

from __future__ import annotations

import pytest
import torch

from pdserve.workers.config import EngineConfig
from pdserve.workers.engine import LLMEngine
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.sequence import Sequence
from pdserve.workers.spec_decode import AdaptiveK, NgramProposer, verify

NUM_BLOCKS = 200


@pytest.fixture(scope="module")
def engines(smollm2_path):
    base = LLMEngine(EngineConfig(num_blocks=NUM_BLOCKS), model_path=smollm2_path)
    spec = LLMEngine(EngineConfig(num_blocks=NUM_BLOCKS, speculative_method="ngram",
                                  num_speculative_tokens=4), model_path=smollm2_path,
                     tokenizer=base.tokenizer)
    return base, spec


def _run(engine, prompts, params, tag):
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt_token_ids=p, params=params)
    while engine.has_unfinished():
        for c in engine.step():
            out.setdefault(int(c.request_id.rsplit("-", 1)[1]), []).extend(c.token_ids)
    return [out[i] for i in range(len(prompts))]


def test_ngram_proposer_finds_latest_continuation():
    prop = NgramProposer(ngram_max=3)
    assert prop.propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert prop.propose([5, 6, 7], 3) == []
    assert prop.propose([4, 8, 4, 9, 4], 1) == [9]  # the latest earlier match wins


def test_greedy_output_is_identical(engines):
    base, spec = engines
    tok = base.tokenizer
    prompts = [
        base.apply_chat_template([{"role": "user", "content":
                                   "Repeat this sentence three times: the cat sat on the mat."}]),
        tok.encode("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"),
        base.apply_chat_template([{"role": "user", "content": "Count from 1 to 20."}]),
        tok.encode("A B C D A B C D A B C"),
    ]
    params = SamplingParams(max_tokens=40, temperature=0)
    before = spec.spec.num_proposed
    assert _run(spec, prompts, params, "s") == _run(base, prompts, params, "b")
    assert spec.spec.num_proposed > before and spec.spec.num_accepted > 0
    for e in engines:
        e.check_integrity()
        assert e.block_manager.num_free_blocks == NUM_BLOCKS  # rejected KV left no block behind


def _first_token_distribution(p: torch.Tensor, draft: int, draft_probs, trials: int) -> torch.Tensor:
    """With a draft model the draft is drawn from its distribution q each time; a
    deterministic proposer always proposes ``draft`` (q is a point mass)."""
    counts = torch.zeros_like(p)
    seq = Sequence("x", [0], 1, SamplingParams(temperature=1.0), 0.0)
    seq.generator = torch.Generator().manual_seed(0)
    logits = torch.log(p).expand(2, -1)
    draws = torch.Generator().manual_seed(1)
    for _ in range(trials):
        if draft_probs is not None:
            draft = int(torch.multinomial(draft_probs[0], 1, generator=draws))
        tok = verify(seq, [draft], logits, draft_probs)[0]
        counts[tok] += 1
    return counts / trials


@pytest.mark.parametrize("with_draft_model", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_draft_model):
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(12) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(12), dim=-1)[None, :] if with_draft_model else None
    trials = 20000
    for draft in (int(p.argmax()), int(p.argmin())):
        emp = _first_token_distribution(p, draft, q, trials)
        # 5 standard errors of a binomial proportion per token: a biased verifier (e.g. always
        # accepting the draft) misses by far more than this.
        tol = 5 * torch.sqrt(p * (1 - p) / trials) + 1e-3
        assert torch.all((emp - p).abs() <= tol), (draft, emp, p)


def test_sampled_tokens_match_target_distribution_end_to_end(engines):
    """Many seeds through the engine: the token after a speculated step is distributed as
    without speculation (total variation distance within sampling noise)."""
    base, spec = engines
    prompt = base.tokenizer.encode("one two three one two three one two three one two")
    n = 160
    dists = []
    for e, tag in ((base, "db"), (spec, "ds")):
        hist: dict[int, int] = {}
        for i in range(n):
            e.add_request(f"{tag}-{i}", prompt_token_ids=prompt,
                          params=SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + i))
        toks: dict[str, list[int]] = {}
        while e.has_unfinished():
            for c in e.step():
                toks.setdefault(c.request_id, []).extend(c.token_ids)
        for t in toks.values():
            hist[t[1]] = hist.get(t[1], 0) + 1
        dists.append(hist)
    keys = set(dists[0]) | set(dists[1])
    tv = 0.5 * sum(abs(dists[0].get(k, 0) - dists[1].get(k, 0)) / n for k in keys)
    assert tv < 0.2, (tv, dists)
    assert spec.spec.num_proposed > 0
    spec.check_integrity()
    assert spec.block_manager.num_free_blocks == NUM_BLOCKS


def test_adaptive_k_follows_acceptance():
    k = AdaptiveK(k_max=6)
    for _ in range(10):
        k.update(4, 0)
    assert k.k == 1
    for _ in range(20):
        k.update(4, 4)
    assert k.k == 6


@pytest.mark.parametrize("draft_kind", ["same", "tiny"])
def test_draft_model_greedy_output_is_identical(engines, smollm2_path, tiny_model_factory, draft_kind):
    """A perfect draft (the target itself) and a poor one (a tiny random model with the
    same tokenizer) both leave greedy output unchanged; rejected KV leaves no trace."""
    base, _ = engines
    draft = smollm2_path if draft_kind == "same" else tiny_model_factory("llama")
    eng = LLMEngine(EngineConfig(num_blocks=NUM_BLOCKS, speculative_method="draft",
                                 speculative_draft_model=str(draft), num_speculative_tokens=3),
                    model_path=smollm2_path, tokenizer=base.tokenizer)
    prompts = [base.apply_chat_template([{"role": "user", "content": "Name three fruits."}]),
               base.tokenizer.encode("The capital of France is")]
    params = SamplingParams(max_tokens=24, temperature=0)
    assert _run(eng, prompts, params, f"dm{draft_kind}") == _run(base, prompts, params, "dmb")
    rate = eng.spec.acceptance_rate
    assert eng.spec.num_proposed > 0
    if draft_kind == "same":
        assert rate > 0.9
    eng.check_integrity()
    assert eng.block_manager.num_free_blocks == NUM_BLOCKS
    eng.spec.draft.gc(set())
    assert eng.spec.draft.bm.num_free_blocks == eng.spec.draft.bm.num_blocks


def test_draft_model_sampling_is_reproducible(engines, smollm2_path, tiny_model_factory):
    base, _ = engines
    eng = LLMEngine(EngineConfig(num_blocks=NUM_BLOCKS, speculative_method="draft",
                                 speculative_draft_model=str(tiny_model_factory("llama")),
                                 num_speculative_tokens=3),
                    model_path=smollm2_path, tokenizer=base.tokenizer)
    prompt = [base.tokenizer.encode("Once upon a time")]
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    assert _run(eng, prompt, params, "r1") == _run(eng, prompt, params, "r2")
