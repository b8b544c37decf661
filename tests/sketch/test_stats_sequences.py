"""StepSequences: construction from API records, validation, masks and prompt indices."""

from __future__ import annotations

import numpy as np
import pytest

from sketch.sequences import Geometry, Normalization, Role, StepSequences, group_sizes

RECORDS = [
    {"id": "a1", "prompt_id": "a", "logprob": -3.5, "advantage": 1.0, "num_tokens": 4},
    {
        "id": "b1",
        "prompt_id": "b",
        "logprob": -2.0,
        "advantage": -1.0,
        "num_tokens": 7,
        "role": "entropy",
        "logprob_after": -2.1,
    },
    {
        "id": "a2",
        "prompt_id": "a",
        "logprob": -9.0,
        "advantage": 0.5,
        "num_tokens": 2,
        "weight": 0.125,
        "role": None,
    },
]


def test_from_records_round_trip_and_defaults() -> None:
    seqs = StepSequences.from_records(RECORDS)
    assert seqs.n == 3
    assert seqs.role == [Role.UPDATE, Role.ENTROPY, Role.UPDATE]
    assert seqs.logprob.dtype == np.float64 and seqs.num_tokens.dtype == np.int64
    assert np.isnan(seqs.weight[0]) and seqs.weight[2] == 0.125
    np.testing.assert_array_equal(seqs.has_logprob_after, [False, True, False])
    np.testing.assert_array_equal(seqs.update_mask, [True, False, True])
    np.testing.assert_array_equal(seqs.entropy_mask, [False, True, False])
    back = seqs.to_records()
    assert back[0]["weight"] is None and back[0]["logprob_after"] is None
    assert back[1]["role"] == "entropy" and back[1]["logprob_after"] == -2.1
    again = StepSequences.from_records(back)
    np.testing.assert_array_equal(again.logprob, seqs.logprob)
    assert again.role == seqs.role
    assert Normalization("grpo") is Normalization.GRPO and Geometry("adam") is Geometry.ADAM


def test_prompt_index_subset_and_group_sizes() -> None:
    seqs = StepSequences.from_records(RECORDS)
    codes, prompts = seqs.prompt_index()
    assert prompts == ["a", "b"]
    np.testing.assert_array_equal(codes, [0, 1, 0])
    codes_u, prompts_u = seqs.prompt_index(seqs.update_mask)
    assert prompts_u == ["a"]
    np.testing.assert_array_equal(codes_u, [0, -1, 0])
    np.testing.assert_array_equal(group_sizes(codes_u), [2, 0, 2])
    sub = seqs.subset(np.array([False, True, True]))
    assert sub.ids == ["b1", "a2"] and sub.role == [Role.ENTROPY, Role.UPDATE]
    assert seqs.subset([2, 0]).ids == ["a2", "a1"]


@pytest.mark.parametrize(
    "change",
    [
        {"id": "a1"},  # duplicate id with the first record
        {"logprob": float("nan")},
        {"advantage": float("inf")},
        {"num_tokens": -1},
        {"role": "bogus"},
    ],
)
def test_validation(change: dict[str, object]) -> None:
    bad = [dict(RECORDS[0]), {**RECORDS[2], **change}]
    with pytest.raises(ValueError):
        StepSequences.from_records(bad)


def test_length_mismatch() -> None:
    with pytest.raises(ValueError):
        StepSequences(
            ids=["x", "y"],
            prompt_ids=["p", "p"],
            logprob=np.zeros(3),
            advantage=np.zeros(2),
            num_tokens=np.ones(2, dtype=np.int64),
        )
