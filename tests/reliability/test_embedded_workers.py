"""Embedded workers (started by the client itself) never outlive it, and leave no logs behind.

- A training script killed with SIGKILL: its embedded workers (1 rank, and 2 ranks over gloo)
  are gone within EXIT_BOUND seconds, waited for on pidfds (no sleeps).
- close() removes the temporary log directory; when a worker failed, the directory is kept
  and the error names it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from reliability_support import tiny_config

from twinkle_client.local import LocalWorkers
from twinkle_protocol.errors import Unavailable

EXIT_BOUND = 30.0  # seconds; measured: 0.07 s after the kill (generous: shared cores)
CLIENT = """
import sys
from twinkle_protocol.mesh import DeviceMesh
from twinkle_client.model import TransformersModel

model = TransformersModel(
    config=sys.argv[2], device_mesh=DeviceMesh.from_sizes(dp_size=int(sys.argv[1])), mixed_precision="no", seed=0
)
print(model.local.log_dir, *(process.pid for process in model.local.processes), flush=True)
sys.stdin.read()  # a training loop, until it is killed
"""


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Waits (on pidfds) until every process has exited, at most timeout seconds; returns those still running."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    waiting = set(fds)
    try:
        while waiting and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(list(waiting), [], [], left)
            waiting -= set(readable)
        return [fds[fd] for fd in waiting]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("ranks", [1, 2])
def test_embedded_workers_exit_when_their_client_is_killed(ranks: int, tmp_path: pathlib.Path) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(ranks), tiny_config().to_json_string(use_diff=False)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert client.stdout is not None
    line = client.stdout.readline()
    logs, *numbers = line.split()
    pids = [int(number) for number in numbers]
    assert len(pids) == ranks, line
    client.kill()  # SIGKILL: no atexit, no finalizer, no close()
    client.wait()
    survivors = wait_gone(pids, EXIT_BOUND)
    for pid in survivors:  # leave nothing running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(logs)  # nobody was left to remove it (a killed client's logs are kept)
    assert not survivors, f"worker(s) {survivors} still running {EXIT_BOUND} s after their client was killed"


def test_the_temporary_log_directory_is_removed_at_close_unless_a_worker_failed() -> None:
    workers = LocalWorkers(1, threads=1)
    logs = workers.log_dir
    assert (logs / "worker-0.log").is_file()
    workers.close()
    assert not logs.exists()

    with pytest.raises(Unavailable) as failure:
        LocalWorkers(1, threads=1, extra_args=["--tls-cert", "missing.pem"])  # refused: --tls-key missing
    kept = [part for part in str(failure.value).split() if "twinkle-workers-" in part]
    assert kept, str(failure.value)
    log = pathlib.Path(kept[0])
    assert log.is_file()  # the failed worker's log is still there
    shutil.rmtree(log.parent)
