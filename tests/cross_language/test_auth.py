"""Bearer-token auth from outside Python: Node and buf curl send `authorization: Bearer <token>`
(docs/protocol.md sections 11 and 13); without it a worker started with a token refuses the call.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "s3cret-for-tests"
CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


@pytest.fixture(scope="module")
def token_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One worker that requires TOKEN on every call but the health check."""
    from twinkle_client.local import LocalWorkers

    directory = tmp_path_factory.mktemp("token-worker")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with LocalWorkers(1, output_root=directory, threads=1, extra_args=["--token-file", str(token_file)]) as pool:
        yield pool.addresses[0]


@pytest.fixture(scope="module")
def small_job(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    job = {
        "model": {"config_json": CONFIG, "model_class": "Qwen2ForCausalLM", "mixed_precision": "MIXED_PRECISION_NO"},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["all-linear"]},
        "batches": [[{"input_ids": [5, 6, 7, 8], "labels": [6, 7, 8, -100]}]],
        "save": {"name": "auth-adapter"},
    }
    path = tmp_path_factory.mktemp("auth-job") / "job.json"
    path.write_text(json.dumps(job))
    return path


def test_health_needs_no_token(token_worker: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(token_worker) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_node_without_the_token_is_unauthenticated(run_node: Any, token_worker: str, small_job: pathlib.Path) -> None:
    code, events, _ = run_node("--workers", token_worker, "--data", str(small_job))
    assert code == 1
    assert events[-1]["event"] == "error" and events[-1]["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert events[-1]["reason"] == "UNAUTHENTICATED" and events[-1]["metadata"] == {"rank": "0"}  # the ErrorInfo


def test_node_with_the_token_trains(run_node: Any, token_worker: str, small_job: pathlib.Path) -> None:
    code, events, stderr = run_node("--workers", token_worker, "--data", str(small_job), "--token", TOKEN)
    assert code == 0, stderr
    steps = [event for event in events if event["event"] == "step"]
    assert len(steps) == 1 and steps[0]["applied"] and steps[0]["num_tokens"] == 3
    assert events[-1]["event"] == "done"


def test_buf_curl_with_and_without_the_token(buf: str, token_worker: str) -> None:
    url = f"http://{token_worker}/twinkle.worker.v1.WorkerService/GetStatus"
    base = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    # Without a token even reflection is refused, so buf finds no schema...
    no_schema = subprocess.run([*base, url], capture_output=True, text=True, timeout=60)
    assert no_schema.returncode != 0 and "WorkerService" in no_schema.stderr
    # ...and with the schema from the .proto files the call itself is UNAUTHENTICATED (exit code << 3).
    refused = subprocess.run([*base, "--schema", "protos", url], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == grpc.StatusCode.UNAUTHENTICATED.value[0] << 3, refused.stderr
    allowed = subprocess.run(
        [*base, "-H", f"authorization: Bearer {TOKEN}", "--reflect-header", "*", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert int(json.loads(allowed.stdout)["pid"]) > 0
