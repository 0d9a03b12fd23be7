"""The receive deadline's watchdog (twinkle_worker.receive_deadline): it cancels a call whose next
message is late, and it is not woken for every message that arrives in time (each wake-up is a thread
hand-off on the worker, twice a training step). The worker-level behaviour (DEADLINE_EXCEEDED naming
the flag) is tests/reliability/test_resource_exhaustion.py's."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from twinkle_worker.receive_deadline import ReceiveDeadlines


class _Cancellable:
    """What the watchdog needs of a call: cancel() (grpc's ServicerContext has it; no call object underneath)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def _watchdog_rounds(run: Any) -> int:
    """How many times the watchdog thread looked at the clock (once per round of its loop) while run() ran."""
    rounds = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal rounds
        watchdog = threading.current_thread().name == "receive-deadline"
        if watchdog and event == "c_call" and getattr(arg, "__name__", "") == "monotonic":
            rounds += 1

    threading.setprofile(profile)  # the watchdog starts inside run(), so it is profiled
    try:
        run()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    sys.setprofile(None)
    return rounds


def test_messages_that_arrive_in_time_do_not_wake_the_watchdog() -> None:
    deadlines = ReceiveDeadlines(60.0)
    pause = threading.Event()

    def arriving(count: int) -> Iterator[int]:
        for index in range(count):
            pause.wait(0.002)  # as a real message does, its arrival takes a moment (and frees the GIL)
            yield index

    def read_all() -> None:
        for _ in range(50):  # 50 calls of 4 messages, as the worker reads them
            context = _Cancellable()
            assert list(deadlines.messages(arriving(4), context, "request")) == [0, 1, 2, 3]  # type: ignore[arg-type]

    rounds = _watchdog_rounds(read_all)
    assert rounds <= 3, f"the watchdog ran {rounds} rounds for 200 messages that were all in time"


def test_a_stalled_stream_is_cancelled_after_the_deadline() -> None:
    seconds = 0.5
    deadlines = ReceiveDeadlines(seconds)
    context = _Cancellable()
    stalled_at: list[float] = []

    def stream() -> Iterator[int]:
        for index in range(5):  # in time, spaced so that the first deadline passes while they arrive
            context.cancelled.wait(0.2)
            yield index
        stalled_at.append(time.monotonic())
        context.cancelled.wait(60.0)  # the client sends nothing more

    received = []
    for message in deadlines.messages(stream(), context, "request"):  # type: ignore[arg-type]
        received.append(message)
    assert context.cancelled.is_set(), "the stalled stream was not cancelled"
    assert received == [0, 1, 2, 3, 4]
    waited = time.monotonic() - stalled_at[0]
    assert seconds * 0.9 <= waited < 30.0, waited
