"""A failure on one rank after the ranks agreed to run a call (an out-of-memory error in backward,
an unexpected error while rank 0 writes a checkpoint) never leaves a peer waiting in a collective
until the process-group timeout, and never shifts later collectives.

The failure is injected by the worker's test hook (twinkle_worker.fault_hook.FAULT_HOOK_ENV: a file
naming the point and the rank), which raises a MemoryError there, as an OOM would.

- In DDP's backward: the ranks vote after the backward, before any gradient collective, so both
  answer within seconds (not at the 60 s timeout), the window's gradients are discarded on both
  and the error says so; the window's micro-batches sent again then train exactly like a run
  that never failed.
- While rank 0 writes a checkpoint: every rank learns it in the save's confirmation, rank 1
  answers ABORTED naming rank 0, and the mesh stays paired and trains and saves on.
- Under FSDP2 a rank that fails in backward leaves its peer inside a collective, which fails at
  the process-group timeout (5 s here): both ranks then say the mesh is broken and refuse every
  call ("re-initialise") until Reset and Init.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from reliability_support import batch, forward_request, start_workers, tiny_config

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import Aborted
from twinkle_protocol.mesh import DeviceMesh
from twinkle_worker.fault_hook import FAULT_HOOK_ENV

TIMEOUT_SECONDS = 60
ANSWER_SECONDS = 20  # generous on 2 shared cores, a third of the process-group timeout
GAS = 2


@pytest.fixture
def faulty(tmp_path: pathlib.Path) -> Iterator[tuple[LocalWorkers, pathlib.Path]]:
    fault = tmp_path / "fault"
    workers = start_workers(2, tmp_path, env={FAULT_HOOK_ENV: str(fault)})
    try:
        yield workers, fault
    finally:
        workers.close()


def _client(workers: LocalWorkers, timeout: float = TIMEOUT_SECONDS, **kwargs: Any) -> TransformersModel:
    model = TransformersModel(
        addresses=workers.addresses,
        config=tiny_config(),
        device_mesh=kwargs.pop("device_mesh", DeviceMesh.from_sizes(dp_size=2)),
        mixed_precision="no",
        seed=0,
        rendezvous_timeout=timeout,
        **kwargs,
    )
    model.set_optimizer("AdamW", lr=1e-2)
    return model


def _outcomes(model: TransformersModel, method: str, requests: list[Any]) -> tuple[list[Any], float]:
    started = time.monotonic()
    calls = model.coordinator.submit(method, requests)
    errors = [call.outcome.exception(timeout=TIMEOUT_SECONDS * 3) for call in calls]
    return errors, time.monotonic() - started


def _window(model: TransformersModel) -> tuple[float, float]:
    model.forward_backward(batch(0, rows=4), gradient_accumulation_steps=GAS)
    model.forward_backward(batch(1, rows=4), gradient_accumulation_steps=GAS)
    step = model.clip_grad_and_step(max_grad_norm=1.0)
    assert step["applied"] and step["micro_step"] == GAS, step
    return float(step["grad_norm"]), model.forward_only(batch(2, rows=4))["loss"]


def test_an_oom_in_ddp_backward_on_one_rank_fails_both_at_once(faulty: tuple[LocalWorkers, pathlib.Path]) -> None:
    workers, fault = faulty
    model = _client(workers)
    try:
        clean = _window(model)
    finally:
        model.close()
    model = _client(workers)
    try:
        model.forward_backward(batch(0, rows=4), gradient_accumulation_steps=GAS)  # micro-batch 1 of the window
        fault.write_text("backward 1")
        request = forward_request(batch(1), gradient_accumulation_steps=GAS)
        errors, took = _outcomes(model, "ForwardBackward", [request, request])
        fault.unlink()
        assert took < ANSWER_SECONDS, took
        assert errors[1] is not None and errors[1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, errors[1]
        assert errors[0] is not None and errors[0].code() == grpc.StatusCode.ABORTED, errors[0]
        assert "failed on rank(s) [1]" in errors[0].details()
        for error in errors:  # neither pretends nothing changed
            assert "gradients were discarded (micro_step back to 0)" in error.details(), error.details()
        assert "micro_step: 0" in model.get_train_configs()
        # The window sent again trains exactly like the run that never failed.
        assert _window(model) == pytest.approx(clean, rel=1e-6)
    finally:
        model.close()


def test_an_unexpected_error_on_rank_0_during_save_keeps_the_mesh_paired(
    faulty: tuple[LocalWorkers, pathlib.Path],
) -> None:
    workers, fault = faulty
    model = _client(workers)
    try:
        model.forward_backward(batch(0, rows=4))
        model.clip_grad_and_step()
        fault.write_text("write_checkpoint 0")
        save = worker_pb2.SaveRequest(name="faulty-save", save_optimizer=True)
        errors, took = _outcomes(model, "Save", [save, save])
        fault.unlink()
        assert took < ANSWER_SECONDS, took
        assert errors[0] is not None and "test fault at write_checkpoint on rank 0" in errors[0].details()
        assert errors[1] is not None and errors[1].code() == grpc.StatusCode.ABORTED, errors[1]
        assert "save failed on rank(s) [0]" in errors[1].details()
        # The collectives are still paired: the mesh trains and saves on.
        model.forward_backward(batch(1, rows=4))
        assert model.clip_grad_and_step()["optimizer_step"] == 2
        assert model.save("after-fault", save_optimizer=True).endswith("after-fault")
    finally:
        model.close()


def test_a_rank_left_in_a_collective_marks_the_mesh_broken(faulty: tuple[LocalWorkers, pathlib.Path]) -> None:
    workers, fault = faulty
    model = _client(workers, timeout=5, device_mesh=DeviceMesh.from_sizes(fsdp_size=2), strategy="native_fsdp")
    try:
        model.forward_backward(batch(0, rows=4))
        fault.write_text("backward 1")
        errors, _ = _outcomes(model, "ForwardBackward", [forward_request(batch(1)), forward_request(batch(2))])
        fault.unlink()
        for rank, error in enumerate(errors):
            assert error is not None and error.code() == grpc.StatusCode.ABORTED, (rank, error)
            assert "re-initialise" in error.details(), (rank, error.details())
        # Nothing runs on a broken mesh until Reset and Init, not even a local call.
        with pytest.raises(Aborted, match="re-initialise"):
            model.forward_only(batch(3, rows=4))
        with pytest.raises(Aborted, match="re-initialise"):
            model.set_optimizer("AdamW", lr=1e-3)
    finally:
        model.close()
    model = _client(workers)  # the same workers, re-initialised
    try:
        model.forward_backward(batch(4, rows=4))
        assert model.clip_grad_and_step()["applied"]
    finally:
        model.close()
