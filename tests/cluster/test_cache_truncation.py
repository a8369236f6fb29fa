"""Cache-aware truncation: among cuts that fit, keep the one whose prefix is cached."""

from __future__ import annotations

from pdserve.cluster.truncation import fit_chat, later_cuts, prefer_cached


def _encode(messages: list[dict]) -> list[int]:
    out: list[int] = []
    for m in messages:
        out += [1, len(m["role"])] + [len(w) for w in m["content"].split()] + [2]
    return out


def _chat(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "you are terse " * 4}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " * 6},
                 {"role": "assistant", "content": f"answer {i} " * 6}]
    return msgs + [{"role": "user", "content": "last question " * 3}]


def test_candidates_are_fitting_turn_boundaries_latest_last():
    msgs = _chat(6)
    fitted = fit_chat(msgs, max_model_len=100, max_tokens=10, mode="auto", encode=_encode)
    cands = later_cuts(msgs, fitted, _encode)
    assert cands[0] == fitted and len(cands) > 1
    assert all(len(c.token_ids) <= 90 for c in cands)
    drops = [c.dropped_messages for c in cands]
    assert drops == sorted(drops) and len(set(drops)) == len(drops)
    assert all(c.messages[0]["role"] == "system" and c.messages[1]["role"] == "user" for c in cands)


def test_prefers_a_cached_cut_but_not_for_less_than_a_block():
    msgs = _chat(6)
    fitted = fit_chat(msgs, max_model_len=100, max_tokens=10, mode="auto", encode=_encode)
    cands = later_cuts(msgs, fitted, _encode)
    # Only the system prompt is cached for every cut: keep the most context.
    assert prefer_cached(cands, [16] * len(cands), 16).token_ids == cands[0].token_ids
    # A later cut whose prefix is cached by at least one more block wins.
    cached = [16] * len(cands)
    cached[1] = 48
    best = prefer_cached(cands, cached, 16)
    assert best.token_ids == cands[1].token_ids and best.cached_tokens == 48
    # A gain under one block is not worth dropping context.
    cached[1] = 20
    assert prefer_cached(cands, cached, 16).token_ids == cands[0].token_ids


def test_no_truncation_means_no_candidates():
    msgs = _chat(1)
    fitted = fit_chat(msgs, max_model_len=1000, max_tokens=10, mode="auto", encode=_encode)
    assert fitted.dropped_messages == 0
    assert later_cuts(msgs, fitted, _encode) == [fitted]
