"""Errors on a mesh of two workers: refused before dispatch, refused at Init, and one rank's error named.

After each refusal the mesh must still be intact: the same model trains on, with nothing
counted from the refused call.
"""

from __future__ import annotations

import numpy as np
import pytest
from dist_reference import SEED, make_samples, tiny_config

from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.batch import collate
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument
from twinkle_protocol.mesh import DeviceMesh


def _sequence_numbers(model) -> list[int]:  # type: ignore[no-untyped-def]
    return [status.last_sequence_number for status in model.status()]


def test_batch_smaller_than_the_data_world_is_refused_before_dispatch(mesh_model) -> None:  # type: ignore[no-untyped-def]
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.set_optimizer("AdamW", lr=1e-3)
    before = _sequence_numbers(model)
    one = make_samples(np.random.default_rng(0), [6])
    with pytest.raises(InvalidArgument, match="smaller than the data world size 2"):
        model.forward_backward(one)
    with pytest.raises(InvalidArgument, match="smaller than the data world size 2"):
        model.forward_only(one)
    assert _sequence_numbers(model) == before  # no worker received a call
    model.forward_backward(make_samples(np.random.default_rng(0), [6, 4]))
    step = model.clip_grad_and_step(gradient_accumulation_steps=1)
    assert step["applied"] and step["micro_step"] == 1  # the refused batches were never counted


def test_tensor_parallel_mesh_is_refused_at_init(two_workers, mesh_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FailedPrecondition) as caught:
        mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=1, tp_size=2), seed=SEED)
    message = str(caught.value)
    assert "tp" in message and "not served" in message and "dp and fsdp" in message, message
    assert two_workers.addresses[0] in message  # names a rank and its address
    # Nothing was left behind: the same workers Init with a data-parallel mesh at once.
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    assert "DDP" in model.strategy_description


def test_an_error_on_one_rank_names_that_rank_and_its_address(mesh_model, two_workers) -> None:  # type: ignore[no-untyped-def]
    # A client in another language could send each rank a slice of its own: here rank 1's slice
    # holds an out-of-vocabulary label, rank 0's is fine. Rank 1 refuses it; rank 0 learns that
    # before any collective, and the error the caller sees is rank 1's, with its address.
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.set_optimizer("AdamW", lr=1e-3)
    rng = np.random.default_rng(3)
    good, bad = make_samples(rng, [5, 7]), make_samples(rng, [4])
    bad[0]["labels"][2] = 10_000
    requests = []
    for samples in (good, bad):
        request = worker_pb2.ForwardBackwardRequest(gradient_accumulation_steps=1)
        tensors.map_to_proto(collate(samples)[0], request.inputs)
        requests.append(request)
    with pytest.raises(InvalidArgument) as caught:
        model.coordinator.call("ForwardBackward", requests)
    message = str(caught.value)
    assert f"rank 1 ({two_workers.addresses[1]})" in message, message
    assert "10000" in message, message
    # Both ranks refused before any collective: the mesh trains on, and nothing was counted.
    model.forward_backward(good)
    step = model.clip_grad_and_step(gradient_accumulation_steps=1)
    assert step["applied"] and step["micro_step"] == 1
