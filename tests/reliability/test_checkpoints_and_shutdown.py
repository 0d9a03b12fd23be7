"""Atomic checkpoints and graceful shutdown.

- A worker killed in the middle of a save (held there by the TWINKLE_TEST_PAUSE_IN_SAVE hook:
  no sleeps) leaves the previous checkpoint complete and loadable, and no directory that load
  or resume would accept; the next save sweeps the leftovers.
- A checkpoint whose files do not match its manifest is refused with an error naming the file.
- SIGTERM lets the call in progress finish, refuses new calls with UNAVAILABLE and exits 0.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import signal
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_support import SavePause, batch, code_of, connect, in_thread, start_workers, stub

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import FailedPrecondition, TwinkleError
from twinkle_worker import checkpoint as ckpt

Code = grpc.StatusCode


def digests(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def trained(pool: LocalWorkers, steps: int = 1, **kwargs: Any) -> TransformersModel:
    model = connect(pool, **kwargs)
    model.add_adapter_to_model("sft", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    for step in range(steps):
        model.forward_backward(batch(step), adapter_name="sft")
        model.clip_grad_and_step(adapter_name="sft")
    return model


def test_a_worker_killed_mid_save_leaves_the_previous_checkpoint_whole(
    hooked_worker: tuple[LocalWorkers, SavePause], tmp_path: pathlib.Path
) -> None:
    workers, pause = hooked_worker
    root = tmp_path / "out"
    model = trained(workers, retry_seconds=1.0)
    path = pathlib.Path(model.save("ckpt", adapter_name="sft", save_optimizer=True, consumed_train_samples=2))
    before = digests(path)
    model.forward_backward(batch(5), adapter_name="sft")
    model.clip_grad_and_step(adapter_name="sft")

    pause.arm()  # the next save stops after writing every file, before it swaps the directory in
    saver, outcome = in_thread(lambda: model.save("ckpt", adapter_name="sft", save_optimizer=True))
    pause.wait_paused()
    half = [p for p in (root / "output").iterdir() if p.name.startswith(".ckpt.tmp-")]  # save()'s default dir
    assert len(half) == 1 and not (half[0] / ckpt.MANIFEST).is_file()  # files written, manifest not yet
    workers.processes[0].kill()
    workers.processes[0].wait()
    saver.join(60)
    assert outcome and isinstance(outcome[0], TwinkleError), outcome
    model.close()

    assert digests(path) == before  # the previous checkpoint, byte for byte
    ckpt.verify_manifest(path)
    with start_workers(1, tmp_path / "restarted", output_root=root) as restarted:
        model = connect(restarted)
        try:
            model.add_adapter_to_model("sft", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
            model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
            state = model.resume_from_checkpoint("ckpt", adapter_name="sft")
            assert state["cur_step"] == 1 and state["consumed_train_samples"] == 2
            with pytest.raises(FailedPrecondition, match="hidden|tmp|manifest"):  # the leftover is never a checkpoint
                model.load(half[0].name, adapter_name="sft")
            model.save("other", adapter_name="sft")  # a save in the same directory sweeps the dead save's leftovers
            assert not half[0].exists()
        finally:
            model.close()


def test_resume_refuses_a_checkpoint_whose_files_do_not_match_its_manifest(
    one_worker: LocalWorkers, output_root: pathlib.Path
) -> None:
    stub(one_worker.addresses[0]).Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    model = trained(one_worker)
    try:
        path = pathlib.Path(model.save("damaged", adapter_name="sft", save_optimizer=True))
        weights = model.export_weights(adapter_name="sft")
        damages = {
            "sha256": lambda: _flip_last_byte(path / ckpt.ADAPTER_WEIGHTS),
            "bytes": lambda: (path / ckpt.OPTIMIZER_FILE).write_bytes((path / ckpt.OPTIMIZER_FILE).read_bytes()[:-10]),
            "missing": lambda: (path / ckpt.RNG_FILE).unlink(),
            "manifest.json": lambda: (path / ckpt.MANIFEST).unlink(),
        }
        pristine = output_root / ".pristine-copy"
        shutil.copytree(path, pristine)
        for expected, damage in damages.items():
            shutil.rmtree(path)
            shutil.copytree(pristine, path)
            damage()
            with pytest.raises(FailedPrecondition, match=rf"rank 0 .*{expected}"):
                model.resume_from_checkpoint("damaged", adapter_name="sft")
            with pytest.raises(FailedPrecondition, match=expected):
                model.load("damaged", adapter_name="sft")
        after = model.export_weights(adapter_name="sft")
        assert all((after[key] == weights[key]).all() for key in weights)  # nothing was loaded
    finally:
        model.close()


def _flip_last_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sigterm_finishes_the_call_in_progress_refuses_new_ones_and_exits_0(
    hooked_worker: tuple[LocalWorkers, SavePause],
) -> None:
    workers, pause = hooked_worker
    process = workers.processes[0]
    model = trained(workers)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(workers.addresses[0]))
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)  # status changes, as they happen
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    pause.arm()
    saver, outcome = in_thread(lambda: model.save("at-shutdown", adapter_name="sft", save_optimizer=True))
    pause.wait_paused()  # the save is in progress on the worker
    process.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # the worker is draining

    # New calls are refused: on a new connection (the port is closed) and on the open one.
    for worker in (stub(workers.addresses[0], model.coordinator.security), model.coordinator.stubs[0]):
        request = worker_pb2.GetStatusRequest()
        code, details = code_of(
            lambda w=worker, r=request: w.GetStatus(r, metadata=model.coordinator.metadata, timeout=10)
        )
        assert code == Code.UNAVAILABLE, details
    assert saver.is_alive()  # still held: SIGTERM did not cut it short

    pause.release()
    saver.join(60)
    assert outcome and isinstance(outcome[0], str) and outcome[0].endswith("at-shutdown"), outcome
    ckpt.verify_manifest(pathlib.Path(outcome[0]))
    assert process.wait(timeout=60) == 0
    assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))[0] == Code.UNAVAILABLE
