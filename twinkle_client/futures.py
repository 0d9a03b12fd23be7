"""Futures of calls to several ranks: a concurrent.futures.Future settled once every rank answered.

Used by twinkle_client.model for its *_async calls, on the coordinator's result threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


def mesh_future(calls: Sequence[Any], finish: Callable[[], T], results: Executor) -> Future[T]:
    """A real concurrent.futures.Future of one call to several ranks, with finish()'s result (or
    error): finish (which gathers `calls`) runs once every rank has answered, or once one has
    failed (gather then waits as it does for the others), on one of `results`' threads (the coordinator's).
    The future is running from the start: cancel() is False, since the call was sent."""
    result: Future[T] = Future()
    result.set_running_or_notify_cancel()
    state = {"pending": len(calls), "started": False}
    lock = threading.Lock()

    def settle() -> None:
        try:
            result.set_result(finish())
        except BaseException as error:  # the caller gets it from result()
            result.set_exception(error)

    def answered(outcome: Future[Any]) -> None:
        with lock:
            state["pending"] -= 1
            start = not state["started"] and (state["pending"] == 0 or outcome.exception() is not None)
            state["started"] = state["started"] or start
        if start:
            try:
                results.submit(settle)
            except RuntimeError:  # the coordinator is closed: settle here
                settle()

    if not calls:
        settle()
    for call in calls:
        call.outcome.add_done_callback(answered)
    return result
