"""The receive deadline: a call whose next request message is late is cancelled, so a client that
opens a call and sends nothing (or stalls halfway through a stream) holds no handler thread.

Used by twinkle_worker.server, around every read of a request message (the unary ones included:
the server reads them in the call's handler, not before). One watchdog thread serves every call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)


class ReceiveDeadlines:
    """Cancels a call when one request message takes longer than `seconds` to arrive."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._cond = threading.Condition()
        self._waiting: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def messages(self, requests: Iterator[Any], context: grpc.ServicerContext, describe: str) -> Iterator[Any]:
        """The request messages, each awaited for at most `seconds` (0: no deadline)."""
        iterator = iter(requests)
        details = (
            f"{describe}: no request message arrived for {self.seconds:g} s (the worker's --receive-timeout-seconds); "
            "the call was cancelled before it ran"
        )
        while True:
            with self._waiting_for(lambda: cancel_with_status(context, details)):
                message = next(iterator, _END)
            if message is _END:
                return
            yield message

    @contextlib.contextmanager
    def _waiting_for(self, cancel: Callable[[], None]) -> Iterator[None]:
        if self.seconds <= 0:
            yield
            return
        token = next(self._tokens)
        with self._cond:
            self._waiting[token] = (time.monotonic() + self.seconds, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="receive-deadline")
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._waiting.pop(token, None)

    def _watch(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                late = [token for token, (deadline, _) in self._waiting.items() if deadline <= now]
                cancels = [self._waiting.pop(token)[1] for token in late]
                if not cancels:
                    nearest = min((deadline for deadline, _ in self._waiting.values()), default=None)
                    self._cond.wait(None if nearest is None else nearest - now)
                    continue
            for cancel in cancels:  # outside the lock: cancelling wakes the handler, which unregisters
                cancel()


_END = object()


def cancel_with_status(context: grpc.ServicerContext, details: str) -> None:
    """Ends the call now with DEADLINE_EXCEEDED and `details`, from any thread; the handler's pending
    read then raises. grpc's public API can only cancel (the client would see a bare CANCELLED), so
    this uses the call object underneath, and falls back to a plain cancel where that is missing."""
    try:
        from grpc._cython import cygrpc

        context._rpc_event.call.cancel(cygrpc.StatusCode.deadline_exceeded, details)  # type: ignore[attr-defined]
    except Exception:  # another grpc version: still free the thread
        log.warning("receive deadline: cancelling without a status (%s)", details)
        context.cancel()
