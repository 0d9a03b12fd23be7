"""The end-of-window agreement of ClipGradAndStep, which also carries the window's token count
(one round trip instead of a vote plus an all_reduce): a refusal on one rank still fails every
rank before any gradient changes, and the retried step equals a step that never saw a refusal.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from reliability_support import batch, connect

from twinkle_client.local import LocalWorkers
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument, NotFound
from twinkle_protocol.mesh import DeviceMesh

ADAPTER = "a"


def _data() -> dict[str, np.ndarray]:
    """4 rows: rank 0 gets rows 0-1 (16 label tokens), rank 1 rows 2-3 (11), so a token count
    missing from either rank would change the normalised gradient."""
    data = batch(3, rows=4)
    data["labels"][2, :5] = -100
    return data


def _one_step(pool: LocalWorkers, refuse_first: bool) -> tuple[float, float]:
    model = connect(pool, device_mesh=DeviceMesh.from_sizes(dp_size=2), rendezvous_timeout=60)
    try:
        model.add_adapter_to_model(ADAPTER, {"r": 4, "target_modules": "all-linear"})
        model.set_optimizer("AdamW", lr=1e-2, adapter_name=ADAPTER)
        assert model.forward_backward(_data(), adapter_name=ADAPTER)["num_tokens"] == 27
        if refuse_first:
            good = worker_pb2.ClipGradAndStepRequest(max_grad_norm=1.0, adapter_name=ADAPTER)
            # Refused inside the model (an unknown adapter), at the vote that also carries the token count.
            bad = worker_pb2.ClipGradAndStepRequest(max_grad_norm=1.0, adapter_name="missing")
            calls = model.coordinator.submit("ClipGradAndStep", [good, bad])
            with pytest.raises(NotFound, match=r"rank 1 .*missing"):
                model.coordinator.gather("ClipGradAndStep", calls)
            rank0: Any = calls[0].outcome.exception(timeout=30)
            assert rank0 is not None and rank0.code() == grpc.StatusCode.ABORTED
            assert "rank(s) [1] refused this call" in rank0.details()
        step = model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=ADAPTER)
        assert step["optimizer_step"] == 1
        loss_after = model.forward_only(_data(), adapter_name=ADAPTER)["loss"]
        return float(step["grad_norm"]), float(loss_after)
    finally:
        model.close()


def test_a_step_refused_on_one_rank_changes_nothing(two_workers: LocalWorkers) -> None:
    clean_norm, clean_loss = _one_step(two_workers, refuse_first=False)
    norm, loss = _one_step(two_workers, refuse_first=True)
    # Same seed, data and arithmetic on both runs: fp32 sums in the same order give the same bits,
    # but allow 1e-6 for a kernel that picks its reduction order at run time.
    assert norm == pytest.approx(clean_norm, rel=1e-6) and clean_norm > 0
    assert loss == pytest.approx(clean_loss, rel=1e-6)


def test_a_request_field_refused_on_one_rank_does_not_strand_the_other(two_workers: LocalWorkers) -> None:
    """The servicer's own field checks run inside the agreement too: rank 0 hears of rank 1's refusal at once."""
    model = connect(two_workers, device_mesh=DeviceMesh.from_sizes(dp_size=2), rendezvous_timeout=60)
    try:
        model.set_optimizer("AdamW", lr=1e-2)
        model.forward_backward(_data())
        good = worker_pb2.ClipGradAndStepRequest(max_grad_norm=1.0)
        bad = worker_pb2.ClipGradAndStepRequest(max_grad_norm=1.0, norm_type=-1.0)
        calls = model.coordinator.submit("ClipGradAndStep", [good, bad])
        with pytest.raises(InvalidArgument, match=r"rank 1 .*norm_type must be > 0"):
            model.coordinator.gather("ClipGradAndStep", calls)
        rank0: Any = calls[0].outcome.exception(timeout=30)  # well before the 60 s rendezvous timeout
        assert rank0 is not None and rank0.code() == grpc.StatusCode.ABORTED
        assert "rank(s) [1] refused this call" in rank0.details()
        assert model.clip_grad_and_step(max_grad_norm=1.0)["optimizer_step"] == 1  # nothing changed; it still steps
    finally:
        model.close()
