"""Fixtures for the multi-rank tests: clients on the session's `two_workers` pool, and a pool of four for HSDP.

`mesh_model(**kwargs)` Inits the pooled workers through twinkle_client (tests/conftest.py's
`connect`) and Resets them when the test ends, pass or fail, so the next test starts clean.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from twinkle_client.local import LocalWorkers

pytest.register_assert_rewrite("dist_reference")  # its asserts explain themselves in failures too
_ROOT = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"


def _root_conftest() -> Any:
    # `import conftest` would find whichever conftest.py pytest imported last; load ours by path.
    spec = importlib.util.spec_from_file_location("_tests_root_conftest_distributed", _ROOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _root_conftest()
connect = _shared.connect


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # The references run in this process next to the workers; on 2 shared cores one thread is steadier.
    torch.set_num_threads(1)


@pytest.fixture
def mesh_model(two_workers: LocalWorkers) -> Iterator[Callable[..., Any]]:
    """Factory of clients on the two pooled workers; each is closed (Reset) at teardown."""
    yield from _shared.open_clients(two_workers)


@pytest.fixture(scope="session")
def four_workers(output_root: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """Four worker processes (dp=2 x fsdp=2), one torch thread each: only the HSDP test starts them."""
    workers = LocalWorkers(
        4, output_root=output_root, threads=1, log_dir=tmp_path_factory.mktemp("logs-4"), start_timeout=240.0
    )
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def hsdp_model(four_workers: LocalWorkers) -> Iterator[Callable[..., Any]]:
    yield from _shared.open_clients(four_workers)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]
