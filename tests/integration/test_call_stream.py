"""The call stream (WorkerService.Calls): unary calls as messages on one stream, each answered as its unary
call would be. A real worker process (the pooled one), the real client, and raw gRPC on the same channel.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
from plain_reference import counting_samples

from twinkle_client.call_stream import CallError, CallStream, Deadlines
from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import NotFound
from twinkle_protocol.metadata import pairs_of
from twinkle_worker.server import WorkerServer

SERVICE = "/twinkle.worker.v1.WorkerService/"


def _steps(model: Any, count: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        forward, step = model.forward_backward_and_step(counting_samples(rng, 4, 12), max_grad_norm=1.0)
        out.append((forward["loss"], step["grad_norm"]))
    return out


def _raw_stream(model: Any) -> tuple[Any, Any]:
    """A Calls stream of our own on the client's channel to rank 0: (send, answers)."""
    import queue

    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    coordinator = model.coordinator
    calls = coordinator.channels[0].stream_stream(
        SERVICE + "Calls",
        request_serializer=worker_pb2.CallsRequest.SerializeToString,
        response_deserializer=worker_pb2.CallsResponse.FromString,
    )
    answers = calls(iter(outbox.get, None), metadata=coordinator.metadata, timeout=60)
    return outbox, answers


def _status(answer: worker_pb2.CallsResponse) -> Any:
    """The ErrorInfo of an answer, read the way the client reads a failed unary call's."""
    trailing = pairs_of(answer.trailing_metadata)
    return errors.error_info(CallError(errors.status_code(answer.code), answer.details, trailing))


def test_training_on_the_stream_equals_training_with_unary_calls(remote: Any) -> None:
    streamed = remote()
    streamed.set_optimizer("AdamW", lr=1e-3)
    on_stream = _steps(streamed, 3)
    (stream,) = streamed.coordinator.call_streams
    assert stream is not None and stream.sent == 3  # the fused steps went on the stream
    timing = streamed.last_step_timing()  # the worker's timing came back in the answers' trailing metadata
    assert timing is not None and timing.compute_seconds > 0 and timing.queue_seconds >= 0
    streamed.close()

    unary = remote(call_stream=False)
    unary.set_optimizer("AdamW", lr=1e-3)
    assert _steps(unary, 3) == on_stream  # bit for bit
    assert unary.coordinator.call_streams == [None]


def test_a_refusal_on_the_stream_is_the_unary_refusal(remote: Any) -> None:
    model = remote()
    model.set_optimizer("AdamW", lr=1e-3)
    batch = counting_samples(np.random.default_rng(0), 2, 8)
    seen = []
    for streamed in (True, False):
        model.coordinator.use_call_stream(streamed)
        with pytest.raises(NotFound) as caught:
            model.forward_backward(inputs=batch, adapter_name="nope")
        seen.append((type(caught.value), str(caught.value), caught.value.reason, dict(caught.value.metadata)))
    assert seen[0] == seen[1]
    assert seen[0][2] == "UNKNOWN_ADAPTER" and seen[0][3]["rank"] == "0"
    (stream,) = model.coordinator.call_streams
    assert stream is not None and stream.sent == 1
    model.coordinator.use_call_stream(True)
    assert model.forward_backward(inputs=batch)["loss"] > 0  # the worker and the stream serve on


def test_bad_messages_get_their_own_status_and_the_stream_serves_on(remote: Any) -> None:
    model = remote()
    outbox, answers = _raw_stream(model)
    outbox.put(worker_pb2.CallsRequest(id=1, method=SERVICE + "Nope"))
    outbox.put(worker_pb2.CallsRequest(id=2, method=SERVICE + "ForwardBackwardStream"))  # not a unary call
    outbox.put(worker_pb2.CallsRequest(id=3, method=SERVICE + "ForwardBackward", request=b"\xff\xff\xff"))
    outbox.put(
        worker_pb2.CallsRequest(
            id=4, method=SERVICE + "GetStatus", request=worker_pb2.GetStatusRequest().SerializeToString()
        )
    )
    got = [next(answers) for _ in range(4)]
    outbox.put(None)
    assert [answer.id for answer in got] == [1, 2, 3, 4]  # in order
    for answer in got[:2]:
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
        assert "is not a unary method" in answer.details and answer.details.startswith("rank 0")
        info = _status(answer)
        assert info is not None and (info.reason, info.metadata["field"], info.metadata["rank"]) == (
            "INVALID_FIELD",
            "method",
            "0",
        )
    assert got[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # the gate's check of the request bytes
    assert _status(got[2]).reason == "UNDECODABLE_REQUEST"
    assert got[3].code == 0 and worker_pb2.GetStatusResponse.FromString(got[3].response).pid > 0
    assert not got[3].details


def test_a_call_waiting_for_its_turn_gives_up_before_its_timeout(remote: Any) -> None:
    model = remote()
    outbox, answers = _raw_stream(model)
    # a number far ahead of the session's sequence: the worker waits for the missing calls, but only
    # until just before the caller's deadline (the message's timeout_seconds), not its 30 s
    ahead = worker_pb2.ZeroGradRequest(
        context=worker_pb2.CallContext(sequence_number=2000, session_id=model.coordinator.session_id)
    )
    start = time.monotonic()
    outbox.put(
        worker_pb2.CallsRequest(
            id=9, method=SERVICE + "ZeroGrad", request=ahead.SerializeToString(), timeout_seconds=1.0
        )
    )
    answer = next(answers)
    waited = time.monotonic() - start
    outbox.put(None)
    assert answer.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and _status(answer).reason == "SEQUENCE_GAP"
    assert 0.5 < waited < 5.0, waited


def test_the_client_times_out_a_call_whose_answer_is_late(remote: Any) -> None:
    model = remote()
    coordinator = model.coordinator
    deadlines = Deadlines()
    stream = CallStream(coordinator.channels[0], coordinator.metadata, 0, deadlines)
    outcomes: dict[str, Any] = {}
    done = threading.Event()

    def keep(name: str) -> Any:
        def answered(value: Any, error: Any, trailing: Any) -> None:
            outcomes[name] = (time.monotonic(), error.code() if error is not None else None)
            if len(outcomes) == 2:
                done.set()

        return answered

    def ahead(number: int) -> worker_pb2.ZeroGradRequest:
        return worker_pb2.ZeroGradRequest(
            context=worker_pb2.CallContext(sequence_number=number, session_id=coordinator.session_id)
        )

    start = time.monotonic()
    stream.send("ZeroGrad", ahead(2000), 2.0, keep("first"))  # waits ~1.75 s for its turn, then SEQUENCE_GAP
    stream.send("ZeroGrad", ahead(2001), 0.3, keep("second"))  # queued behind it on the stream: late
    assert done.wait(30)
    stream.close()
    deadlines.close()
    second_at, second = outcomes["second"]
    first_at, first = outcomes["first"]
    assert second == grpc.StatusCode.DEADLINE_EXCEEDED and second_at - start < 1.5  # the watchdog, not the answer
    assert first == grpc.StatusCode.FAILED_PRECONDITION and first_at > second_at


def test_a_worker_without_the_call_stream_gets_unary_calls(tmp_path: Any, config: Any) -> None:
    """An older worker answers Calls UNIMPLEMENTED: the client sends that call, and the next ones, as unary calls."""
    from twinkle_client.model import TransformersModel
    from twinkle_worker.options import WorkerOptions

    server = WorkerServer(WorkerOptions(output_root=str(tmp_path)), 0)
    server.servicer.call_stream = None  # as a worker from before the call stream
    server.start()
    try:
        model = TransformersModel(addresses=[server.address], config=config, mixed_precision="no", seed=0)
        try:
            model.set_optimizer("AdamW", lr=1e-3)
            first = _steps(model, 2)
            (stream,) = model.coordinator.call_streams
            # the first step was sent on the stream, or found it refused already: unary either way, and from then on
            assert stream is not None and stream.unimplemented and stream.sent <= 1
            first += _steps(model, 1)
            assert model.coordinator.call_streams == [stream] and stream.sent <= 1
            with pytest.raises(NotFound, match="unknown adapter"):  # errors still come back as statuses, unary
                model.clip_grad_and_step(adapter_name="nope")
        finally:
            model.close()
        assert all(loss > 0 for loss, _ in first)
    finally:
        server.stop(grace=1.0)
