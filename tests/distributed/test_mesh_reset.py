"""Reset: after close(), the same two worker processes Init again with a different mesh shape."""

from __future__ import annotations

import numpy as np
import pytest
from dist_reference import RTOL, SEED, Reference, make_samples, tiny_config

from twinkle_protocol.mesh import DeviceMesh


def test_same_workers_take_a_new_mesh_shape_after_close(two_workers, mesh_model) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    batch = make_samples(np.random.default_rng(11), [8, 3, 12], prompt=1)
    expected = Reference(config, SEED).token_mean_loss(batch)
    pids = None
    for mesh, strategy, kind in (
        (DeviceMesh.from_sizes(dp_size=2), "accelerate", "DDP"),
        (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp", "FSDP2"),
        (DeviceMesh.from_sizes(dp_size=2), "accelerate", "DDP"),
    ):
        model = mesh_model(config=config, device_mesh=mesh, strategy=strategy, seed=SEED)
        statuses = model.status()
        assert [tuple(s.mesh.dim_names) for s in statuses] == [mesh.dim_names] * 2
        assert [s.rank for s in statuses] == [0, 1]
        if pids is None:
            pids = [s.pid for s in statuses]
        assert [s.pid for s in statuses] == pids  # the same processes, not new ones
        assert kind in model.strategy_description
        model.set_optimizer("AdamW", lr=1e-2)
        out = model.forward_backward(batch)
        # a fresh model each time: the previous job's step did not leak into this one
        assert out["loss"] == pytest.approx(expected, rel=RTOL)
        assert model.clip_grad_and_step(gradient_accumulation_steps=1)["optimizer_step"] == 1
        model.close()
        assert not any(s.initialized for s in _statuses(two_workers))


def _statuses(pool):  # type: ignore[no-untyped-def]
    from twinkle_client.coordinator import Coordinator
    from twinkle_protocol._proto import worker_pb2

    coordinator = Coordinator(pool.addresses)
    try:
        return [stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=30) for stub in coordinator.stubs]
    finally:
        coordinator.close()
