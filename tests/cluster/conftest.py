"""Fixtures for the cluster tests: the schedule every engine's run trains, and the embedded default's losses on it.

The tests start workers the way Slurm, torchrun, Kubernetes or Ray would (real processes, the
engine's own variables), find them from rank 0's address and compare their losses with the
embedded default (TransformersModel with no cluster: workers it starts itself) on the same data.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "distributed"))
pytest.register_assert_rewrite("dist_reference")

from cluster_support import STEPS, train  # noqa: E402
from dist_reference import SEED, make_windows, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def windows() -> list[Any]:
    """STEPS optimizer steps of one micro-batch of 5 samples (odd: the two data ranks get 3 and 2)."""
    return make_windows(SEED, STEPS, 1, 5)


@pytest.fixture(scope="session")
def embedded_losses(windows: list[Any], monkeypatch_session: pytest.MonkeyPatch) -> list[float]:
    """The losses of the embedded default (two local workers the client starts) on `windows`."""
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh

    monkeypatch_session.delenv("TWINKLE_CLUSTER", raising=False)
    model = TransformersModel(
        config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), mixed_precision="no", seed=SEED
    )
    try:
        return train(model, windows)
    finally:
        model.close()


@pytest.fixture(scope="session")
def monkeypatch_session() -> Any:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()
