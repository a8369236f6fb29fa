"""Tests of pdserve.workers.sampling_params: normalization and field-naming validation."""

from __future__ import annotations

import math

import pytest

from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.sampling_params import SamplingParams

BAD = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"stop": ["ok", ""]}, "stop[1]"),
    ({"stop": [3]}, "stop[0]"),
    ({"stop_token_ids": [5, -1]}, "stop_token_ids[1]"),
    ({"stop_token_ids": [100]}, "stop_token_ids[0]"),  # vocabulary of 100 below
    ({"stop_token_ids": ["7"]}, "stop_token_ids[0]"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD, ids=[f"{f}={list(k.values())}" for k, f in BAD])
def test_each_bad_value_names_its_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs).validate(vocab_size=100)
    assert e.value.field == f"sampling_params.{field}"
    assert str(e.value).startswith(f"sampling_params.{field}: ")
    assert isinstance(e.value, ValueError)  # callers that only know ValueError still catch it


@pytest.mark.parametrize("kwargs", [
    {}, {"temperature": 0.0}, {"top_k": -1}, {"top_k": None}, {"top_k": 1}, {"top_p": 1.0},
    {"top_p": 1e-9}, {"min_p": 1.0}, {"seed": 0}, {"seed": 2**63 - 1}, {"logprobs": 0},
    {"logprobs": 20}, {"min_tokens": 16}, {"presence_penalty": -2.0}, {"stop": "x"},
    {"stop_token_ids": [99]}, {"max_tokens": 1},
])
def test_good_values_pass(kwargs):
    SamplingParams(**kwargs).validate(vocab_size=100)


def test_stop_lists_become_hashable_tuples():
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(p) == hash(SamplingParams(stop=("END",), stop_token_ids=(3, 4)))
    assert p == SamplingParams(stop=("END",), stop_token_ids=(3, 4), extra={"ignored": 1})


def test_greedy_and_top_k_helpers():
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
    assert SamplingParams(top_k=-1).top_k_or_none is None
    assert SamplingParams(top_k=None).top_k_or_none is None
    assert SamplingParams(top_k=7).top_k_or_none == 7
