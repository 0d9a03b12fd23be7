"""Where a training step's time went, seen from the client: `TransformersModel.last_step_timing()`.

Each call's slowest rank is split into client CPU (slicing, encoding, sending), wire (its round
trip less the worker's handler time), worker queue, compute and codec (from the trailing metadata
the worker puts on every call it answers: twinkle_worker.metrics), and merge (decoding and joining
the replies). A step is every call from the previous optimizer step to the next one. Used by
twinkle_client.model; the coordinator's rank calls carry the timestamps.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twinkle_protocol.metadata import COMPUTE_KEY, HANDLER_KEY, QUEUE_KEY


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one optimizer step, summed over its calls (each call counted at its slowest rank).

    client: slicing and encoding the requests on the client; wire: transfer and gRPC both ways;
    queue: waiting on the worker for the call's turn on the model thread; compute: running there;
    worker_codec: the worker decoding requests and encoding responses; merge: the client decoding
    and merging the replies. Calls pipelined with `*_async` overlap, so the parts can add up to more
    than the step's wall time.
    """

    client_seconds: float = 0.0
    wire_seconds: float = 0.0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    worker_codec_seconds: float = 0.0
    merge_seconds: float = 0.0
    calls: int = 0

    def describe(self) -> str:
        """One line, milliseconds."""
        parts = [
            f"{name.removesuffix('_seconds').replace('_', ' ')} {1e3 * value:.1f}"
            for name, value in dataclasses.asdict(self).items()
            if name.endswith("_seconds")
        ]
        return f"{self.calls} calls, ms: " + ", ".join(parts)


def _seconds(metadata: Any, key: str) -> float:
    for name, value in metadata or ():
        if name == key:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


def call_timing(calls: Sequence[Any], client_seconds: float, merge_seconds: float = 0.0) -> StepTiming:
    """One call over the ranks: `calls` are the coordinator's rank calls (sent_at, finished_at, trailing)."""
    finished = [call for call in calls if call.finished_at is not None]
    if not finished:
        return StepTiming(client_seconds=client_seconds, merge_seconds=merge_seconds, calls=1)
    slowest = max(finished, key=lambda call: call.finished_at - call.sent_at)
    metadata = slowest.trailing
    queue, compute, handler = (_seconds(metadata, key) for key in (QUEUE_KEY, COMPUTE_KEY, HANDLER_KEY))
    return StepTiming(
        client_seconds=client_seconds,
        wire_seconds=max(0.0, slowest.finished_at - slowest.sent_at - handler),
        queue_seconds=queue,
        compute_seconds=compute,
        worker_codec_seconds=max(0.0, handler - queue - compute),
        merge_seconds=merge_seconds,
        calls=1,
    )


class StepClock:
    """Adds up the calls of the step in progress; `last` is the step finished last (None before one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # futures of pipelined calls resolve on other threads
        self._open = StepTiming()
        self.last: StepTiming | None = None

    def add(self, timing: StepTiming, step_done: bool = False) -> None:
        with self._lock:
            self._open = StepTiming(
                **{
                    field.name: getattr(self._open, field.name) + getattr(timing, field.name)
                    for field in dataclasses.fields(StepTiming)
                }
            )
            if step_done:
                self.last, self._open = self._open, StepTiming()
