"""The worker's --device bounds what an Init may ask for (twinkle_worker.validation.bounded_device)."""

from __future__ import annotations

import pytest

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument
from twinkle_worker.validation import bounded_device


@pytest.mark.parametrize(
    ("worker", "requested", "used"),
    [
        ("cpu", "", "cpu"),
        ("cpu", "cpu", "cpu"),
        ("cuda:1", "", "cuda:1"),
        ("cuda:1", "cuda", "cuda:1"),  # no index: the worker's own GPU, not cuda:0
        ("cuda:1", "cuda:1", "cuda:1"),
        ("cuda", "cuda:0", "cuda:0"),
        ("cuda", "cuda:3", "cuda:3"),
        ("cuda", "", "cuda"),
    ],
)
def test_a_device_within_the_flag_is_used(worker: str, requested: str, used: str) -> None:
    assert bounded_device(worker, requested) == used


@pytest.mark.parametrize(
    ("worker", "requested"),
    [("cpu", "cuda"), ("cpu", "cuda:0"), ("cuda:1", "cuda:0"), ("cuda:0", "cpu"), ("cuda", "cpu")],
)
def test_a_device_outside_the_flag_is_refused_naming_the_flag(worker: str, requested: str) -> None:
    with pytest.raises(FailedPrecondition, match=f"device '{requested}'.*--device {worker}"):
        bounded_device(worker, requested)


@pytest.mark.parametrize("requested", ["tpu", "gpu:0", "mps"])
def test_an_unknown_device_is_invalid(requested: str) -> None:
    with pytest.raises(InvalidArgument, match="device"):
        bounded_device("cpu", requested)
