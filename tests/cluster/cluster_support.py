"""Helpers of the cluster tests: worker processes started with an engine's environment, and the training loop."""

from __future__ import annotations

import os
import pathlib
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twinkle_client.local import LISTENING, wait_serving

STEPS = 3
LR = 1e-3
START_TIMEOUT = 240.0
# Variables of the engines that twinkle_worker.placement reads: a test sets only the ones it means.
ENGINE_PREFIXES = ("SLURM_", "LWS_", "JOB", "TORCHELASTIC_", "POD_")
ENGINE_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_SERVICE_HOST",
                "REPLICATED_JOB_NAME", "REPLICATED_JOB_REPLICAS", "TWINKLE_CLUSTER")  # fmt: skip


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any engine variable, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ENGINE_NAMES and not key.startswith(ENGINE_PREFIXES)
    }
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun_env(rank: int) -> dict[str, str]:
    """What `torchrun --nproc-per-node 2` gives rank `rank` (MASTER_PORT is torchrun's store, unused here)."""
    return clean_environment(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "test",
        }
    )


def tls_workers_placed_by_flags(tmp_path: pathlib.Path, env: Mapping[str, str]) -> tuple[Any, int, list[WorkerProcess]]:
    """Two workers placed by flags (--rank, --world-size 2, --port-base), serving TLS with a throwaway CA's
    certificate, rank 1 started first: (the CA files, rank 0's port, the workers in start order)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "reliability"))
    from reliability_support import make_pki

    pki = make_pki(tmp_path)
    port = free_port_pair()
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-root-cert", str(pki.ca)]
    common = ["--host", "127.0.0.1", "--port-base", str(port), "--world-size", "2", "--master-addr", "127.0.0.1"]
    args = [*common, "--threads", "1", "--output-root", str(tmp_path), *tls]
    workers = [WorkerProcess([*args, "--rank", "1", "--local-rank", "1"], env, tmp_path / "rank1.log")]
    workers.append(WorkerProcess([*args, "--rank", "0"], env, tmp_path / "rank0.log"))
    return pki, port, workers


def loopback_up() -> None:
    """In a new network namespace: lo up, plus the address this host's name resolves to when that is not
    a loopback one (glibc, Slurm and Ray need the host's name to be a local address)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    address = socket.gethostbyname(socket.gethostname())
    extra = "10.254.0.1" if address.startswith("127.") else address
    subprocess.run(["ip", "addr", "add", f"{extra}/32", "dev", "lo"], check=True)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P + 1 both free right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


class WorkerProcess:
    """One `python -m twinkle_worker` with the given arguments and environment, logging to `log`."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: pathlib.Path) -> None:
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twinkle_worker", *args],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(env),
        )
        self.address = self._read_address(time.monotonic() + START_TIMEOUT)

    def _read_address(self, deadline: float) -> str:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(timeout=remaining):
                    raise TimeoutError(f"worker did not start in time; log: {self.log.read_text()[-2000:]}")
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker exited with {self.process.wait()}: {self.log.read_text()[-2000:]}")
                if line.startswith(LISTENING):
                    return line[len(LISTENING) :].strip()

    def wait_serving(self, timeout: float = 60.0) -> None:
        wait_serving(self.address, timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def train(model: Any, windows: Sequence[Sequence[Sequence[dict[str, Any]]]]) -> list[float]:
    """AdamW on the full model; forward_backward + clip_grad_and_step per micro-batch; the losses."""
    model.set_optimizer("AdamW", lr=LR)
    losses = []
    for window in windows:
        for batch in window:
            losses.append(model.forward_backward(batch)["loss"])
            model.clip_grad_and_step(max_grad_norm=1.0, gradient_accumulation_steps=len(window))
    return losses
