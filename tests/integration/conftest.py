"""Fixtures for the single-worker integration tests: a client factory on the session's `one_worker` pool.

`remote(**kwargs)` Inits the pooled worker through twinkle_client (tests/conftest.py's
`connect`) and Resets it when the test ends, pass or fail, so the next test starts clean.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"


def _root_conftest() -> Any:
    # `import conftest` would find whichever conftest.py pytest imported last; load ours by path.
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", _ROOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _root_conftest()
connect = _shared.connect
tiny_config = _shared.tiny_config


@pytest.fixture(scope="session", autouse=True)
def _worker_threads() -> None:
    # The in-process references use as many threads as each pooled worker (tests/conftest.py),
    # so both sum in the same order; on 2 shared cores that is one thread, also the fastest.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture
def config() -> Any:
    """The tiny qwen2 config every worker in this directory is built from."""
    return tiny_config()


@pytest.fixture(scope="session")
def session_config() -> Any:
    """The same config, for fixtures that live longer than one test."""
    return tiny_config()


@pytest.fixture
def remote(one_worker: Any) -> Iterator[Callable[..., Any]]:
    """Factory of clients on the pooled worker; each is closed (Reset) at teardown."""
    yield from _shared.open_clients(one_worker)


@pytest.fixture(scope="module")
def module_config() -> Any:
    """The tiny qwen2 config, for module-scoped fixtures (which cannot use `config`)."""
    return tiny_config()
