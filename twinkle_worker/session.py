"""Who drives a worker, and in what order: the owner's session lease and the call sequence.

Used by twinkle_worker.servicer. Every mutating request carries a CallContext:

- `session_id`: Init with a session id makes that session the owner. Until Reset, or until
  the owner has been silent for `lease_seconds` (silent: none of its calls in flight), a call
  from another session is refused with FAILED_PRECONDITION, so two clients never interleave
  steps on one mesh.
- `sequence_number`: 1, 2, 3, ... per worker since Init (0: unsequenced). Calls start on the
  model thread in number order; the outcome of each call (its response or its error) is
  kept for the last MAX_KEPT calls, so a retry gets the stored outcome and the call never
  runs twice. A number older than that window, or a gap that stays open, is FAILED_PRECONDITION.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from google.protobuf.message import Message

from twinkle_protocol.errors import FailedPrecondition, Unavailable

# Outcomes kept for retries: at most this many calls, and besides the newest (always kept) this many
# bytes, the largest going first (see Ledger._evict).
MAX_KEPT = 64
MAX_KEPT_BYTES = 64 << 20
# A call whose number is ahead of the next one waits this long for its predecessors to arrive
# (pipelined calls can reach handler threads out of order); a longer gap means a lost call.
SEQUENCE_WAIT_SECONDS = 30.0
# A number this far ahead of the last started call is refused at once.
MAX_AHEAD = 4096


class Ledger:
    """The session lease and the sequence of one worker; thread-safe."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds  # the worker's default
        self._lease = lease_seconds  # the current owner's
        self._cond = threading.Condition()
        self.session_id = ""
        self._lease_deadline = math.inf
        self._generation = 0  # bumped by Init and Reset: waiters of the old sequence give up
        self._started = False  # a sequence exists (Init has been admitted)
        self._last_started = 0
        self.last_finished = 0
        self._running: dict[int, Future[Any]] = {}
        # The owner's calls admitted (waiting for their turn, queued or running) and not finished:
        # the lease cannot lapse while there is one (a long save outlasting it is still the owner's).
        self._busy = 0
        self._kept: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._kept_bytes = 0  # the sum of the sizes in _kept (kept up to date: _evict runs after every call)

    # -------------------------------------------------------------- session

    def lease_seconds_left(self) -> float:
        with self._cond:
            if not self.session_id:
                return 0.0
            if self._busy:  # held while the owner's calls run; the countdown restarts after the last
                return self._lease if self._lease > 0 else math.inf
            return self._lease_deadline - time.monotonic()

    def _expired(self) -> bool:
        return bool(self.session_id) and not self._busy and time.monotonic() >= self._lease_deadline

    def _renew(self) -> None:
        self._lease_deadline = time.monotonic() + self._lease if self._lease > 0 else math.inf

    def _check_owner(self, session_id: str) -> None:
        if self.session_id and session_id != self.session_id and not self._expired():
            left = self._lease_deadline - time.monotonic()
            lease = (
                f"its lease lapses after {left:.0f} s without calls" if math.isfinite(left) else "leases never lapse"
            )
            raise FailedPrecondition(
                f"this worker is driven by another client (session {self.session_id[:8]}..., {lease}); this call's "
                f"session is {session_id[:8] or '(none)'}. One client drives a mesh at a time: close the other "
                "client (its close() releases the workers), or Reset with force=true if it is gone",
                reason="OWNED_BY_OTHER_SESSION",
            )

    def check_owner(self, session_id: str) -> None:
        """Raises FailedPrecondition when another session owns the worker and its lease runs."""
        with self._cond:
            self._check_owner(session_id)

    def check_admissible(self, session_id: str, number: int) -> None:
        """Raises what admit() would raise for this call before it takes its turn (owner, no
        sequence, a number no longer kept or too far ahead); a stream asks before it receives its bytes."""
        with self._cond:
            self._check_owner(session_id)
            if number == 0 or number in self._running or number in self._kept:
                return
            if not self._started:
                raise FailedPrecondition(f"sequence number {number} but this worker has no call sequence: Init first")
            if number <= self._last_started:
                raise FailedPrecondition(f"call {number} already ran and its outcome is no longer kept")
            if number > self._last_started + MAX_AHEAD:
                raise FailedPrecondition(self._gap_message(number))

    def claim(self, session_id: str, number: int, initialised: bool, lease_seconds: float = 0.0) -> bool:
        """Init: makes session_id the owner (for lease_seconds, 0: the worker's default) and starts
        its sequence at `number`.

        Returns True when it takes over from an owner whose lease lapsed (the caller drops
        that owner's model first). A retry of an Init already admitted changes nothing.
        """
        with self._cond:
            if (
                session_id
                and session_id == self.session_id
                and number
                and (number in self._kept or number in self._running)
            ):
                return False
            self._check_owner(session_id)
            takeover = initialised and self._expired()
            if initialised and not takeover:
                raise FailedPrecondition(
                    "the worker is already initialised; call Reset first to start a new job",
                    reason="ALREADY_INITIALIZED",
                )
            self._lease = lease_seconds if lease_seconds > 0 else self.lease_seconds
            self._restart(session_id, number)
            return takeover

    def release(self, session_id: str, force: bool) -> None:
        """Reset: only the owner (or anyone, when forced or when the lease lapsed) ends the session."""
        with self._cond:
            if not force:
                self._check_owner(session_id)
            self._lease = self.lease_seconds
            self._restart("", 0)
            self._started = False

    def abandon(self, session_id: str, generation: int) -> None:
        """A failed Init: the session owns nothing, so it must not keep the worker."""
        with self._cond:
            if self._generation == generation and self.session_id == session_id:
                self._restart("", 0)
                self._started = False

    def _restart(self, session_id: str, number: int) -> None:
        self._generation += 1
        self.session_id = session_id
        self._renew()
        self._started = True
        self._last_started = max(0, number - 1)
        self.last_finished = self._last_started
        self._running.clear()
        self._busy = 0
        self._kept.clear()
        self._kept_bytes = 0
        self._cond.notify_all()

    @property
    def generation(self) -> int:
        return self._generation

    # ------------------------------------------------------------- sequence

    def admit(
        self, session_id: str | None, number: int, submit: Callable[[], Future[Any]], wait_seconds: float
    ) -> Future[Any]:
        """Starts a call in its turn and returns the future of its outcome (the stored one for a retry).

        session_id None: a read-only call, open to anyone. submit() puts the call on the model
        thread; it is called under the lock, so calls start in number order. While an owner's
        call is admitted and not finished, the owner's lease holds.
        """
        with self._cond:
            if session_id is not None:
                self._check_owner(session_id)
            owner = bool(session_id) and session_id == self.session_id
            generation = self._generation
            if owner:
                self._busy += 1
        try:
            future = self._admit(session_id, number, submit, wait_seconds)
        except BaseException:
            if owner:
                self._idle(generation)
            raise
        if owner:
            future.add_done_callback(lambda _: self._idle(generation))
        return future

    def _idle(self, generation: int) -> None:
        """One of the owner's calls finished: the lease counts down again after its last."""
        with self._cond:
            if self._generation == generation and self._busy > 0:
                self._busy -= 1
                if not self._busy:
                    self._renew()

    def _admit(
        self, session_id: str | None, number: int, submit: Callable[[], Future[Any]], wait_seconds: float
    ) -> Future[Any]:
        with self._cond:
            if session_id is not None:
                self._check_owner(session_id)
            if number == 0:
                future = submit()
                self._renew_for(session_id)
                return future
            if not self._started:
                raise FailedPrecondition(
                    f"sequence number {number} but this worker has no call sequence: Init first (the worker may "
                    "have been restarted or Reset since this client's Init; Init again and resume from a checkpoint)",
                    reason="NOT_INITIALIZED",
                )
            stored = self._stored(number)
            if stored is not None:
                return stored
            if number <= self._last_started:
                raise FailedPrecondition(
                    f"call {number} already ran and its outcome is no longer kept (the worker keeps the last "
                    f"{MAX_KEPT}); the last started call is {self._last_started}",
                    reason="SEQUENCE_EXPIRED",
                )
            if number > self._last_started + MAX_AHEAD:
                raise self._gap(number)
            generation = self._generation
            self._cond.wait_for(
                lambda: number <= self._last_started + 1 or self._generation != generation, wait_seconds
            )
            if self._generation != generation:
                raise FailedPrecondition(
                    f"call {number} was waiting for its turn when the worker was Reset or re-initialised",
                    reason="SEQUENCE_RESET",
                )
            stored = self._stored(number)  # a duplicate of this call may have started while we waited
            if stored is not None:
                return stored
            if number != self._last_started + 1:
                raise self._gap(number)
            future = submit()
            self._last_started = number
            self._running[number] = future
            self._renew_for(session_id)
            self._cond.notify_all()
        future.add_done_callback(lambda done: self._finished(number, generation, done))
        return future

    def _renew_for(self, session_id: str | None) -> None:
        if session_id is not None and session_id == self.session_id:
            self._renew()

    def _gap(self, number: int) -> FailedPrecondition:
        return FailedPrecondition(
            f"sequence number {number} does not follow the last started call {self._last_started}: an earlier call "
            "never arrived. Resend the missing calls with their numbers (a retry repeats a number)",
            reason="SEQUENCE_GAP",
            field="context.sequence_number",
            expected=self._last_started + 1,
            got=number,
        )

    def _stored(self, number: int) -> Future[Any] | None:
        if number in self._running:
            return self._running[number]
        if number in self._kept:
            future: Future[Any] = Future()
            future.set_result(self._kept[number][0])
            return future
        return None

    def _finished(self, number: int, generation: int, future: Future[Any]) -> None:
        with self._cond:
            if self._generation != generation:
                return
            self._running.pop(number, None)
            outcome = (
                future.result()
                if not future.cancelled()
                else Unavailable("the call was cancelled: the worker is stopping", reason="SHUTTING_DOWN")
            )
            kept = _on_host(outcome)
            size = _size(kept)
            self._kept_bytes += size - self._kept.pop(number, (None, 0))[1]
            self._kept[number] = (kept, size)
            self.last_finished = max(self.last_finished, number)
            self._evict(newest=number)
            self._renew_for(self.session_id)
            self._cond.notify_all()

    def _evict(self, newest: int) -> None:
        """Keeps at most MAX_KEPT outcomes (dropping the oldest), and besides the newest (always kept,
        however large) at most MAX_KEPT_BYTES, dropping the largest first: a large forward output
        goes first once it is no longer the newest, instead of pushing out the small outcomes
        (optimizer steps) that a retry must find."""
        while len(self._kept) > MAX_KEPT:
            self._kept_bytes -= self._kept.popitem(last=False)[1][1]
        others = self._kept_bytes - self._kept[newest][1]
        while others > MAX_KEPT_BYTES:
            largest = max((n for n in self._kept if n != newest), key=lambda n: self._kept[n][1])
            dropped = self._kept.pop(largest)[1]
            others -= dropped
            self._kept_bytes -= dropped


def _on_host(value: Any) -> Any:
    """A stored outcome with every torch tensor moved to host memory (a retry needs the values, not
    device memory held for up to MAX_KEPT calls)."""
    if isinstance(value, tuple):
        return tuple(_on_host(item) for item in value)
    if isinstance(value, list):
        return [_on_host(item) for item in value]
    if isinstance(value, dict):
        return {key: _on_host(item) for key, item in value.items()}
    if _is_tensor(value):
        return value.detach().cpu()
    return value


def _is_tensor(value: Any) -> bool:
    """isinstance(value, torch.Tensor) without importing torch here (a worker has, when it holds tensors).
    Cheaper than probing attributes: a failed hasattr on a protobuf message or a tensor costs ~4 µs."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _size(value: Any) -> int:
    """Rough bytes held by a stored outcome (protobuf messages, arrays, tensors, tuples, dicts)."""
    if isinstance(value, (tuple, list)):
        return sum(_size(item) for item in value)
    if isinstance(value, dict):
        return sum(_size(item) for item in value.values())
    if isinstance(value, Message):
        return int(value.ByteSize())
    if _is_tensor(value):
        return int(value.numel() * value.element_size())
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, memoryviews
    return int(nbytes) if nbytes is not None else 64
