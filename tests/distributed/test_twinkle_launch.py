"""twinkle-launch: two workers on base-port and base-port + 1, reached through its printed cluster config.

The test launches the command, reads the addresses and the TWINKLE_CLUSTER line it prints
once every worker is serving, trains one step through `remote_group`, then sends SIGTERM
and checks the launcher forwarded it: the workers exit, then the launcher, with code 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from dist_reference import RTOL, SEED, Reference, make_samples, tiny_config

from twinkle_protocol.mesh import DeviceMesh

START_TIMEOUT = 240.0


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _read_until_config(process: subprocess.Popen[str], deadline: float) -> tuple[list[str], dict]:  # type: ignore[type-arg]
    """The launcher's stdout lines up to the cluster config line (JSON), each awaited until the deadline."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # end of output

    threading.Thread(target=read, daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"twinkle-launch printed no cluster config in time; so far: {seen}")
        if not line:
            pytest.fail(f"twinkle-launch exited with {process.wait()} before serving: {seen}")
        if line.startswith("{"):
            return seen, json.loads(line)
        seen.append(line.rstrip())


def test_launch_two_workers_train_through_the_printed_config(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from twinkle_client.model import TransformersModel

    port = _free_port_pair()
    command = [
        sys.executable, "-m", "twinkle_worker.launch",
        "--nproc", "2", "--base-port", str(port), "--host", "127.0.0.1", "--device", "cpu",
        "--output-root", str(tmp_path / "out"), "--group", "actor", "--threads", "1",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    monkeypatch.delenv("TWINKLE_WORKER_TOKEN", raising=False)  # no auth here: the config has no token_env
    errors = open(tmp_path / "launch.err", "w")  # noqa: SIM115 - the launcher's stderr, read on failure
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        lines, config = _read_until_config(launcher, time.monotonic() + START_TIMEOUT)
        addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        assert config == {"groups": {"actor": {"workers": addresses}}}
        assert [line.split(" serving on ")[1].split()[0] for line in lines if " serving on " in line] == addresses

        monkeypatch.setenv("TWINKLE_CLUSTER", json.dumps(config))  # inline JSON, as printed
        config_model = tiny_config()
        model = TransformersModel(
            config=config_model,
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
            remote_group="actor",
            mixed_precision="no",
            seed=SEED,
        )
        assert model.coordinator.addresses == addresses
        assert model.local is None  # the config's workers, not embedded ones
        pids = [status.pid for status in model.status()]
        model.set_optimizer("AdamW", lr=1e-3)
        batch = make_samples(np.random.default_rng(0), [7, 4, 9], prompt=1)
        out = model.forward_backward(batch)
        assert out["loss"] == pytest.approx(Reference(config_model, SEED).token_mean_loss(batch), rel=RTOL)
        step = model.clip_grad_and_step(gradient_accumulation_steps=1)
        assert step["applied"] and step["optimizer_step"] == 1
        model.close()

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, (tmp_path / "launch.err").read_text()
        for pid in pids:  # the workers were stopped and reaped, not orphaned
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if launcher.poll() is None:  # a failed assertion: stop the workers through the launcher
            launcher.terminate()
            try:
                launcher.wait(timeout=120)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        errors.close()
