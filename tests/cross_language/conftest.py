"""Fixtures for the cross-language tests: Node and buf from examples/node, and Reset helpers.

The workers are tests/conftest.py's session pool `two_workers` (two CPU ranks on free ports,
awaited through the health service); tests here Reset them before and after use, so every
test starts from uninitialised workers.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "examples" / "node"
TRAIN_JS = NODE_DIR / "train.js"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="session")
def node_dir() -> pathlib.Path:
    return NODE_DIR


@pytest.fixture(scope="session")
def node() -> str:
    """Path of the node binary; the only reason these tests may skip is that Node is absent."""
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not installed: the cross-language tests need Node >= 18 (and npm)")
    return path


@pytest.fixture(scope="session")
def node_modules(node: str) -> pathlib.Path:
    """examples/node/node_modules, installed from package-lock.json when missing or stale."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime or not BUF.exists():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: install npm to fetch examples/node's packages"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True, timeout=600
        )
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="session")
def buf(node_modules: pathlib.Path) -> str:
    """The buf CLI from @bufbuild/buf."""
    assert BUF.exists(), f"{BUF} is missing after npm ci"
    return str(BUF)


def _reset_all(addresses: list[str]) -> None:
    """Force-Resets every worker concurrently: whoever owned it, it is uninitialised afterwards."""
    from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc

    def reset(address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            worker_pb2_grpc.WorkerServiceStub(channel).Reset(worker_pb2.ResetRequest(force=True), timeout=60)

    with ThreadPoolExecutor(len(addresses)) as pool:
        list(pool.map(reset, addresses))


@pytest.fixture(scope="session")
def reset_workers() -> Callable[[list[str]], None]:
    return _reset_all


@pytest.fixture
def workers(two_workers: Any) -> Iterator[list[str]]:
    """Addresses of the two pool workers, uninitialised at the start of the test and Reset after it."""
    _reset_all(two_workers.addresses)
    yield list(two_workers.addresses)
    _reset_all(two_workers.addresses)


@pytest.fixture(scope="session")
def run_node(node: str, node_modules: pathlib.Path) -> Callable[..., tuple[int, list[dict[str, Any]], str]]:
    """Runs examples/node/train.js with the given arguments: (exit code, JSON-line events, stderr)."""
    return lambda *args, timeout=300: _run_node(node, *args, timeout=timeout)


def _run_node(node: str, *args: str, timeout: float = 300) -> tuple[int, list[dict[str, Any]], str]:
    """Runs examples/node/train.js; returns its exit code, its JSON-line events and its stderr."""
    process = subprocess.run(
        [node, str(TRAIN_JS), *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, NODE_NO_WARNINGS="1"),
    )
    events = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    return process.returncode, events, process.stderr
