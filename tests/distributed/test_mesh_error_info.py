"""On a 2-rank mesh the Python client reads which rank refused a call, and why, from the status'
ErrorInfo: the refusing rank's reason and rank, not the other rank's PEER_REFUSED."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from dist_reference import SEED, make_samples, tiny_config

from twinkle_protocol import errors, tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.batch import collate
from twinkle_protocol.mesh import DeviceMesh


def test_an_unknown_adapter_on_rank_1_is_named_by_reason_and_rank(mesh_model, two_workers) -> None:  # type: ignore[no-untyped-def]
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.set_optimizer("AdamW", lr=1e-3)
    samples = make_samples(np.random.default_rng(3), [5, 7])
    requests = []
    for rank, name in enumerate(("", "nope")):  # rank 0: the full model; rank 1: no such adapter
        request = worker_pb2.ForwardBackwardRequest(adapter_name=name, gradient_accumulation_steps=1)
        tensors.map_to_proto(collate(samples[rank : rank + 1])[0], request.inputs)
        requests.append(request)
    with pytest.raises(errors.NotFound) as caught:
        model.coordinator.call("ForwardBackward", requests)
    error = caught.value
    assert (error.reason, error.rank, error.field) == ("UNKNOWN_ADAPTER", 1, "adapter_name")
    assert error.metadata["adapter"] == "nope"
    assert f"rank 1 ({two_workers.addresses[1]})" in str(error)  # the message is today's

    # Each rank's own answer: rank 1 its refusal, rank 0 that a peer refused, and which (no text read).
    outcomes = model.coordinator.submit("ForwardBackward", requests)
    failures = {}
    for rank, outcome in enumerate(outcomes):
        with pytest.raises(grpc.RpcError) as raised:
            outcome.result(timeout=120)
        failures[rank] = errors.error_info(raised.value)
        assert failures[rank] is not None and failures[rank].domain == errors.DOMAIN
    assert (failures[1].reason, failures[1].metadata["rank"]) == ("UNKNOWN_ADAPTER", "1")
    assert (failures[0].reason, failures[0].metadata["rank"], failures[0].metadata["ranks"]) == (
        "PEER_REFUSED",
        "0",
        "1",
    )
    # Nothing changed: the mesh trains on, the refused calls were not counted.
    model.forward_backward(samples)
    step = model.clip_grad_and_step(gradient_accumulation_steps=1)
    assert step["applied"] and step["micro_step"] == 1


def test_refused_export_and_train_configs_go_through_the_coordinators_error_mapping(mesh_model, two_workers) -> None:  # type: ignore[no-untyped-def]
    """export_weights (every rank) and get_train_configs (rank 0 only) raise the client's NotFound,
    naming the method, the rank and its address, with the refusing rank's ErrorInfo."""
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    for method, call in (
        ("ExportWeights", lambda: model.export_weights("nope")),
        ("GetTrainConfigs", lambda: model.get_train_configs("nope")),
    ):
        with pytest.raises(errors.NotFound) as caught:
            call()
        error = caught.value
        assert str(error).startswith(f"{method} failed on rank 0 ({two_workers.addresses[0]})"), str(error)
        assert (error.reason, error.rank, error.field) == ("UNKNOWN_ADAPTER", 0, "adapter_name")
    assert "micro_step: 0" in model.get_train_configs()  # the refusals changed nothing
