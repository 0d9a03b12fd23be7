"""The receive deadline: a call whose next request message is late is cancelled, so a client that
opens a call and sends nothing (or stalls halfway through a stream) holds no handler thread.

Used by twinkle_worker.server, around every read of a request message (the unary ones included:
the server reads them in the call's handler, not before). One watchdog thread serves every call.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)


class ReceiveDeadlines:
    """Cancels a call when one request message takes longer than `seconds` to arrive.

    Every deadline is `seconds` after its registration, so a new one is never earlier than those
    already waiting: the watchdog is woken only when it sleeps with nothing to wait for, not at
    every message (a wake-up per message was a thread hand-off, GIL included, twice a step).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._cond = threading.Condition()
        self._waiting: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None  # when the watchdog wakes next on its own (None: only when notified)

    def messages(self, requests: Iterator[Any], context: grpc.ServicerContext, describe: str) -> Iterator[Any]:
        """The request messages, each awaited for at most `seconds` (0: no deadline)."""
        iterator = iter(requests)
        if self.seconds <= 0:
            yield from iterator
            return
        details = (
            f"{describe}: no request message arrived for {self.seconds:g} s (the worker's --receive-timeout-seconds); "
            "the call was cancelled before it ran"
        )

        def cancel() -> None:
            cancel_with_status(context, details)

        while True:
            token = self._register(cancel)
            try:
                message = next(iterator, _END)
            finally:
                with self._cond:
                    self._waiting.pop(token, None)
            if message is _END:
                return
            yield message

    def _register(self, cancel: Callable[[], None]) -> int:
        token = next(self._tokens)
        deadline = time.monotonic() + self.seconds
        with self._cond:
            self._waiting[token] = (deadline, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="receive-deadline")
                self._thread.start()
            if self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()
        return token

    def _watch(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                late = [token for token, (deadline, _) in self._waiting.items() if deadline <= now]
                cancels = [self._waiting.pop(token)[1] for token in late]
                if not cancels:
                    self._wake_at = min((deadline for deadline, _ in self._waiting.values()), default=None)
                    self._cond.wait(None if self._wake_at is None else self._wake_at - now)
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
