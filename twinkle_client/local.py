"""Embedded default: start N local worker processes (one per rank), wait until they serve, stop them at exit.

The workers exit on their own within seconds when this process dies, however it dies (they watch
their stdin pipe: --exit-with-parent). Their logs go to a temporary directory that close() removes,
unless a worker failed (then it is kept, and errors and a warning name it).

Used by TransformersModel when no cluster is configured, by scripts/launch_workers.py and by tests.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinkle_client.coordinator import wait_ready
from twinkle_protocol.errors import Unavailable
from twinkle_protocol.security import ChannelSecurity

LISTENING = "twinkle-worker listening on "


def wait_serving(address: str, timeout: float, security: ChannelSecurity | None = None) -> None:
    """Blocks until the worker's health service answers SERVING (or raises Unavailable).

    The health service needs no token; with TLS, `security` holds the certificates to reach it.
    """
    with (security or ChannelSecurity()).channel(address) as channel:
        try:
            if not wait_ready(channel, timeout):
                raise Unavailable(f"worker {address} did not accept a connection within {timeout:.0f} s")
            request = health_pb2.HealthCheckRequest(service="")
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as error:
            raise Unavailable(f"worker {address} did not become ready within {timeout:.0f} s: {error}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unavailable(f"worker {address} is not serving (health status {reply.status})")


class LocalWorkers:
    """N `python -m twinkle_worker` processes on 127.0.0.1, on free ports, logging into log_dir."""

    def __init__(
        self,
        count: int,
        device: str = "cpu",
        output_root: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        start_timeout: float = 120.0,
        extra_args: list[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        security: ChannelSecurity | None = None,
        host: str = "127.0.0.1",
        base_port: int | None = None,
    ) -> None:
        """extra_args go to every worker's command line (e.g. ["--token-file", path, "--tls-cert", ...]),
        env into its environment (e.g. {"TWINKLE_WORKER_TOKEN": token}); `security` is how to reach
        the health service when the workers serve TLS. Rank i listens on `host`, port base_port + i
        (twinkle-launch), or on a free port when base_port is None."""
        self._own_log_dir = log_dir is None  # a temporary one: removed at close unless a worker failed
        self.log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix="twinkle-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.output_root = str(pathlib.Path(output_root or os.getcwd()).resolve())
        threads = threads or max(1, (os.cpu_count() or 1) // count)
        self.extra_env = dict(env or {})
        self.host, self.base_port = host, base_port
        self.processes: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        self._closed = False
        self._keep_logs = False
        atexit.register(self.close)
        try:
            for rank in range(count):
                self.processes.append(self._spawn(rank, device, threads, extra_args or []))
            deadline = time.monotonic() + start_timeout
            for rank, process in enumerate(self.processes):
                self.addresses.append(self._read_address(rank, process, deadline))
            for address in self.addresses:
                wait_serving(address, max(1.0, deadline - time.monotonic()), security)
        except BaseException:
            self.close()
            raise

    def _spawn(self, rank: int, device: str, threads: int, extra_args: list[str]) -> subprocess.Popen[str]:
        log = open(self.log_dir / f"worker-{rank}.log", "w")  # noqa: SIM115 - owned by the process
        command = [
            sys.executable, "-m", "twinkle_worker",
            "--host", self.host, "--port", str(self.base_port + rank if self.base_port else 0),
            "--device", device if device != "cuda" else f"cuda:{rank}",
            "--output-root", self.output_root,
            "--threads", str(threads),
            "--placement", "none",  # the client assigns the ranks, whatever torchrun or Slurm variables are set
            "--exit-with-parent",
            *extra_args,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        # stdin: a pipe whose write end only this process holds; when it dies (however), the worker
        # reads end-of-file and exits (--exit-with-parent).
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE, text=True, env=env)

    def _read_address(self, rank: int, process: subprocess.Popen[str], deadline: float) -> str:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(timeout=remaining):
                    raise Unavailable(f"local worker rank {rank} did not start in time; log: {self._log_tail(rank)}")
                line = process.stdout.readline()
                if not line:
                    raise Unavailable(
                        f"local worker rank {rank} exited with {process.wait()}; log: {self._log_tail(rank)}"
                    )
                if line.startswith(LISTENING):
                    threading.Thread(target=_drain, args=(process,), daemon=True).start()
                    return line[len(LISTENING) :].strip()
        finally:
            selector.close()

    def _log_tail(self, rank: int) -> str:
        path = self.log_dir / f"worker-{rank}.log"
        tail = path.read_text()[-2000:] if path.exists() else "(no log)"
        self._keep_logs = True
        return f"{path} (kept), ending: {tail}"

    def close(self) -> None:
        """Stops every worker: SIGTERM, then SIGKILL after 10 s. The temporary log directory is
        removed, unless a worker failed: then it is kept, and a warning names it."""
        if self._closed:
            return
        self._closed = True
        failed = [rank for rank, process in enumerate(self.processes) if process.poll() not in (None, 0)]
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for rank, process in enumerate(self.processes):
            try:
                if process.wait(timeout=10) != 0:
                    failed.append(rank)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                failed.append(rank)
            if process.stdin is not None:
                process.stdin.close()
        atexit.unregister(self.close)
        if failed or self._keep_logs:
            if failed:
                warnings.warn(
                    f"local worker rank(s) {sorted(set(failed))} failed; their logs are kept in {self.log_dir}",
                    stacklevel=2,
                )
        elif self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    for _ in process.stdout:
        pass
