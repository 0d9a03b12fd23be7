"""Pure functions of sampling: the client's prompt rows and stop parsing, the worker's left padding,
per-row seeds and token choice, against plain numpy / torch written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinkle_client import sampling as client
from twinkle_protocol.errors import InvalidArgument
from twinkle_worker import sampling


def test_rows_are_prompt_major_with_their_indices() -> None:
    columns, prompts, samples = client.expand([np.array([1, 2, 3]), np.array([4])], 2)
    assert columns["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3], [4, 0, 0], [4, 0, 0]]
    assert columns["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert prompts.tolist() == [0, 0, 1, 1] and samples.tolist() == [0, 1, 0, 1]


def test_a_dict_of_arrays_gives_the_tokens_its_mask_marks() -> None:
    ids = np.array([[0, 0, 7, 8], [5, 6, 0, 0]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])
    rows = client.prompt_rows({"input_ids": ids, "attention_mask": mask})
    assert [row.tolist() for row in rows] == [[7, 8], [5, 6]]


def test_stop_accepts_tokens_and_sequences() -> None:
    assert client.stop_sequences(None) is None
    assert client.stop_sequences(7) == [[7]]
    assert client.stop_sequences([7, [1, 2], (3,)]) == [[7], [1, 2], [3]]
    with pytest.raises(InvalidArgument, match=r"stop\[1\]"):
        client.stop_sequences([7, []])


def test_left_pad_moves_each_row_right_and_counts_positions_from_its_first_token() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    padded, padded_mask, positions = sampling.left_pad(ids, mask)
    assert padded.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert padded_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions[padded_mask.bool()].tolist() == [0, 1, 2, 0, 0, 1]


def test_row_seeds_depend_on_the_prompt_and_sample_index_only() -> None:
    seeds = {sampling.row_seed(3, p, s) for p in range(20) for s in range(20)}
    assert len(seeds) == 400  # no two rows share a generator
    assert sampling.row_seed(3, 4, 5) == sampling.row_seed(3, 4, 5) != sampling.row_seed(4, 4, 5)


def test_pick_is_inverse_cdf_of_the_tempered_truncated_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(5, 1)
    u = torch.tensor([0.0, 0.3, 0.6, 0.99, 0.999999])
    params = sampling.SamplingParams(temperature=0.5, top_k=2)
    tokens, logps = sampling.pick(logits, params, u)
    kept = torch.softmax(logits[0, :2] / 0.5, dim=0)  # top 2, renormalised
    expected = [int(np.searchsorted(np.cumsum(kept.numpy()), float(x), side="right")) for x in u]
    assert tokens.tolist() == expected and set(expected) == {0, 1}
    full = torch.log_softmax(logits[0] / 0.5, dim=0)  # the logprob is the untruncated one
    assert torch.allclose(logps, full[tokens])
    greedy, greedy_logps = sampling.pick(logits, sampling.SamplingParams(temperature=0.0), u)
    assert greedy.tolist() == [0] * 5 and torch.allclose(greedy_logps, torch.log_softmax(logits[0], 0)[0])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"stop": ((300,),)}, "stop"),
    ],
)
def test_check_params_names_the_field(change: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument, match=field):
        sampling.check_params(sampling.SamplingParams(**change), vocab_size=256)
