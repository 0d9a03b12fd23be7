"""Auth: bearer token (env or --token-file, never logged), TLS and mutual TLS, message size limits.

Real worker processes started with the flags, a CA made for the session (cryptography).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reliability_support import Pki, batch, code_of, forward_request, start_workers, stub, tiny_config

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import Unauthenticated
from twinkle_protocol.security import ChannelSecurity

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def locked(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """A worker with the token in its environment, mutual TLS and 1 MiB messages."""
    directory = tmp_path_factory.mktemp("locked")
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    security = ChannelSecurity.from_files(
        root_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )
    workers = start_workers(
        1,
        directory,
        extra_args=[*args, "--max-message-mb", "1"],
        env={"TWINKLE_WORKER_TOKEN": TOKEN},
        security=security,
    )
    yield workers
    workers.close()


def mtls(pki: Pki, token: str | None = TOKEN) -> ChannelSecurity:
    return ChannelSecurity.from_files(
        token=token, root_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )


def test_calls_need_the_token_but_health_checks_do_not(locked: LocalWorkers, pki: Pki) -> None:
    address = locked.addresses[0]
    channel = mtls(pki).channel(address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    worker = stub(address, mtls(pki))
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        code, details = code_of(
            lambda m=metadata: worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=m, timeout=30)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    code, _ = code_of(lambda: list(reflection.ServerReflectionInfo(iter([ask]), timeout=30)))
    assert code == grpc.StatusCode.UNAUTHENTICATED  # the schema is served to authenticated callers only

    good = (("authorization", f"Bearer {TOKEN}"),)
    assert worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=good, timeout=30).pid == locked.processes[0].pid
    # The call stream is a call like the others: refused without the token, before any message is read.
    calls = channel.stream_stream(
        "/twinkle.worker.v1.WorkerService/Calls",
        request_serializer=worker_pb2.CallsRequest.SerializeToString,
        response_deserializer=worker_pb2.CallsResponse.FromString,
    )
    status = worker_pb2.CallsRequest(
        id=1,
        method="/twinkle.worker.v1.WorkerService/GetStatus",
        request=worker_pb2.GetStatusRequest().SerializeToString(),
    )
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        code, details = code_of(lambda m=metadata: list(calls(iter([status]), metadata=m, timeout=30)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    (answer,) = list(calls(iter([status]), metadata=good, timeout=30))
    assert answer.code == 0 and worker_pb2.GetStatusResponse.FromString(answer.response).pid == locked.processes[0].pid
    # The token is in the environment only: neither on the command line nor in the log.
    assert TOKEN not in pathlib.Path(f"/proc/{locked.processes[0].pid}/cmdline").read_text()
    assert TOKEN not in (locked.log_dir / "worker-0.log").read_text()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(locked: LocalWorkers, pki: Pki) -> None:
    address = locked.addresses[0]
    refused = {
        "plaintext": ChannelSecurity(token=TOKEN),
        "no client certificate": ChannelSecurity.from_files(token=TOKEN, root_cert=str(pki.ca)),
        "certificate of another CA": ChannelSecurity.from_files(
            token=TOKEN, root_cert=str(pki.ca), client_cert=str(pki.rogue_cert), client_key=str(pki.rogue_key)
        ),
    }
    for label, security in refused.items():
        worker = stub(address, security)
        code, _ = code_of(
            lambda w=worker, s=security: w.GetStatus(worker_pb2.GetStatusRequest(), metadata=s.metadata(), timeout=10)
        )
        assert code == grpc.StatusCode.UNAVAILABLE, label


def test_client_trains_over_mutual_tls_from_a_cluster_config(
    locked: LocalWorkers, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = {
        "workers": locked.addresses,
        "token_env": "TEST_TWINKLE_TOKEN",
        "tls_root_cert": str(pki.ca),
        "tls_client_cert": str(pki.client_cert),
        "tls_client_key": str(pki.client_key),
    }
    monkeypatch.setenv("TWINKLE_CLUSTER", json.dumps({"groups": {"secure": group}}))
    monkeypatch.setenv("TEST_TWINKLE_TOKEN", TOKEN)

    model = TransformersModel(config=tiny_config(), remote_group="secure", mixed_precision="no", seed=0)
    try:
        model.set_optimizer("AdamW", lr=1e-3)
        first = model.forward_backward(batch(1))["loss"]
        model.clip_grad_and_step()
        assert model.forward_backward(batch(1))["loss"] < first
    finally:
        model.close()
    monkeypatch.setenv("TEST_TWINKLE_TOKEN", "not-the-token")
    with pytest.raises(Unauthenticated, match="rank 0") as caught:
        TransformersModel(config=tiny_config(), remote_group="secure", mixed_precision="no", seed=0)
    assert (caught.value.reason, caught.value.rank) == ("UNAUTHENTICATED", 0)  # the interceptor's ErrorInfo


def test_messages_over_the_limit_are_resource_exhausted(locked: LocalWorkers, pki: Pki) -> None:
    worker = stub(locked.addresses[0], mtls(pki))
    ids = np.zeros((1, 200_000), dtype=np.int64)  # 1.6 MB > --max-message-mb 1
    request = forward_request({"input_ids": ids, "labels": ids})
    code, details = code_of(lambda: worker.ForwardBackward(request, metadata=mtls(pki).metadata(), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=mtls(pki).metadata(), timeout=30).pid > 0


def test_tls_worker_with_a_token_file_through_local_workers(pki: Pki, tmp_path: pathlib.Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    security = ChannelSecurity.from_files(token=TOKEN, root_cert=str(pki.ca))
    args = ["--token-file", str(token_file), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with start_workers(1, tmp_path, extra_args=args, security=security) as workers:
        worker = stub(workers.addresses[0], security)
        status = worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=security.metadata(), timeout=30)
        assert status.pid == workers.processes[0].pid
        code, _ = code_of(lambda: worker.GetStatus(worker_pb2.GetStatusRequest(), timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Without the CA the client cannot verify the worker's certificate: refused, not downgraded.
        untrusted = stub(workers.addresses[0], ChannelSecurity(token=TOKEN, tls=True))
        code, _ = code_of(
            lambda: untrusted.GetStatus(worker_pb2.GetStatusRequest(), metadata=security.metadata(), timeout=10)
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert TOKEN not in (workers.log_dir / "worker-0.log").read_text()
