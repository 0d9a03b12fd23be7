"""Coordinator: sends one call to every rank of the mesh concurrently and collects the replies.

Each rank gets its own sequence number stream (one per worker, 1, 2, 3, ... since Init),
so a worker can tell a retry from a new call, and every call carries this client's session
id, so a worker driven by another client refuses it. Errors come back naming the rank and
its address. Used by twinkle_client.model.

Failures, in short (docs/reliability.md has the whole model):

- UNAVAILABLE (connection lost or refused) on an idempotent call (a sequenced one: the
  worker deduplicates it; or a read-only one) is retried on the same rank with the same
  number once the channel is ready again, for at most `retry_seconds`.
- A sequenced call whose outcome stayed unknown (UNAVAILABLE after the retries,
  DEADLINE_EXCEEDED, CANCELLED) is resent with its number before the next sequenced call,
  so the worker's sequence has no gap and the call runs exactly once.
- gather raises as soon as a rank is gone (UNAVAILABLE, DEADLINE_EXCEEDED), without waiting
  for the others; after any other failure it gives the other ranks `abort_grace_seconds` to
  report theirs, then names the ranks that never answered.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinkle_client import call_stream as call_stream_module
from twinkle_client.call_stream import CallError
from twinkle_protocol import streaming
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import TwinkleError, from_status
from twinkle_protocol.metadata import SESSION_METADATA
from twinkle_protocol.security import ChannelSecurity

MAX_MESSAGE_BYTES = 256 << 20
SERVICE = "twinkle.worker.v1.WorkerService"
STREAM_RESPONSES = {
    "ForwardBackwardStream": worker_pb2.ForwardBackwardStreamResponse,
    "ForwardOnlyStream": worker_pb2.ForwardOnlyStreamResponse,
}
# Codes that say a rank failed because another one did; the other rank's error is the cause.
_CONSEQUENTIAL = (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)
# Outcomes that leave a sequenced call unconfirmed: it may or may not have run.
_IN_DOUBT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# RPCs with one request and a stream of responses (collected whole, or by the caller's `collect`).
UNARY_STREAM = frozenset({"ExportWeights"})
# collect(rank, responses): the result of one rank's response stream.
Collect = Callable[[int, Iterator[Any]], Any]
# Unsequenced calls that are safe to repeat.
IDEMPOTENT = frozenset({"GetStatus", "GetTrainConfigs", "Reset"})
MAX_ATTEMPTS = 3
# Codes that say a rank is gone (no answer came): reported without waiting for the other ranks.
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Coordinator:
    """Channels and stubs to the workers of a mesh, in global-rank order."""

    def __init__(
        self,
        addresses: Sequence[str],
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        security: ChannelSecurity | None = None,
        session_id: str | None = None,
        retry_seconds: float = 5.0,
        abort_grace_seconds: float = 10.0,
        wrap_channel: Callable[[grpc.Channel], grpc.Channel] | None = None,
        call_stream: bool = False,
    ) -> None:
        """`wrap_channel` (e.g. twinkle_client.tracing's) wraps the channels of the unary WorkerService calls.
        With `call_stream`, sequenced calls of call_stream.STREAMED go as messages on one Calls stream per
        rank instead of unary calls (twinkle_client.call_stream); the others stay unary."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.security = security or ChannelSecurity()
        self.addresses = list(addresses)
        self.channels = [self.security.channel(address, options) for address in self.addresses]
        # Health checks and the stream RPCs keep the plain channels: they need cancel() and trailing_metadata().
        wrapped = [wrap_channel(channel) for channel in self.channels] if wrap_channel else self.channels
        self.stubs = [worker_pb2_grpc.WorkerServiceStub(channel) for channel in wrapped]
        # The stream RPCs with streaming's frame codec (data frames as raw bytes both ways; same wire format).
        self.stream_calls = [
            {
                name: channel.stream_stream(
                    f"/{SERVICE}/{name}",
                    request_serializer=streaming.serialize_frame,
                    response_deserializer=streaming.frame_parser(response_type),
                )
                for name, response_type in STREAM_RESPONSES.items()
            }
            for channel in self.channels
        ]
        self.timeout = timeout
        self.session_id = session_id or uuid.uuid4().hex
        # The session in metadata too: a worker owned by another session refuses the call before reading it.
        self.metadata = (*metadata, *self.security.metadata(), (SESSION_METADATA, self.session_id))
        self.retry_seconds = retry_seconds
        self.abort_grace_seconds = abort_grace_seconds
        # Set by the model: rewrites the error of a failed rank (e.g. one that restarted: cluster.RestartCheck).
        self.explain_failure: Callable[[int, TwinkleError], TwinkleError] | None = None
        self._sequence = [0] * len(self.addresses)
        self._in_doubt: list[dict[int, _RankCall]] = [{} for _ in self.addresses]
        self._lock = threading.RLock()  # held while numbering and sending
        self._doubt_lock = threading.Lock()  # guards _in_doubt (gRPC callback threads update it)
        # One Health.Watch held open per channel keeps gRPC's polling thread for the channel alive:
        # with no call in flight, every .future() starts a thread of its own and ends it (about half
        # of a call's client CPU; docs/performance.md). The worker answers it without a thread.
        # Finishes the futures of *_async calls (twinkle_client.futures; merging outputs) off gRPC's threads.
        # Several threads: a done-callback runs on one and may wait for another future's result.
        self.results = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="twinkle-results")
        self._keep_warm = [
            health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
            for channel in self.channels
        ]
        # The call streams, opened at a rank's first streamed call and again after one ends; a rank whose
        # worker has no Calls RPC gets unary calls.
        self._streams: list[call_stream_module.CallStream | None] = [None] * len(self.addresses)
        self._streamed = [call_stream] * len(self.addresses)
        self._stream_lock = threading.Lock()
        self._deadlines = call_stream_module.Deadlines()

    @property
    def size(self) -> int:
        return len(self.addresses)

    def restart_sequence(self, first: int = 1) -> None:
        """Init starts every worker's sequence again at `first`."""
        with self._lock, self._doubt_lock:
            self._sequence = [first - 1] * self.size
            self._in_doubt = [{} for _ in self.addresses]

    def submit(
        self,
        method: str,
        requests: Sequence[Any],
        ranks: Sequence[int] | None = None,
        sequenced: bool = True,
        frames: Callable[[Any], Iterator[Any]] | None = None,
        timeout: float | None = None,
        collect: Collect | None = None,
    ) -> list[Any]:
        """Starts `method` on each rank (requests[i] goes to ranks[i]) without waiting.

        With `frames`, `method` is a streaming RPC: frames(request) yields the messages to
        send, and the future's result is the list of messages received. For a response
        stream (frames, or a method in UNARY_STREAM), collect(rank, responses) turns the
        messages into the future's result instead of a list. `timeout` (seconds) overrides
        the coordinator's per-call timeout for these calls.
        """
        ranks = list(range(self.size)) if ranks is None else list(ranks)
        calls: list[_RankCall] = []
        with self._lock:  # numbers and sends in one order, so every worker sees calls in the same order
            if sequenced:
                self._confirm_in_doubt()
            for rank, request in zip(ranks, requests, strict=False):
                message = request.header if frames is not None else request
                context = message.context if "context" in message.DESCRIPTOR.fields_by_name else None
                number = 0
                if context is not None:
                    context.session_id = self.session_id
                    if sequenced:
                        self._sequence[rank] += 1
                        number = context.sequence_number = self._sequence[rank]
                call = _RankCall(self, rank, method, request, number, frames, timeout, collect)
                call.start()
                calls.append(call)
        return calls

    # How a call fans out (as Monarch's endpoints do): the same request to every rank, a request to
    # one rank, or a request of its own to each rank (a batch's slice by data rank, Init's rank).
    # Each sends at once and returns the calls; gather (or twinkle_client.futures) waits for them.

    def all(
        self,
        method: str,
        request: Any,
        *,
        sequenced: bool = True,
        timeout: float | None = None,
        collect: Collect | None = None,
    ) -> list[Any]:
        """The same request to every rank (a copy each, since sequence numbers differ per rank)."""
        requests = [copy_message(request) for _ in range(self.size)]
        return self.submit(method, requests, sequenced=sequenced, timeout=timeout, collect=collect)

    def one(self, rank: int, method: str, request: Any, *, sequenced: bool = True) -> list[Any]:
        """The request to one rank only (e.g. a read of rank 0's state)."""
        return self.submit(method, [request], ranks=[rank], sequenced=sequenced)

    def each(
        self, method: str, requests: Sequence[Any], *, frames: Callable[[Any], Iterator[Any]] | None = None
    ) -> list[Any]:
        """requests[rank] to each rank, all at once (with `frames`, a streaming RPC: see submit)."""
        return self.submit(method, requests, frames=frames)

    def gather(self, method: str, futures: Sequence[Any], ranks: Sequence[int] | None = None) -> list[Any]:
        """Waits for every rank; raises the root-cause error, naming the rank and its address.

        A rank that is gone (UNAVAILABLE, DEADLINE_EXCEEDED) is reported at once, without
        waiting for the others' collectives to time out. After any other failure the others
        get abort_grace_seconds to report theirs (ranks refusing the same request answer
        together, and the lowest rank is named; ranks waiting on a dead peer fail fast), then
        the ranks still silent are named as hung or dead.
        """
        ranks = [future.rank for future in futures] if ranks is None else list(ranks)
        outcomes = {id(future.outcome): (rank, future) for rank, future in zip(ranks, futures, strict=False)}
        pending = {future.outcome for future in futures}
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - _now())
            done, pending = concurrent.futures.wait(
                pending, timeout=timeout, return_when=concurrent.futures.FIRST_EXCEPTION
            )
            if not done:  # the grace ran out: the ranks still pending are hung or dead
                break
            errors = _errors(outcomes, [f for f in futures if f.outcome.done()])
            if any(error.code() in _GONE for _, error in errors):
                pending = set()
                break
            if errors and deadline is None:
                deadline = _now() + self.abort_grace_seconds
        errors = _errors(outcomes, [f for f in futures if f.outcome.done()])
        silent = [rank for rank, future in zip(ranks, futures, strict=False) if not future.outcome.done()]
        gone = any(error.code() in _GONE for _, error in errors)
        if errors or silent:
            raise self._error(method, errors, [] if gone else silent)
        return [future.outcome.result() for future in futures]

    def call(
        self,
        method: str,
        requests: Sequence[Any],
        ranks: Sequence[int] | None = None,
        sequenced: bool = True,
        timeout: float | None = None,
    ) -> list[Any]:
        """submit + gather."""
        return self.gather(method, self.submit(method, requests, ranks, sequenced, timeout=timeout), ranks)

    def _error(self, method: str, errors: list[tuple[int, grpc.RpcError]], silent: list[int]) -> TwinkleError:
        causes = [item for item in errors if item[1].code() not in _CONSEQUENTIAL] or errors
        if not causes:  # nothing failed but some ranks never answered
            ranks = ", ".join(f"{rank} ({self.addresses[rank]})" for rank in silent)
            return from_status(grpc.StatusCode.UNAVAILABLE, f"{method}: rank(s) {ranks} did not answer")
        rank, error = causes[0]
        details = error.details() or str(error.code())
        prefix = f"{method} failed on rank {rank} ({self.addresses[rank]})"
        others = len(errors) - 1
        if others:
            prefix += f" and {others} other rank(s)"
        if silent:
            prefix += (
                f"; rank(s) {silent} did not answer within {self.abort_grace_seconds:.0f} s after that: "
                "they are probably hung or dead"
            )
        failure = from_status(error.code(), f"{prefix}: {details}", error)
        failure.metadata.setdefault("rank", str(rank))  # a status without ErrorInfo (e.g. from the transport)
        return self.explain_failure(rank, failure) if self.explain_failure else failure

    # ------------------------------------------------------- in-doubt calls

    def _record(self, call: _RankCall, error: grpc.RpcError | None) -> None:
        """Remembers a sequenced call whose outcome is unknown, forgets one whose outcome came back."""
        if not call.number:
            return
        with self._doubt_lock:
            doubts = self._in_doubt[call.rank]
            if error is not None and error.code() in _IN_DOUBT:
                doubts[call.number] = call
            else:
                doubts.pop(call.number, None)

    def _confirm_in_doubt(self) -> None:
        """Resends every unconfirmed sequenced call with its own number (the worker runs it if it
        never arrived, or returns its stored outcome), all ranks at once; raises if one stays unknown."""
        with self._doubt_lock:
            doubts = [(rank, call) for rank, calls in enumerate(self._in_doubt) for _, call in sorted(calls.items())]
        if not doubts:
            return
        for rank in sorted({rank for rank, _ in doubts}):
            if not wait_ready(self.channels[rank], self.retry_seconds):
                numbers = sorted(call.number for doubt_rank, call in doubts if doubt_rank == rank)
                raise from_status(
                    grpc.StatusCode.UNAVAILABLE,
                    f"rank {rank} ({self.addresses[rank]}) is unreachable and its call(s) {numbers} were never "
                    "confirmed; nothing new was sent. If the worker died: Reset the survivors, restart it, Init "
                    "and resume from a checkpoint",
                ) from None
        again = []
        for rank, call in doubts:
            # the default timeout
            resend = _RankCall(self, rank, call.method, call.request, call.number, call.frames, collect=call.collect)
            resend.start()
            again.append(resend)
        for resend in again:
            error = resend.outcome.exception()
            if isinstance(error, grpc.RpcError) and error.code() in _IN_DOUBT:
                raise from_status(
                    error.code(),
                    f"call {resend.number} ({resend.method}) on rank {resend.rank} ({self.addresses[resend.rank]}) "
                    f"is still unconfirmed ({error.details()}); nothing new was sent",
                    error,
                )

    @property
    def call_streams(self) -> list[call_stream_module.CallStream | None]:
        """Each rank's call stream (None: not opened yet), e.g. to count the calls it carried (`sent`)."""
        with self._stream_lock:
            return list(self._streams)

    def use_call_stream(self, enabled: bool) -> None:
        """Sends the next STREAMED calls on the call streams (True) or as unary calls (False); the calls
        already sent finish where they are."""
        with self._stream_lock:
            self._streamed = [enabled] * len(self.addresses)

    def stream_for(self, rank: int, method: str) -> call_stream_module.CallStream | None:
        """The open call stream to `rank` for a sequenced call of `method`, or None: send it as a unary call."""
        if not self._streamed[rank] or method not in call_stream_module.STREAMED:
            return None
        with self._stream_lock:
            stream = self._streams[rank]
            if stream is not None and stream.unimplemented:
                self._streamed[rank] = False
                return None
            if stream is None or stream.ended is not None:
                stream = self._streams[rank] = call_stream_module.CallStream(
                    self.channels[rank], self.metadata, rank, self._deadlines
                )
            return stream

    def close(self) -> None:
        self.results.shutdown(wait=False)
        for watch in self._keep_warm:
            watch.cancel()
        with self._stream_lock:
            self._streamed = [False] * len(self.addresses)
            for stream in self._streams:
                if stream is not None:
                    stream.close()
        self._deadlines.close()
        for channel in self.channels:
            channel.close()


class _RankCall:
    """One call on one rank, seen as a future (`outcome`); retries UNAVAILABLE when idempotent."""

    def __init__(
        self,
        owner: Coordinator,
        rank: int,
        method: str,
        request: Any,
        number: int,
        frames: Callable[[Any], Iterator[Any]] | None,
        timeout: float | None = None,
        collect: Collect | None = None,
    ) -> None:
        self.owner, self.rank, self.method, self.request, self.number, self.frames = (
            owner,
            rank,
            method,
            request,
            number,
            frames,
        )
        self.collect = collect
        self.timeout = timeout if timeout is not None else owner.timeout
        self.outcome: Future[Any] = Future()
        self._attempts = 0
        self._cancelled = False
        self._call: Any = None
        self._first_error: grpc.RpcError | None = None
        # For twinkle_client.timing: when the last attempt was sent and answered, and its trailing metadata.
        self.sent_at = 0.0
        self.finished_at: float | None = None
        self.trailing: Any = ()
        self._stream: call_stream_module.CallStream | None = None  # the call stream it went on, if it did
        self._stream_id = 0

    @property
    def idempotent(self) -> bool:
        return self.number > 0 or self.method in IDEMPOTENT

    def start(self, wait_for_ready: bool = False) -> None:
        self._attempts += 1
        if self.frames is None and self.number > 0 and not wait_for_ready:
            stream = self.owner.stream_for(self.rank, self.method)
            if stream is not None:
                self.sent_at = time.perf_counter()
                self._stream = stream
                call_id = stream.send(self.method, self.request, self.timeout, self._stream_answered)
                if call_id is not None:
                    self._stream_id = call_id
                    return
                self._stream = None  # the stream ended just now: a unary call
        stub = self.owner.stream_calls[self.rank].get(self.method) or getattr(self.owner.stubs[self.rank], self.method)
        options = {"timeout": self.timeout, "metadata": self.owner.metadata, "wait_for_ready": wait_for_ready}
        streamed = self.frames is not None or self.method in UNARY_STREAM
        self.sent_at = time.perf_counter()
        try:
            if self.frames is not None:
                self._call = stub(self.frames(self.request), **options)
            elif streamed:
                self._call = stub(self.request, **options)
            else:
                self._call = stub.future(self.request, **options)
        except ValueError as error:  # the channel was closed (the client is closing)
            self._settle(None, CallError(grpc.StatusCode.CANCELLED, f"not sent: {error}"))
            return
        if streamed:
            threading.Thread(target=self._drain, args=(self._call,), daemon=True, name="twinkle-stream").start()
        else:
            self._call.add_done_callback(self._unary_done)

    def _stream_answered(self, value: Any, error: grpc.RpcError | None, trailing: tuple[tuple[str, Any], ...]) -> None:
        stream = self._stream
        if error is not None and stream is not None and stream.unimplemented:  # an older worker: unary from now on
            self._stream = None
            self._attempts -= 1
            self.start()
            return
        self.finished_at = time.perf_counter()
        self.trailing = trailing
        self._settle(value, error)

    def _unary_done(self, call: Any) -> None:
        self._answered(call)
        try:
            self._settle(call.result(), None)
        except grpc.RpcError as error:
            self._settle(None, error)
        except grpc.FutureCancelledError:
            self._settle(None, CallError(grpc.StatusCode.CANCELLED, "cancelled by the client"))

    def _drain(self, call: Any) -> None:
        try:
            value = list(call) if self.collect is None else self.collect(self.rank, call)
        except grpc.RpcError as error:
            self._answered(call)
            self._settle(None, error)
        except TwinkleError as error:  # the responses did not make sense (a bad stream): fails this call
            call.cancel()
            self._settle(None, CallError(error.code, str(error)))
        else:
            self._answered(call)
            self._settle(value, None)

    def _answered(self, call: Any) -> None:
        self.finished_at = time.perf_counter()
        try:
            self.trailing = call.trailing_metadata() or ()
        except grpc.RpcError:  # a call that never started has none
            self.trailing = ()

    def _settle(self, value: Any, error: grpc.RpcError | None) -> None:
        if (
            error is not None
            and error.code() == grpc.StatusCode.UNAVAILABLE
            and self.idempotent
            and not self._cancelled
        ):
            self._first_error = self._first_error or error
            if self._attempts < MAX_ATTEMPTS:
                threading.Thread(target=self._retry, daemon=True, name="twinkle-retry").start()
                return
        if error is not None and self._first_error is not None and error.code() in _IN_DOUBT:
            error = self._first_error  # the first failure says more than the retry's
        self.owner._record(self, error)
        if error is not None:
            self.outcome.set_exception(error)
        else:
            self.outcome.set_result(value)

    def _retry(self) -> None:
        """Waits (bounded) for the channel to be ready again, then resends the same request."""
        if not wait_ready(self.owner.channels[self.rank], self.owner.retry_seconds):
            self._attempts = MAX_ATTEMPTS
            self._settle(None, self._first_error)
            return
        self.start()

    def cancel(self) -> bool:
        """Stops waiting; a sequenced call stays unconfirmed and is resent before the next one."""
        self._cancelled = True
        if self._stream is not None:  # on the call stream: stop waiting for its answer
            if not self._stream.forget(self._stream_id):
                return False
            error = CallError(grpc.StatusCode.CANCELLED, "cancelled by the client")
            self.owner._record(self, error)
            self.outcome.set_exception(error)
            return True
        cancelled = bool(self._call.cancel()) if self._call is not None else False
        if cancelled:  # recorded now, not in gRPC's callback thread: the next submit must see it
            self.owner._record(self, CallError(grpc.StatusCode.CANCELLED, "cancelled by the client"))
        return cancelled

    def done(self) -> bool:
        return self.outcome.done()

    def result(self, timeout: float | None = None) -> Any:
        return self.outcome.result(timeout)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.outcome.add_done_callback(lambda _: callback(self))


def _errors(outcomes: dict[int, tuple[int, _RankCall]], done: Sequence[_RankCall]) -> list[tuple[int, grpc.RpcError]]:
    found = []
    for call in done:
        error = call.outcome.exception()
        if isinstance(error, grpc.RpcError):
            found.append((outcomes[id(call.outcome)][0], error))
    return sorted(found, key=lambda item: item[0])


def wait_ready(channel: grpc.Channel, timeout: float) -> bool:
    """Whether the worker behind `channel` answers within timeout seconds (a health check that waits
    for the connection; unlike grpc.channel_ready_future it leaves no polling thread behind).

    A check answered UNAVAILABLE is tried again until the time is up: right after a connection
    dropped, a check can be sent on the dying connection and fail at once, before the channel
    reconnects (the next check waits for the new connection)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    for attempt in itertools.count():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=remaining, wait_for_ready=True)
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                return False
        except ValueError:  # the channel was closed
            return False
        pause.wait(min(0.01 * 2**attempt, 0.5, max(0.0, deadline - time.monotonic())))  # no hot loop on refusals
    return False


def copy_message(request: Any) -> Any:
    """A copy of a protobuf message (each rank's request is its own: its context differs)."""
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


def _now() -> float:
    return time.monotonic()
