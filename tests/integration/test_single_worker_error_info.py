"""Every refusal a client can provoke carries a google.rpc.ErrorInfo (AIP-193): its reason, the
domain, the rank and, where there is one, the field; the Python client decodes it into the
exception (`reason`, `rank`, `field`, `metadata`) and keeps the message. The worker serves on.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from plain_reference import counting_samples

from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_worker.session import MAX_AHEAD


def _batch(seed: int = 0) -> list[dict[str, np.ndarray]]:
    return counting_samples(np.random.default_rng(seed), 2, [6, 4])


def _refused(call) -> errors.TwinkleError:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.TwinkleError) as caught:
        call()
    assert caught.value.metadata["rank"] == "0" and caught.value.rank == 0, caught.value.metadata
    assert "rank 0" in str(caught.value)  # the message is today's
    return caught.value


def _raw(call) -> tuple[grpc.StatusCode, errors.error_details_pb2.ErrorInfo]:  # type: ignore[no-untyped-def]
    """A refused call of the bare stub: its code and the ErrorInfo in its trailer."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    info = errors.error_info(caught.value)
    assert info is not None, caught.value.trailing_metadata()
    assert info.domain == errors.DOMAIN and info.metadata["rank"] == "0"
    return caught.value.code(), info


def test_refusals_of_the_client_carry_reason_rank_and_field(remote, config) -> None:  # type: ignore[no-untyped-def]
    model = remote(config=config, seed=0)
    error = _refused(lambda: model.step())
    assert isinstance(error, errors.FailedPrecondition) and error.reason == "NO_OPTIMIZER"
    error = _refused(lambda: model.forward_backward(_batch(), adapter_name="nope"))
    assert isinstance(error, errors.NotFound) and (error.reason, error.field) == ("UNKNOWN_ADAPTER", "adapter_name")
    assert error.metadata["adapter"] == "nope"
    error = _refused(lambda: model.set_optimizer("Adamax"))
    assert isinstance(error, errors.NotFound) and error.reason == "UNKNOWN_NAME"
    model.set_optimizer("AdamW", lr=1e-3)
    error = _refused(lambda: model.clip_grad_and_step(max_grad_norm=float("nan")))
    assert isinstance(error, errors.InvalidArgument) and (error.reason, error.field) == (
        "INVALID_FIELD",
        "max_grad_norm",
    )
    error = _refused(lambda: model.load("no-such-checkpoint"))
    assert isinstance(error, errors.NotFound) and error.reason == "CHECKPOINT_NOT_FOUND"
    error = _refused(lambda: model.save(name="x", output_dir="/"))
    assert isinstance(error, errors.PermissionDenied) and error.reason == "OUTSIDE_OUTPUT_ROOT"
    error = _refused(lambda: remote(config=config, seed=0))  # a second client while the first holds the worker
    assert isinstance(error, errors.FailedPrecondition) and error.reason == "OWNED_BY_OTHER_SESSION"
    # None of that changed anything: the first micro-batch steps at once.
    assert np.isfinite(model.forward_backward(_batch(1))["loss"])
    assert model.clip_grad_and_step()["micro_step"] == 1


def test_refused_inits_carry_reason_and_field(remote, config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    error = _refused(lambda: remote(config=config, seed=0, trust_remote_code=True))
    assert isinstance(error, errors.PermissionDenied)
    assert (error.reason, error.field) == ("REMOTE_CODE_NOT_ALLOWED", "trust_remote_code")
    error = _refused(lambda: remote(model_id=str(tmp_path / "no-such-model"), seed=0))
    assert isinstance(error, errors.NotFound) and (error.reason, error.field) == ("MODEL_NOT_FOUND", "model_id")
    model = remote(config=config, seed=0)  # the worker serves on
    model.set_optimizer("AdamW", lr=1e-3)


def test_refusals_of_a_bare_stub_carry_reason_rank_and_field(one_worker, remote, config) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(one_worker.addresses[0])
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    stub.Reset(worker_pb2.ResetRequest(force=True), timeout=60)
    code, info = _raw(lambda: stub.SetOptimizer(worker_pb2.SetOptimizerRequest(optimizer="AdamW"), timeout=60))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_INITIALIZED")

    model = remote(config=config, seed=0)
    last = model.status()[0].last_sequence_number
    ahead = worker_pb2.SetOptimizerRequest(optimizer="AdamW")
    ahead.context.session_id, ahead.context.sequence_number = model.session_id, last + MAX_AHEAD + 1
    code, info = _raw(lambda: stub.SetOptimizer(ahead, timeout=60))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SEQUENCE_GAP")
    assert dict(info.metadata) == {
        "rank": "0",
        "field": "context.sequence_number",
        "expected": str(last + 1),
        "got": str(last + MAX_AHEAD + 1),
    }

    other = worker_pb2.SetOptimizerRequest(optimizer="AdamW")
    other.context.session_id, other.context.sequence_number = "another-session", 1
    code, info = _raw(lambda: stub.SetOptimizer(other, timeout=60))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OWNED_BY_OTHER_SESSION")

    bad = worker_pb2.AddAdapterRequest(adapter_name="a")
    bad.context.session_id = model.session_id
    bad.lora_config.r = 0
    code, info = _raw(lambda: stub.AddAdapter(bad, timeout=60))
    assert (code, info.reason, info.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "lora_config.r",
    )

    garbage = channel.unary_unary("/twinkle.worker.v1.WorkerService/SetOptimizer")
    code, info = _raw(lambda: garbage(b"\xff\xff\xff", timeout=60))
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")
    channel.close()
    model.set_optimizer("AdamW", lr=1e-3)  # the owner's sequence goes on
    assert np.isfinite(model.forward_backward(_batch(1))["loss"])


def test_a_refusal_that_echoes_a_huge_name_still_carries_its_error_info(remote, config) -> None:  # type: ignore[no-untyped-def]
    # Message and trailer share the 8 KiB header limit: the message is cut at 2000 characters and
    # every metadata value at errors.MAX_METADATA_CHARS, so the status still arrives whole.
    model = remote(config=config, seed=0)
    huge = "a" * 20_000
    error = _refused(lambda: model.forward_backward(_batch(), adapter_name=huge))
    assert isinstance(error, errors.NotFound) and error.reason == "UNKNOWN_ADAPTER"
    assert error.metadata["adapter"] == huge[: errors.MAX_METADATA_CHARS] and "(truncated)" in str(error)
    assert np.isfinite(model.forward_backward(_batch(1))["loss"])
