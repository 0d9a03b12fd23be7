"""Dead ranks: kill -9 one worker of a 2-rank DDP mesh in the middle of training. The client gets an
error naming the dead rank within a bounded time, the survivor leaves its process group and is
re-initialised, and after restarting the dead worker and resuming from the last checkpoint the
run's losses equal those of an uninterrupted run (same seed, data order from consumed samples).

Dedicated worker processes: this test kills one.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import numpy as np
import pytest
from reliability_support import VOCAB, start_workers, stub, tiny_config

from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import TwinkleError
from twinkle_protocol.mesh import DeviceMesh

STEPS, CHECKPOINT_AT, BATCH, SEQ = 6, 3, 4, 12
RETRY_SECONDS, GRACE_SECONDS = 2.0, 5.0
# fp32 on CPU: the resumed run repeats the same operations on the same values.
RTOL = 1e-6


def sample(index: int) -> dict[str, list[int]]:
    """Sample `index` of an endless deterministic data set."""
    ids = np.random.RandomState(1000 + index).randint(0, VOCAB, SEQ).tolist()
    return {"input_ids": ids, "labels": ids}


def client(addresses: list[str]) -> TransformersModel:
    model = TransformersModel(
        addresses=addresses,
        config=tiny_config(),
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        mixed_precision="no",
        seed=7,
        rendezvous_timeout=60,
        retry_seconds=RETRY_SECONDS,
        abort_grace_seconds=GRACE_SECONDS,
    )
    model.add_adapter_to_model("sft", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=2, num_training_steps=STEPS, adapter_name="sft")
    return model


def train_step(model: TransformersModel, consumed: int) -> tuple[float, float]:
    out = model.forward_backward([sample(consumed + i) for i in range(BATCH)], adapter_name="sft")
    step = model.clip_grad_and_step(max_grad_norm=1.0, adapter_name="sft")
    return out["loss"], step["grad_norm"]


def test_killed_rank_is_reported_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path: pathlib.Path) -> None:
    workers = start_workers(2, tmp_path)
    replacement = None
    try:
        reference = client(workers.addresses)
        expected = [train_step(reference, step * BATCH) for step in range(STEPS)]
        reference.close()

        model = client(workers.addresses)
        for step in range(CHECKPOINT_AT):
            train_step(model, step * BATCH)
        checkpoint = model.save(
            "last", adapter_name="sft", save_optimizer=True, consumed_train_samples=CHECKPOINT_AT * BATCH
        )
        train_step(model, CHECKPOINT_AT * BATCH)

        # Kill rank 1 while the next micro-batch is on its way, then keep training until the error.
        pending = model.forward_backward_async([sample(100 + i) for i in range(BATCH)], adapter_name="sft")
        workers.processes[1].kill()
        killed = time.monotonic()
        error = _first_error(model, pending)
        waited = time.monotonic() - killed
        assert "rank 1" in str(error) and workers.addresses[1] in str(error), error
        assert waited < RETRY_SECONDS + GRACE_SECONDS + 10, waited  # bounded: not the 60 s collective timeout
        model.close()  # Resets the survivor (the dead rank's Reset fails quietly)

        survivor = stub(workers.addresses[0], model.coordinator.security)
        status = survivor.GetStatus(worker_pb2.GetStatusRequest(), timeout=30)
        assert not status.initialized and status.session_id == ""  # it left its process group

        replacement = start_workers(1, tmp_path / "replacement", output_root=tmp_path / "out")
        model = client([workers.addresses[0], replacement.addresses[0]])
        try:
            state = model.resume_from_checkpoint(checkpoint, adapter_name="sft")
            assert state == {
                "cur_step": CHECKPOINT_AT,
                "consumed_train_samples": CHECKPOINT_AT * BATCH,
                "gradient_accumulation_steps": 1,
            }
            consumed = state["consumed_train_samples"]
            resumed = []
            for _ in range(CHECKPOINT_AT, STEPS):
                resumed.append(train_step(model, consumed))
                consumed += BATCH
        finally:
            model.close()
        np.testing.assert_allclose(np.array(resumed), np.array(expected[CHECKPOINT_AT:]), rtol=RTOL)
    finally:
        workers.close()
        if replacement is not None:
            replacement.close()


def _first_error(model: TransformersModel, pending: Any) -> TwinkleError:
    """The error of the pending call, or of the next ones if that call finished before the kill."""
    try:
        pending.result()
    except TwinkleError as error:
        return error
    for index in range(3):
        try:
            model.forward_backward([sample(200 + index + i) for i in range(BATCH)], adapter_name="sft")
        except TwinkleError as error:
            return error
    pytest.fail("training went on with a dead rank")
