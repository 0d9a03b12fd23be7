"""buf on the contract: lint and the breaking-change check pass, the check catches a break, and
`buf curl` lists a running worker's services through reflection and calls GetStatus.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
BASELINE = ".buf/released"


def run_buf(buf: str, *args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes(buf: str) -> None:
    result = run_buf(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_contract(buf: str) -> None:
    result = run_buf(buf, "breaking", "protos", "--against", BASELINE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_renumbered_field(buf: str, tmp_path: pathlib.Path) -> None:
    """The check is live: renumbering InitRequest.rank in a copy of protos/ must fail it."""
    changed = tmp_path / "protos"
    shutil.copytree(REPO / "protos", changed)
    worker = changed / "twinkle" / "worker" / "v1" / "worker.proto"
    text = worker.read_text()
    assert "int32 rank = 13;" in text
    worker.write_text(text.replace("int32 rank = 13;", "int32 rank = 99;"))
    (tmp_path / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n")
    result = run_buf(buf, "breaking", "protos", "--against", str(REPO / BASELINE), cwd=tmp_path)
    assert result.returncode != 0
    assert "InitRequest" in result.stdout + result.stderr


def buf_curl(buf: str, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_buf(buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args, f"http://{address}")


def test_buf_curl_lists_services_and_calls_get_status(buf: str, two_workers: Any, workers: list[str]) -> None:
    """The commands of docs/protocol.md section 13, against a real worker."""
    address = workers[0]
    listed = buf_curl(buf, address, "--list-services")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"twinkle.worker.v1.WorkerService", "grpc.health.v1.Health"} <= services

    methods = buf_curl(buf, address, "--list-methods")
    assert "twinkle.worker.v1.WorkerService/ForwardBackward" in methods.stdout.split()

    status = run_buf(
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--emit-defaults",
        f"http://{address}/twinkle.worker.v1.WorkerService/GetStatus",
    )
    assert status.returncode == 0, status.stderr
    reply = json.loads(status.stdout)
    assert int(reply["pid"]) == two_workers.processes[0].pid
    assert reply["initialized"] is False
    assert 0 < reply["freePort"] < 65536


def test_buf_curl_reports_a_status_code(buf: str, workers: list[str]) -> None:
    """A failing call exits with its gRPC code << 3: GetTrainConfigs before Init is FAILED_PRECONDITION (9)."""
    result = run_buf(
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "-d",
        '{"adapter_name": "default"}',
        f"http://{workers[0]}/twinkle.worker.v1.WorkerService/GetTrainConfigs",
    )
    assert result.returncode == 9 << 3, result.stdout + result.stderr
    assert "Init" in result.stdout + result.stderr
