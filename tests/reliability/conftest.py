"""Fixtures of the reliability tests (helpers are in reliability_support.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from reliability_support import Pki, SavePause, make_pki, start_workers

from twinkle_client.local import LocalWorkers


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def hooked_worker(tmp_path: pathlib.Path) -> Iterator[tuple[LocalWorkers, SavePause]]:
    """One dedicated worker whose saves a test can hold before they commit."""
    pause = SavePause(tmp_path / "pause.fifo")
    workers = start_workers(1, tmp_path, env=pause.env)
    try:
        yield workers, pause
    finally:
        pause.release()
        workers.close()
