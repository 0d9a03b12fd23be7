"""Helpers of the reliability tests: dedicated worker processes, raw stubs, a throwaway CA,
a TCP proxy that can cut connections, and the test hook that holds a save mid-way.

Tests that kill, signal or lock down a worker start their own processes (about 2 s each);
the others use the session pools of tests/conftest.py. Fixtures are in conftest.py.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import ipaddress
import os
import pathlib
import select
import socket
import threading
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from twinkle_client.local import LocalWorkers
from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.security import ChannelSecurity

_ROOT = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_tests_root_conftest_reliability", _ROOT)
assert _spec is not None and _spec.loader is not None
shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared)
tiny_config = shared.tiny_config
connect = shared.connect
VOCAB = shared.VOCAB
PAUSE_HOOK_ENV = "TWINKLE_TEST_PAUSE_IN_SAVE"


def start_workers(
    count: int,
    directory: pathlib.Path,
    *,
    output_root: pathlib.Path | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    security: ChannelSecurity | None = None,
) -> LocalWorkers:
    """`count` dedicated worker processes (one torch thread each) logging into directory/logs."""
    return LocalWorkers(
        count,
        output_root=output_root or directory / "out",
        threads=1,
        log_dir=directory / "logs",
        extra_args=extra_args,
        env=env,
        security=security,
    )


def stub(address: str, security: ChannelSecurity | None = None) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub((security or ChannelSecurity()).channel(address))


def init_request(session: str = "", number: int = 0, **fields: Any) -> worker_pb2.InitRequest:
    """Init of the tiny test model on one rank, fp32, seed 0."""
    request = worker_pb2.InitRequest(
        config_json=tiny_config().to_json_string(use_diff=False),
        mixed_precision=worker_pb2.MIXED_PRECISION_NO,
        seed=0,
        **fields,
    )
    request.context.session_id, request.context.sequence_number = session, number
    return request


def batch(seed: int, rows: int = 2, length: int = 8) -> dict[str, np.ndarray]:
    """A deterministic batch: input_ids, attention_mask, labels [rows, length]."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (rows, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def forward_request(arrays: dict[str, np.ndarray], **fields: Any) -> worker_pb2.ForwardBackwardRequest:
    request = worker_pb2.ForwardBackwardRequest(**fields)
    tensors.map_to_proto(arrays, request.inputs)
    return request


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a call that must fail (raises if it succeeded)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded but should have failed")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    """Runs call() in a thread; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# ------------------------------------------------------------ save pause hook


class SavePause:
    """Holds the worker's next save just before it commits (the TWINKLE_TEST_PAUSE_IN_SAVE hook).

    arm() creates the FIFO; wait_paused() returns once the save is blocked on it (opening a
    FIFO for writing blocks until the reader opens it: no sleeps); release() lets it commit.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._writer: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {PAUSE_HOOK_ENV: str(self.path)}

    def arm(self) -> None:
        os.mkfifo(self.path)

    def wait_paused(self, timeout: float = 60.0) -> None:
        opened: list[int] = []
        opener = threading.Thread(target=lambda: opened.append(os.open(self.path, os.O_WRONLY)), daemon=True)
        opener.start()
        opener.join(timeout)
        assert opened, f"the save did not reach the pause point within {timeout} s"
        self._writer = opened[0]
        self.path.unlink()  # later saves run through

    def release(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None


# --------------------------------------------------------------- TCP proxy


class Proxy:
    """Forwards a local port to a worker; cut() drops every open connection (new ones still work)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [])
                for source in ready:
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    peers[source].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                sock.close()

    def cut(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut()


# ------------------------------------------------------------- throwaway CA


@dataclass
class Pki:
    """PEM files of a CA made for one test session: a server certificate for 127.0.0.1/localhost,
    a client certificate it signed, and a client certificate from an unrelated CA."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    rogue_cert: pathlib.Path
    rogue_key: pathlib.Path


def make_pki(directory: pathlib.Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(
        subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool, usage: Any = None, san: Any = None
    ) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, cert: Any, key: Any) -> tuple[pathlib.Path, pathlib.Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("twinkle test CA", ca_key, "twinkle test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate(
        "localhost", server_key, "twinkle test CA", ca_key, False, ExtendedKeyUsageOID.SERVER_AUTH, san
    )
    client_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    client = certificate("trainer", client_key, "twinkle test CA", ca_key, False, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = certificate("intruder", rogue_key, "rogue CA", rogue_ca_key, False, ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = write("ca", ca_cert, ca_key)
    server_cert, server_key_path = write("server", server, server_key)
    client_cert, client_key_path = write("client", client, client_key)
    rogue_cert, rogue_key_path = write("rogue", rogue, rogue_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path)
