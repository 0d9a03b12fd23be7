"""Coordinator: sends one call to every rank of the mesh concurrently and collects the replies.

Each rank gets its own sequence number stream (one per worker, 1, 2, 3, ... since Init),
so a worker can tell a retry from a new call. Errors come back naming the rank and its
address. Used by twinkle_client.model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc

from twinkle_client._proto import worker_pb2_grpc
from twinkle_client.errors import TwinkleError, from_status

MAX_MESSAGE_BYTES = 256 << 20
# Codes that say a rank failed because another one did; the other rank's error is the cause.
_CONSEQUENTIAL = (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)


class Coordinator:
    """Channels and stubs to the workers of a mesh, in global-rank order."""

    def __init__(self, addresses: Sequence[str], metadata: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.addresses = list(addresses)
        self.channels = [grpc.insecure_channel(address, options=options) for address in self.addresses]
        self.stubs = [worker_pb2_grpc.WorkerServiceStub(channel) for channel in self.channels]
        self.metadata = tuple(metadata)
        self.timeout = timeout
        self._sequence = [0] * len(self.addresses)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.addresses)

    def restart_sequence(self, first: int = 1) -> None:
        """Init starts every worker's sequence again at `first`."""
        with self._lock:
            self._sequence = [first - 1] * self.size

    def submit(
        self,
        method: str,
        requests: Sequence[Any],
        ranks: Sequence[int] | None = None,
        sequenced: bool = True,
        frames: Callable[[Any], Iterator[Any]] | None = None,
    ) -> list[Future[Any]]:
        """Starts `method` on each rank (requests[i] goes to ranks[i]) without waiting.

        With `frames`, `method` is a streaming RPC: frames(request) yields the messages to
        send, and the future's result is the list of messages received.
        """
        ranks = list(range(self.size)) if ranks is None else list(ranks)
        futures: list[Any] = []
        with self._lock:  # numbers and sends in one order, so every worker sees calls in the same order
            for rank, request in zip(ranks, requests):
                if sequenced:
                    self._sequence[rank] += 1
                    context = request.header.context if frames is not None else request.context
                    context.sequence_number = self._sequence[rank]
                call = getattr(self.stubs[rank], method)
                if frames is not None:
                    futures.append(_StreamCall(call(frames(request), timeout=self.timeout, metadata=self.metadata)))
                else:
                    futures.append(call.future(request, timeout=self.timeout, metadata=self.metadata))
        return futures

    def gather(self, method: str, futures: Sequence[Any], ranks: Sequence[int] | None = None) -> list[Any]:
        """Waits for every rank; raises the root-cause error, naming the rank and its address."""
        ranks = list(range(self.size)) if ranks is None else list(ranks)
        results: list[Any] = []
        errors: list[tuple[int, grpc.RpcError]] = []
        for rank, future in zip(ranks, futures):
            try:
                results.append(future.result())
            except grpc.RpcError as error:
                errors.append((rank, error))
                results.append(None)
        if errors:
            raise self._error(method, errors)
        return results

    def call(self, method: str, requests: Sequence[Any], ranks: Sequence[int] | None = None, sequenced: bool = True) -> list[Any]:
        """submit + gather."""
        return self.gather(method, self.submit(method, requests, ranks, sequenced), ranks)

    def broadcast(self, method: str, request: Any, sequenced: bool = True) -> list[Any]:
        """The same request to every rank (a copy each, since sequence numbers differ per rank)."""
        requests = [type(request)() for _ in range(self.size)]
        for copy in requests:
            copy.CopyFrom(request)
        return self.call(method, requests, sequenced=sequenced)

    def _error(self, method: str, errors: list[tuple[int, grpc.RpcError]]) -> TwinkleError:
        causes = [item for item in errors if item[1].code() not in _CONSEQUENTIAL] or errors
        rank, error = causes[0]
        details = error.details() or str(error.code())
        prefix = f"{method} failed on rank {rank} ({self.addresses[rank]})"
        if len(errors) > 1:
            prefix += f" and {len(errors) - 1} other rank(s)"
        return from_status(error.code(), f"{prefix}: {details}")

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class _StreamCall:
    """A response-streaming call seen as a future: result() is every message received."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._messages: list[Any] | None = None

    def result(self) -> list[Any]:
        if self._messages is None:
            self._messages = list(self._call)
        return self._messages

    def cancel(self) -> bool:
        return bool(self._call.cancel())
