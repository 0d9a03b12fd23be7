"""The request fields annotated `(google.api.field_behavior) = REQUIRED` (AIP-203) are the ones the
worker cannot do without: a request that leaves one empty is INVALID_ARGUMENT naming that field."""

from __future__ import annotations

import grpc
import pytest
from google.api import field_behavior_pb2

from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc

REQUIRED = {
    ("AddAdapterRequest", "adapter_name"),
    ("RemoveAdapterRequest", "adapter_name"),
    ("LoadRequest", "name"),
    ("ResumeFromCheckpointRequest", "checkpoint_dir"),
    ("SampleRequest", "prompts"),
    ("RegisterRankRequest", "member"),
}


def _annotated() -> set[tuple[str, str]]:
    found = set()
    for message in worker_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
                found.add((message.name, field.name))
    return found


def test_the_required_fields_are_annotated() -> None:
    assert _annotated() == REQUIRED


@pytest.mark.parametrize(
    "rpc,request_type",
    [
        ("AddAdapter", worker_pb2.AddAdapterRequest),
        ("RemoveAdapter", worker_pb2.RemoveAdapterRequest),
        ("Load", worker_pb2.LoadRequest),
        ("ResumeFromCheckpoint", worker_pb2.ResumeFromCheckpointRequest),
        ("Sample", worker_pb2.SampleRequest),
    ],
)
def test_a_request_without_a_required_field_is_refused_naming_it(one_worker, remote, config, rpc, request_type) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    (field,) = [name for message, name in REQUIRED if message == request_type.__name__]
    request = request_type()
    request.context.session_id = model.session_id
    if rpc == "AddAdapter":
        request.lora_config.r = 2  # everything but the name
    with grpc.insecure_channel(one_worker.addresses[0]) as channel, pytest.raises(grpc.RpcError) as caught:
        getattr(worker_pb2_grpc.WorkerServiceStub(channel), rpc)(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in caught.value.details()
    info = errors.error_info(caught.value)
    assert info is not None and info.metadata["field"] == field, info
