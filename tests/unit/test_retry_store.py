"""The retry store of twinkle_worker.session.Ledger: what a retry of a finished call gets back.

A Ledger is plain Python (the servicer hands it futures), so it is driven directly: calls are
admitted in sequence, their futures resolved with outcomes of chosen sizes, and a retry (the
same number again) must return the stored outcome without running anything.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch

from twinkle_protocol.errors import FailedPrecondition
from twinkle_worker import session

SESSION = "owner"


def _ledger() -> session.Ledger:
    ledger = session.Ledger(lease_seconds=0)
    ledger.claim(SESSION, 1, initialised=False)
    return ledger


def _finish(ledger: session.Ledger, number: int, outcome: Any) -> None:
    future: Future[Any] = Future()
    assert ledger.admit(SESSION, number, lambda: future, 1.0) is future
    future.set_result(outcome)


def _retry(ledger: session.Ledger, number: int) -> Any:
    def never() -> Future[Any]:
        raise AssertionError(f"call {number} ran again")

    return ledger.admit(SESSION, number, never, 1.0).result()


def test_one_large_outcome_does_not_evict_the_small_ones() -> None:
    ledger = _ledger()
    _finish(ledger, 1, "init")
    for number in range(2, 10):  # e.g. optimizer steps: a few bytes each
        _finish(ledger, number, {"step": number})
    big = np.zeros(session.MAX_KEPT_BYTES // 4 + 1, dtype=np.float32)  # alone over the byte bound
    _finish(ledger, 10, (big,))
    assert _retry(ledger, 10)[0] is big  # the newest is kept, however large
    assert [_retry(ledger, number) for number in range(2, 10)] == [{"step": n} for n in range(2, 10)]
    _finish(ledger, 11, {"step": 11})  # now the large one is the first to go
    with pytest.raises(FailedPrecondition, match="no longer kept"):
        _retry(ledger, 10)
    assert _retry(ledger, 2) == {"step": 2} and _retry(ledger, 11) == {"step": 11}


def test_the_count_bound_drops_the_oldest() -> None:
    ledger = _ledger()
    for number in range(1, session.MAX_KEPT + 3):
        _finish(ledger, number, number)
    with pytest.raises(FailedPrecondition, match="no longer kept"):
        _retry(ledger, 2)
    assert _retry(ledger, session.MAX_KEPT + 2) == session.MAX_KEPT + 2


def test_stored_tensors_are_host_copies() -> None:
    ledger = _ledger()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logps = torch.ones(3, 4, device=device, requires_grad=True) * 2
    _finish(ledger, 1, ("response", {"logps": logps}))
    stored = _retry(ledger, 1)[1]["logps"]
    assert stored.device.type == "cpu" and not stored.requires_grad
    assert torch.equal(stored, torch.full((3, 4), 2.0))
