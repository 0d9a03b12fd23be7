"""Runs inside a private network namespace (`unshare -n`, so Ray binds loopback only): a local Ray
cluster of 2 CPUs, TransformersModel(launcher="ray") with 2 actors over gloo, the cluster tests'
schedule, then one actor killed; writes what happened as JSON.

    unshare -n python tests/cluster/ray_driver.py WORKDIR RESULT.json
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "distributed"))

from cluster_support import STEPS, loopback_up, train  # noqa: E402
from dist_reference import SEED, make_windows, tiny_config  # noqa: E402

RETRY_SECONDS, ABORT_GRACE_SECONDS = 5.0, 10.0


def main(workdir: str, result_path: str) -> None:
    loopback_up()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from twinkle_client import cluster
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.errors import TwinkleError
    from twinkle_protocol.mesh import DeviceMesh

    # A short session folder: Ray's sockets live in it, and socket paths have at most 107 bytes.
    session = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=session)
    result: dict[str, object] = {}
    try:
        model = TransformersModel(
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
            mixed_precision="no",
            seed=SEED,
            launcher="ray",
            output_root=str(pathlib.Path(workdir) / "outputs"),
            retry_seconds=RETRY_SECONDS,
            abort_grace_seconds=ABORT_GRACE_SECONDS,
        )
        windows = make_windows(SEED, STEPS, 1, 5)
        result["losses"] = train(model, windows)
        mesh = cluster.discover(model.coordinator.addresses[0], model.coordinator.security, timeout=10.0)
        result["mesh"] = [[m.rank, m.address, m.source, m.pid] for m in mesh.members]
        result["addresses"] = model.coordinator.addresses
        result["actor_pids"] = ray.get([actor.pid.remote() for actor in model.local.actors])  # type: ignore[union-attr]
        ray.kill(model.local.actors[1], no_restart=True)  # type: ignore[union-attr]
        started = time.monotonic()
        try:
            model.forward_backward(windows[0][0])
            result["error"] = None
        except TwinkleError as error:
            result["error"] = {"type": type(error).__name__, "message": str(error)}
        result["error_seconds"] = time.monotonic() - started
        result["bound_seconds"] = RETRY_SECONDS + ABORT_GRACE_SECONDS
        model.close()
    finally:
        ray.shutdown()
        shutil.rmtree(session, ignore_errors=True)
        pathlib.Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
