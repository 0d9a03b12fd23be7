"""Callers without the token, or from a session that does not own the worker, cost it almost nothing.

- 64 such callers (hammer.py, its own process) open streams whose header declares 16 MiB and
  then send nothing, or send 12 MiB unary requests: the worker's peak RSS (VmHWM, /proc) grows
  by a few MiB at most, and the owner's calls keep their latency (median within a few x of the
  quiet median, no call past its deadline).
- A call that sends nothing (a stream after its header, a unary call before its message) is
  cancelled after --receive-timeout-seconds with DEADLINE_EXCEEDED naming the flag, so 40 of
  them (more than the worker's 32 handler threads) do not starve the owner.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
from reliability_support import batch, connect, start_workers

from twinkle_client.model import TransformersModel
from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2

HAMMER = pathlib.Path(__file__).with_name("hammer.py")
SERVICE = "/twinkle.worker.v1.WorkerService/"
MiB = 1 << 20
# Handler threads, glibc arenas and 1 MiB flow-control windows for 64 refused callers: measured
# +6.5-8 MiB; the unfixed worker allocated every declared stream (+512 MiB) and read every unary one.
PEAK_RSS_BOUND = 32 * MiB
OWNER_TIMEOUT = 30.0
CALLS = 10


def peak_rss(pid: int) -> int:
    """Peak resident set size of a process since it started (VmHWM)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def latencies(model: TransformersModel, count: int = CALLS) -> list[float]:
    """Seconds per forward_only of a small batch."""
    sample, seconds = batch(0), []
    for _ in range(count):
        started = time.monotonic()
        model.forward_only(sample)
        seconds.append(time.monotonic() - started)
    return seconds


def test_unauthorised_callers_neither_fill_memory_nor_starve_the_owner(tmp_path: pathlib.Path) -> None:
    token = secrets.token_urlsafe(16)
    workers = start_workers(1, tmp_path, env={"TWINKLE_WORKER_TOKEN": token})
    hammer = None
    try:
        model = connect(workers, token=token, timeout=120.0)
        latencies(model, 3)  # warm up: the worker's own peak of serving these calls
        model.coordinator.timeout = OWNER_TIMEOUT
        quiet = latencies(model)
        pid = workers.processes[0].pid
        before = peak_rss(pid)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        hammer = subprocess.Popen(
            [sys.executable, str(HAMMER), workers.addresses[0], token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert hammer.stdout is not None and hammer.stdin is not None
        assert hammer.stdout.readline().strip() == "hammering"
        hammered = latencies(model)  # a call past OWNER_TIMEOUT raises DeadlineExceeded
        grown = peak_rss(pid) - before
        hammer.stdin.close()
        summary = hammer.stdout.readline()
        assert hammer.wait(60) == 0
        assert "UNAUTHENTICATED" in summary and "FAILED_PRECONDITION" in summary, summary
        assert grown < PEAK_RSS_BOUND, f"the worker's peak RSS grew by {grown / MiB:.0f} MiB"
        assert statistics.median(hammered) < 5 * statistics.median(quiet) + 1.0, (quiet, hammered)
        model.close()
    finally:
        if hammer is not None and hammer.poll() is None:
            hammer.kill()
            hammer.wait()
        workers.close()


def _silent_after(first: bytes | None, finished: threading.Event) -> Iterator[bytes]:
    if first is not None:
        yield first
    finished.wait()


def test_a_call_that_sends_nothing_is_cancelled_after_the_receive_deadline(tmp_path: pathlib.Path) -> None:
    workers = start_workers(1, tmp_path, extra_args=["--receive-timeout-seconds", "3"])
    finished = threading.Event()
    try:
        model = connect(workers, timeout=120.0)
        channel = grpc.insecure_channel(workers.addresses[0])
        number = model.status()[0].last_sequence_number + 100  # the owner's session, a number it may yet use
        header = worker_pb2.ForwardBackwardRequest()
        header.context.session_id, header.context.sequence_number = model.session_id, number
        tensors.encode_header(np.zeros((2, 8), np.int64), header.inputs.tensors["input_ids"])
        first = worker_pb2.ForwardBackwardStreamRequest(header=header).SerializeToString()
        stream = channel.stream_stream(SERVICE + "ForwardBackwardStream")
        unary = channel.stream_unary(SERVICE + "ForwardBackward")  # a unary call whose message never comes
        streams = [stream(_silent_after(first, finished), timeout=120) for _ in range(36)]
        unaries = [unary.future(_silent_after(None, finished), timeout=120) for _ in range(4)]
        started = time.monotonic()
        assert model.forward_only(batch(1))["num_tokens"] == 16  # a thread frees within the deadline
        waits = [lambda call=call: list(call) for call in streams] + [call.result for call in unaries]
        for wait in waits:
            try:
                wait()
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                assert "--receive-timeout-seconds" in (error.details() or ""), error.details()
            else:
                raise AssertionError("a call that sent nothing succeeded")
        assert time.monotonic() - started < 60
        assert model.forward_only(batch(1))["num_tokens"] == 16  # the owner's sequence has no gap
        model.close()
    finally:
        finished.set()
        workers.close()
