"""The client's end of the call stream (WorkerService.Calls, twinkle_worker.call_stream).

One long-lived stream per rank carries the coordinator's per-step calls (STREAMED) as messages,
at about half a unary call's cost in Python gRPC. Each call keeps what it has as a unary call: its
sequence number, its timeout (enforced here: one watchdog thread for all streams), its status,
message and trailing metadata (the worker's timing, the ErrorInfo), which come back in its answer
and reach the caller as the same grpc.RpcError a unary call would raise. When a stream ends (the
worker stopped or restarted), its calls still waiting fail UNAVAILABLE, as unary calls would, and
the next call opens a new stream; a worker without Calls (an older one) gets unary calls from then on.

Used by twinkle_client.coordinator.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import status_code
from twinkle_protocol.metadata import pairs_of

_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]
# The calls a training loop makes every step: small, sequenced, run in order on the model thread.
STREAMED = frozenset(
    {"ForwardBackward", "ForwardOnly", "ClipGradNorm", "Step", "ZeroGrad", "LrStep", "ClipGradAndStep", "Sample"}
)
RESPONSES: dict[str, Any] = {
    name: getattr(worker_pb2, _SERVICE.methods_by_name[name].output_type.name) for name in STREAMED
}
METHODS = {name: f"/{_SERVICE.full_name}/{name}" for name in STREAMED}
# Deadlines kept before the answered ones are dropped from the watchdog's heap.
MAX_DEADLINES = 4096

Answered = Callable[[Any, "grpc.RpcError | None", tuple[tuple[str, Any], ...]], None]


class CallError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call as a failed unary call raises it: its code, details and trailing metadata (the
    ErrorInfo). For an error answer on the stream, and for failures decided on the client (a
    cancelled call, a closed channel, a passed deadline)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(details)
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def initial_metadata(self) -> tuple[tuple[str, Any], ...]:
        return ()

    # grpc.Call's remaining interface: an answered call is over
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class CallStream:
    """One rank's Calls stream. send() hands a call over; `answered(value, error, trailing)` is called
    once per call, on this stream's reader thread (or the watchdog's, when its timeout passes)."""

    def __init__(self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]], rank: int, deadlines: Deadlines):
        self.rank = rank
        self._deadlines = deadlines
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, Answered]] = {}
        self._lock = threading.Lock()
        self.ended: grpc.RpcError | None = None  # set once the stream is over: no call may be sent on it
        self.unimplemented = False  # the worker has no Calls RPC
        self.sent = 0  # calls sent on this stream
        self._outbox: queue.SimpleQueue[worker_pb2.CallsRequest | None] = queue.SimpleQueue()
        open_stream = channel.stream_stream(
            f"/{_SERVICE.full_name}/Calls",
            request_serializer=worker_pb2.CallsRequest.SerializeToString,
            response_deserializer=worker_pb2.CallsResponse.FromString,
        )
        self._call = open_stream(iter(self._outbox.get, None), metadata=tuple(metadata))
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"twinkle-calls-{rank}")
        self._reader.start()

    def send(self, method: str, request: Any, timeout: float | None, answered: Answered) -> int | None:
        """Sends the call; its id, or None when the stream is over (the caller sends it as a unary call)."""
        message = worker_pb2.CallsRequest(
            method=METHODS[method], request=request.SerializeToString(), timeout_seconds=timeout or 0.0
        )
        with self._lock:
            if self.ended is not None:
                return None
            message.id = call_id = next(self._ids)
            self._pending[call_id] = (method, answered)
            self.sent += 1
        if timeout is not None:
            self._deadlines.add(time.monotonic() + timeout, self, call_id)
        self._outbox.put(message)
        return call_id

    def waiting(self, call_id: int) -> bool:
        """Whether the call's answer has not come yet."""
        with self._lock:
            return call_id in self._pending

    def forget(self, call_id: int) -> bool:
        """Stops waiting for a call (cancelled by the caller); False if it was answered already."""
        with self._lock:
            return self._pending.pop(call_id, None) is not None

    def expire(self, call_id: int) -> None:
        """The call's timeout passed: it fails DEADLINE_EXCEEDED, as a unary call would (a late answer is dropped)."""
        with self._lock:
            entry = self._pending.pop(call_id, None)
        if entry is not None:
            entry[1](None, CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), ())

    def close(self) -> None:
        self._outbox.put(None)  # ends the requests: the worker's handler returns, the reader sees the end

    def _read(self) -> None:
        ended: grpc.RpcError
        try:
            for answer in self._call:
                with self._lock:
                    entry = self._pending.pop(answer.id, None)
                if entry is None:  # cancelled or timed out meanwhile
                    continue
                method, answered = entry
                trailing = pairs_of(answer.trailing_metadata)
                code = status_code(answer.code)
                if code == grpc.StatusCode.OK:
                    try:
                        value = RESPONSES[method].FromString(answer.response)
                    except Exception as error:  # noqa: BLE001 (a worker that answers garbage: this call fails)
                        answered(None, CallError(grpc.StatusCode.INTERNAL, f"undecodable answer: {error}"), trailing)
                        continue
                    answered(value, None, trailing)
                else:
                    answered(None, CallError(code, answer.details, trailing), trailing)
            ended = CallError(grpc.StatusCode.UNAVAILABLE, "the worker ended the call stream")
        except grpc.RpcError as error:
            ended = error
        with self._lock:
            self.ended = ended
            self.unimplemented = ended.code() == grpc.StatusCode.UNIMPLEMENTED
            waiting = list(self._pending.values())
            self._pending.clear()
        for _, answered in waiting:
            answered(None, ended, ())


class Deadlines:
    """One watchdog thread that expires calls on any stream whose timeout passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, CallStream, int]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, deadline: float, stream: CallStream, call_id: int) -> None:
        with self._cond:
            if len(self._heap) >= MAX_DEADLINES:  # drop the calls answered since (their entries wait for nothing)
                self._heap = [entry for entry in self._heap if entry[2].waiting(entry[3])]
                heapq.heapify(self._heap)
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline, next(self._order), stream, call_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="twinkle-call-deadlines")
                self._thread.start()
            elif earliest is None or deadline < earliest:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, stream, call_id = heapq.heappop(self._heap)
            stream.expire(call_id)  # a no-op for a call answered in time
