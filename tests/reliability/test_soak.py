"""Soak: a few hundred mixed calls from concurrent clients (training, streamed logits, saves,
cancelled calls, calls past their deadline, read-only pollers, an intruding second client),
after which the worker's memory is flat, every micro-batch ran exactly once, and every
checkpoint loads.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_support import batch, connect, forward_request, rss_bytes, stub

from twinkle_client.local import LocalWorkers
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import FailedPrecondition
from twinkle_worker import checkpoint as ckpt

ITERATIONS, WARM_UP = 60, 20
# Growth allowed between the end of the warm-up and the end: the allocator's arenas and the
# outcomes kept for retries (64 calls) settle during the warm-up; a leak of one logits tensor
# (8 x 32 x 256 floats = 256 KiB) per call would add 10 MiB over the 40 measured iterations,
# a leaked micro-batch graph far more.
RSS_TOLERANCE = 8 << 20


def test_mixed_concurrent_calls_leave_memory_flat_and_every_checkpoint_loadable(one_worker: LocalWorkers) -> None:
    workers = one_worker
    stub(workers.addresses[0]).Reset(worker_pb2.ResetRequest(force=True), timeout=120)
    pid = workers.processes[0].pid
    owner = connect(workers)
    try:
        _soak(owner, workers, pid)
    finally:
        owner.close()


def _soak(owner: Any, workers: LocalWorkers, pid: int) -> None:
    owner.add_adapter_to_model("sft", {"r": 4, "target_modules": "all-linear"})
    owner.set_optimizer("AdamW", lr=1e-3, adapter_name="sft")
    stop = threading.Event()
    counts: dict[str, int] = {}
    problems: list[str] = []
    pollers = [
        threading.Thread(target=_poll, args=(workers.addresses[0], owner, stop, counts, problems), daemon=True),
        threading.Thread(target=_intrude, args=(workers, stop, counts, problems), daemon=True),
    ]
    for thread in pollers:
        thread.start()
    forwards, saved, warm = 0, [], 0
    try:
        for step in range(ITERATIONS):
            arrays = batch(step, rows=8, length=32)
            if step % 7 == 3:  # past its deadline before it is even sent: resent before the next call
                late = owner.coordinator.submit(
                    "ForwardBackward", [forward_request(arrays, adapter_name="sft")], timeout=1e-6
                )
                with pytest.raises(Exception, match="(?i)deadline"):
                    owner.coordinator.gather("ForwardBackward", late)
                forwards += 1
            if step % 11 == 5:  # cancelled by the caller: resent before the next call
                owner.coordinator.submit("ForwardBackward", [forward_request(arrays, adapter_name="sft")])[0].cancel()
                forwards += 1
            owner.forward_backward(arrays, adapter_name="sft")
            forwards += 1
            owner.clip_grad_and_step(adapter_name="sft")
            if step % 3 == 0:  # logits come back as a stream
                assert owner.forward_only(arrays, adapter_name="sft", return_logits=True)["logits"].shape == (
                    8,
                    32,
                    256,
                )
            if step % 10 == 9:
                saved.append(owner.save(f"soak-{step}", adapter_name="sft", save_optimizer=True))
            if step == WARM_UP - 1:
                warm = rss_bytes(pid)
        end = rss_bytes(pid)
    finally:
        stop.set()
        for thread in pollers:
            thread.join(60)
    assert not problems, problems[:5]
    assert counts.get("polls", 0) >= 100 and counts.get("refused", 0) >= 20, counts
    assert f"micro_step: {forwards}" in owner.get_train_configs("sft")  # every micro-batch ran exactly once
    assert end - warm <= RSS_TOLERANCE, f"RSS grew by {(end - warm) / 2**20:.1f} MiB after the warm-up"
    for path in saved:
        ckpt.verify_manifest(pathlib.Path(path))
        owner.load(pathlib.Path(path).name, adapter_name="sft", load_optimizer=True)


def _poll(address: str, owner: Any, stop: threading.Event, counts: dict[str, int], problems: list[str]) -> None:
    """Read-only calls, some cancelled, some with a deadline too short to meet."""
    worker = stub(address)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    metadata = owner.coordinator.metadata
    index = 0
    while not stop.is_set() and index < 400:
        index += 1
        try:
            if index % 5 == 0:
                worker.GetStatus.future(worker_pb2.GetStatusRequest(), metadata=metadata).cancel()
            elif index % 7 == 0:
                try:
                    worker.GetTrainConfigs(
                        worker_pb2.GetTrainConfigsRequest(adapter_name="sft"), metadata=metadata, timeout=1e-4
                    )
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
            elif index % 3 == 0:
                assert (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            else:
                status = worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=metadata, timeout=30)
                assert status.session_id == owner.session_id
            counts["polls"] = counts.get("polls", 0) + 1
        except Exception as error:  # reported by the test
            problems.append(f"poll {index}: {error!r}")


def _intrude(workers: Any, stop: threading.Event, counts: dict[str, int], problems: list[str]) -> None:
    """A second client trying to drive the same worker: always refused, never interleaved."""
    intruder = stub(workers.addresses[0])
    index = 0
    while not stop.is_set() and index < 100:
        index += 1
        request = forward_request(batch(index), adapter_name="sft")
        request.context.session_id, request.context.sequence_number = "intruder", index
        try:
            intruder.ForwardBackward(request, timeout=30)
            problems.append(f"intruder call {index} was accepted")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                problems.append(f"intruder call {index}: {error.code()} {error.details()}")
            counts["refused"] = counts.get("refused", 0) + 1
    try:
        connect(workers)
        problems.append("a second client could Init")
    except FailedPrecondition:
        pass
