"""Batch collation: samples or 2-D columns -> right-padded int64 columns, and the errors it raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinkle_protocol.batch import collate, take_rows
from twinkle_protocol.errors import InvalidArgument


def test_list_of_samples_is_right_padded_with_each_keys_pad_value() -> None:
    samples = [
        {"input_ids": [5, 6, 7], "labels": [6, 7, -100], "position_ids": [0, 1, 2]},
        {"input_ids": np.array([9]), "labels": np.array([3]), "position_ids": np.array([0])},
        {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([2, 4]), "position_ids": torch.tensor([0, 1])},
    ]
    columns, lengths = collate(samples)
    assert lengths == [3, 1, 2]
    np.testing.assert_array_equal(columns["input_ids"], [[5, 6, 7], [9, 0, 0], [1, 2, 0]])
    np.testing.assert_array_equal(columns["labels"], [[6, 7, -100], [3, -100, -100], [2, 4, -100]])
    np.testing.assert_array_equal(columns["position_ids"], [[0, 1, 2], [0, 0, 0], [0, 1, 0]])
    # no attention_mask given: ones over each sample's length
    np.testing.assert_array_equal(columns["attention_mask"], [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert all(column.dtype == np.int64 for column in columns.values())


def test_a_given_attention_mask_is_padded_with_zeros() -> None:
    columns, _ = collate([{"input_ids": [1, 2], "attention_mask": [1, 1]}, {"input_ids": [3], "attention_mask": [1]}])
    np.testing.assert_array_equal(columns["attention_mask"], [[1, 1], [1, 0]])


def test_per_sample_extras_stack_for_losses() -> None:
    samples = [
        {"input_ids": [1, 2, 3], "advantages": 0.5, "old_logps": [-1.0, -2.0, -3.0]},
        {"input_ids": [4], "advantages": -1.0, "old_logps": [-0.5]},
    ]
    columns, _ = collate(samples)
    np.testing.assert_array_equal(columns["advantages"], np.array([0.5, -1.0], dtype=np.float32))
    np.testing.assert_array_equal(columns["old_logps"], np.array([[-1, -2, -3], [-0.5, 0, 0]], dtype=np.float32))


def test_dict_of_2d_columns() -> None:
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int32)
    columns, lengths = collate({"input_ids": ids, "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])})
    assert lengths == [3, 2]
    assert columns["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(columns["input_ids"], ids)
    columns, lengths = collate({"input_ids": torch.tensor([[7, 8]])})
    np.testing.assert_array_equal(columns["attention_mask"], [[1, 1]])
    assert lengths == [2]


@pytest.mark.parametrize(
    "inputs,message",
    [
        ([], "empty"),
        ("abc", "list of samples or a dict"),
        (7, "list of samples or a dict"),
        ([{"labels": [1]}], "input_ids"),
        ([[1, 2, 3]], "input_ids"),
        ([{"input_ids": []}], "non-empty 1-D"),
        ([{"input_ids": [[1, 2]]}], "non-empty 1-D"),
        ([{"input_ids": [1, 2], "labels": [1]}], r"labels has shape \(1,\)"),
        ([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3]}], "lacks 'labels'"),
        ([{"input_ids": [1.5, 2.0]}], "integers"),
        ([{"input_ids": [1], "advantages": [[1.0]]}], "scalar or a 1-D"),
        ([{"input_ids": [1, 2], "logprobs": [-0.5]}], r"logprobs has 1 values; input_ids has 2"),
        ([{"input_ids": [1], "weights": [1.0, 2.0]}], r"weights has 2 values; input_ids has 1"),
        ([{"input_ids": [1], "mask": [1]}, {"input_ids": [2]}], "every sample needs it"),
        ({"labels": np.zeros((1, 2), dtype=int)}, "input_ids"),
        ({"input_ids": np.array([1, 2])}, "2-D"),
        ({"input_ids": np.zeros((0, 3), dtype=int)}, "2-D"),
        ({"input_ids": np.zeros((2, 3), dtype=int), "labels": np.zeros((2, 4), dtype=int)}, "labels has shape"),
        ({"input_ids": np.zeros((2, 3), dtype=int), "advantages": np.zeros(3)}, "2 rows"),
        ({"input_ids": np.zeros((1, 3), dtype=np.float32)}, "integers"),
    ],
)
def test_bad_inputs_are_invalid_argument(inputs, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=message):
        collate(inputs)


def test_take_rows_trims_to_the_longest_sample_of_the_slice() -> None:
    columns, _ = collate([{"input_ids": [1]}, {"input_ids": [2, 3]}, {"input_ids": [4, 5, 6, 7]}])
    rows = take_rows(columns, 0, 2)
    np.testing.assert_array_equal(rows["input_ids"], [[1, 0], [2, 3]])
    np.testing.assert_array_equal(rows["attention_mask"], [[1, 0], [1, 1]])
    assert take_rows(columns, 2, 3)["input_ids"].shape == (1, 4)
