"""twinkle_client.timing: a call's slowest rank split into its parts, and the calls of a step summed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from twinkle_client.timing import StepClock, StepTiming, call_timing
from twinkle_protocol.metadata import COMPUTE_KEY, HANDLER_KEY, QUEUE_KEY


@dataclass
class RankCall:
    """What call_timing reads off the coordinator's rank calls."""

    sent_at: float
    finished_at: float | None
    trailing: Any


def answered(sent: float, finished: float, queue: float, compute: float, handler: float) -> RankCall:
    metadata = ((QUEUE_KEY, str(queue)), (COMPUTE_KEY, str(compute)), (HANDLER_KEY, str(handler)), ("other", "x"))
    return RankCall(sent, finished, metadata)


def test_the_slowest_rank_is_split_into_wire_queue_compute_and_codec() -> None:
    fast = answered(10.0, 10.5, queue=0.1, compute=0.3, handler=0.45)
    slow = answered(10.0, 11.0, queue=0.2, compute=0.6, handler=0.9)  # round trip 1.0 s
    timing = call_timing([fast, slow], client_seconds=0.05, merge_seconds=0.02)
    assert timing.calls == 1
    assert timing.client_seconds == 0.05 and timing.merge_seconds == 0.02
    assert timing.wire_seconds == pytest.approx(1.0 - 0.9)
    assert timing.queue_seconds == pytest.approx(0.2)
    assert timing.compute_seconds == pytest.approx(0.6)
    assert timing.worker_codec_seconds == pytest.approx(0.9 - 0.2 - 0.6)


def test_a_worker_without_the_metadata_counts_all_as_wire() -> None:
    timing = call_timing([RankCall(1.0, 1.25, ())], client_seconds=0.0)
    assert timing.wire_seconds == pytest.approx(0.25)
    assert timing.queue_seconds == timing.compute_seconds == timing.worker_codec_seconds == 0.0


def test_a_call_that_never_came_back_has_only_client_time() -> None:
    timing = call_timing([RankCall(1.0, None, ())], client_seconds=0.01)
    assert timing == StepTiming(client_seconds=0.01, calls=1)


def test_the_clock_sums_the_calls_of_a_step_and_closes_it_at_the_step() -> None:
    clock = StepClock()
    one = StepTiming(client_seconds=1.0, wire_seconds=2.0, compute_seconds=3.0, calls=1)
    clock.add(one)
    assert clock.last is None  # no step has finished
    clock.add(one, step_done=True)
    assert clock.last == StepTiming(client_seconds=2.0, wire_seconds=4.0, compute_seconds=6.0, calls=2)
    clock.add(one, step_done=True)  # the next step starts from zero
    assert clock.last == one
    assert clock.last.describe() == (
        "1 calls, ms: client 1000.0, wire 2000.0, queue 0.0, compute 3000.0, worker codec 0.0, merge 0.0"
    )
