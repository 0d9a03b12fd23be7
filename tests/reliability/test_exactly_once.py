"""Exactly-once calls and one client per mesh: retries return the stored outcome without running
again, gaps and stale numbers are FAILED_PRECONDITION, the client retries UNAVAILABLE and resends
calls whose outcome it never saw, and a second client cannot interleave its calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from reliability_support import (
    Proxy,
    SavePause,
    batch,
    code_of,
    connect,
    forward_request,
    stub,
    tiny_config,
)

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import FailedPrecondition

Code = grpc.StatusCode


@pytest.fixture
def owner(one_worker: LocalWorkers) -> Iterator[TransformersModel]:
    """A client owning the pooled worker, with an optimizer over the full tiny model."""
    stub(one_worker.addresses[0]).Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    model = connect(one_worker)
    model.set_optimizer("AdamW", lr=1e-2)
    yield model
    model.close()


def _next(model: TransformersModel, request: Any) -> Any:
    """request stamped with the owner's session and its next sequence number (as the coordinator would)."""
    coordinator = model.coordinator
    with coordinator._lock:
        coordinator._sequence[0] += 1
        request.context.session_id, request.context.sequence_number = coordinator.session_id, coordinator._sequence[0]
    return request


def _configs(model: TransformersModel) -> str:
    return model.get_train_configs()


def test_a_retried_call_returns_the_stored_outcome_and_does_not_run_again(
    owner: TransformersModel, one_worker: LocalWorkers
) -> None:
    worker = stub(one_worker.addresses[0])
    metadata = owner.coordinator.metadata
    forward = _next(owner, forward_request(batch(0)))
    first = worker.ForwardBackward(forward, metadata=metadata, timeout=120)
    again = worker.ForwardBackward(forward, metadata=metadata, timeout=120)
    assert first == again and first.micro_step == 1
    step = _next(owner, worker_pb2.ClipGradAndStepRequest(max_grad_norm=1.0))
    replies = [worker.ClipGradAndStep(step, metadata=metadata, timeout=120) for _ in range(3)]
    assert replies[0].applied and replies[0].optimizer_step == 1
    assert replies[1] == replies[0] == replies[2]
    assert "optimizer_step: 1" in _configs(owner) and "micro_step: 1" in _configs(owner)
    # A refused call is stored too: its retry gets the same error, and the sequence moves on.
    bad = _next(owner, worker_pb2.StepRequest(adapter_name="zzz"))
    assert code_of(lambda: worker.Step(bad, metadata=metadata, timeout=60))[0] == Code.NOT_FOUND
    assert code_of(lambda: worker.Step(bad, metadata=metadata, timeout=60))[0] == Code.NOT_FOUND
    assert owner.forward_backward(batch(1))["num_tokens"] == 16  # the client's numbering still fits


def test_gaps_and_stale_numbers_are_failed_precondition(owner: TransformersModel, one_worker: LocalWorkers) -> None:
    worker = stub(one_worker.addresses[0])
    metadata = owner.coordinator.metadata
    last = owner.status()[0].last_sequence_number
    session = owner.coordinator.session_id

    def zero_grad(number: int, timeout: float = 60) -> Any:
        request = worker_pb2.ZeroGradRequest()
        request.context.session_id, request.context.sequence_number = session, number
        return worker.ZeroGrad(request, metadata=metadata, timeout=timeout)

    code, details = code_of(lambda: zero_grad(last + 10_000))  # far ahead: at once
    assert code == Code.FAILED_PRECONDITION and "never arrived" in details
    code, details = code_of(lambda: zero_grad(last + 2, timeout=2))  # a gap: waits for the missing call, then refuses
    assert code == Code.FAILED_PRECONDITION and f"last started call {last}" in details
    for number in range(last + 1, last + 71):  # more calls than the worker keeps outcomes of
        zero_grad(number)
    code, details = code_of(lambda: zero_grad(last + 1))
    assert code == Code.FAILED_PRECONDITION and "no longer kept" in details
    assert zero_grad(last + 70) == zero_grad(last + 70)  # recent ones are still answered from the store


def test_calls_that_arrive_out_of_order_run_in_number_order(owner: TransformersModel, one_worker: LocalWorkers) -> None:
    """Pipelined calls can reach the worker's threads in any order; number n+1 waits for n."""
    worker = stub(one_worker.addresses[0])
    metadata = owner.coordinator.metadata
    forward = _next(owner, forward_request(batch(0)))
    step = _next(owner, worker_pb2.ClipGradAndStepRequest())
    late = worker.ClipGradAndStep.future(step, metadata=metadata, timeout=120)
    first = worker.ForwardBackward(forward, metadata=metadata, timeout=120)
    assert first.micro_step == 1
    assert late.result().applied  # it ran after the forward: a step before it would not have applied


def test_a_second_client_cannot_interleave_and_the_owner_keeps_going(
    owner: TransformersModel, one_worker: LocalWorkers
) -> None:
    with pytest.raises(FailedPrecondition, match=r"rank 0 .*driven by another client"):
        connect(one_worker)
    intruder = stub(one_worker.addresses[0])
    for request in (
        worker_pb2.ForwardBackwardRequest(context=worker_pb2.CallContext(session_id="intruder", sequence_number=1)),
        worker_pb2.ZeroGradRequest(),  # no session at all
        worker_pb2.ResetRequest(context=worker_pb2.CallContext(session_id="intruder")),
    ):
        rpc = type(request).__name__.removesuffix("Request")
        code, details = code_of(lambda r=request, m=rpc: getattr(intruder, m)(r, timeout=60))
        assert code == Code.FAILED_PRECONDITION and "driven by another client" in details
    export = code_of(lambda: list(intruder.ExportWeights(worker_pb2.ExportWeightsRequest(), timeout=60)))
    assert export[0] == Code.FAILED_PRECONDITION  # an export runs a collective: the owner's call only
    assert (
        intruder.GetStatus(worker_pb2.GetStatusRequest(), timeout=60).session_id == owner.session_id
    )  # reads are open
    out = owner.forward_backward(batch(0))
    assert owner.clip_grad_and_step()["optimizer_step"] == 1 and out["num_tokens"] == 16
    owner.close()  # releases the worker
    second = connect(one_worker)
    try:
        assert second.forward_only(batch(0))["num_tokens"] == 16
        # An operator can release a worker whose client is gone.
        intruder.Reset(worker_pb2.ResetRequest(force=True), timeout=60)
        with pytest.raises(FailedPrecondition, match="no model|no call sequence"):
            second.forward_only(batch(0))
    finally:
        second.close()


def test_a_silent_owner_loses_the_worker_when_its_lease_lapses(one_worker: LocalWorkers) -> None:
    """The lease is a timeout, so this test waits for it: exactly the time the worker reports."""
    stub(one_worker.addresses[0]).Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    first = connect(one_worker, lease_seconds=1.5)
    try:
        with pytest.raises(FailedPrecondition, match="driven by another client"):
            connect(one_worker)
        left = stub(one_worker.addresses[0]).GetStatus(worker_pb2.GetStatusRequest(), timeout=60).lease_seconds_left
        assert 0 < left <= 1.5
        threading.Event().wait(left + 0.2)
        second = connect(one_worker)  # takes over: the first client's model is dropped
        try:
            with pytest.raises(FailedPrecondition, match="driven by another client"):
                first.forward_only(batch(0))
            assert second.forward_only(batch(0))["num_tokens"] == 16
        finally:
            second.close()
    finally:
        first.close()


def test_calls_whose_outcome_was_lost_are_resent_and_run_exactly_once(owner: TransformersModel) -> None:
    """A deadline that passes before the call is even sent, and a call the caller cancels: the
    client resends each with its number before the next call, so each runs exactly once."""
    coordinator = owner.coordinator
    expired = coordinator.submit("ForwardBackward", [forward_request(batch(0))], timeout=1e-6)
    with pytest.raises(Exception, match="DEADLINE_EXCEEDED|Deadline"):
        coordinator.gather("ForwardBackward", expired)
    cancelled = coordinator.submit("ForwardBackward", [forward_request(batch(1))])
    cancelled[0].cancel()
    next_micro = owner.forward_backward(batch(2))
    assert next_micro["num_tokens"] == 16
    configs = _configs(owner)
    assert "micro_step: 3" in configs, configs  # each of the three forwards ran once: not 1, 2 or 4


def test_a_dropped_connection_is_retried_transparently(hooked_worker: tuple[LocalWorkers, SavePause]) -> None:
    """The connection drops while a save runs on the worker; the client retries with the same number
    once it can reconnect, the worker joins the retry to the running call, and the caller just
    gets the path. The next calls follow without a gap."""
    workers, pause = hooked_worker
    proxy = Proxy(workers.addresses[0])
    model = TransformersModel(addresses=[proxy.address], config=tiny_config(), mixed_precision="no", seed=0)
    try:
        model.set_optimizer("AdamW", lr=1e-2)
        model.forward_backward(batch(0))
        model.clip_grad_and_step()
        pause.arm()
        saved: list[Any] = []
        saver = threading.Thread(target=lambda: saved.append(model.save("through-proxy", save_optimizer=True)))
        saver.start()
        pause.wait_paused()
        proxy.cut()
        pause.release()
        saver.join(120)
        assert saved and saved[0].endswith("through-proxy")
        number = model.status()[0].last_sequence_number
        assert model.forward_backward(batch(1))["num_tokens"] == 16
        assert model.status()[0].last_sequence_number == number + 1
    finally:
        model.close()
        proxy.close()
