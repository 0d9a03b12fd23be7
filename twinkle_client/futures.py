"""Futures of calls to several ranks: a concurrent.futures.Future settled once every rank answered.

Used by twinkle_client.model for its *_async calls. Whoever comes first settles it: a caller already
waiting in result() (in its own thread, so a synchronous call makes no hop through another thread),
or else one of the coordinator's result threads once the ranks have answered (for callbacks, wait()
and done()).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class MeshFuture(Future[T]):
    """A real concurrent.futures.Future of one call to several ranks, with finish()'s result (or error).

    finish (which gathers the ranks' calls) runs once, in whichever thread claims it first: a caller of
    result() or exception() with no timeout (it would wait for the ranks anyway, so it does the gathering
    and merging itself), or a result thread once every rank has answered, or once one has failed (gather
    then waits as it does for the others). Running from the start: cancel() is False, since the call was sent.
    """

    def __init__(self, finish: Callable[[], T]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        self._finish = finish
        self._claim_lock = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        """True for the one caller that is to run finish()."""
        with self._claim_lock:
            claimed, self._claimed = self._claimed, True
        return not claimed

    def settle(self) -> None:
        try:
            self.set_result(self._finish())
        except BaseException as error:  # the caller gets it from result()
            self.set_exception(error)

    def result(self, timeout: float | None = None) -> T:
        if timeout is None and self.claim():
            self.settle()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if timeout is None and self.claim():
            self.settle()
        return super().exception(timeout)


def mesh_future(calls: Sequence[Any], finish: Callable[[], T], results: Executor) -> MeshFuture[T]:
    """The MeshFuture of `calls`: settled by a caller waiting in result(), or on one of `results`'
    threads (the coordinator's) once every rank has answered or one has failed."""
    future: MeshFuture[T] = MeshFuture(finish)
    state = {"pending": len(calls), "ready": False}
    lock = threading.Lock()

    def answered(outcome: Future[Any]) -> None:
        with lock:
            state["pending"] -= 1
            ready = not state["ready"] and (state["pending"] == 0 or outcome.exception() is not None)
            state["ready"] = state["ready"] or ready
        if ready and future.claim():
            try:
                results.submit(future.settle)
            except RuntimeError:  # the coordinator is closed: settle here
                future.settle()

    if not calls and future.claim():
        future.settle()
    for call in calls:
        call.outcome.add_done_callback(answered)
    return future
