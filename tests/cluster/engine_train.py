"""The training script the engine tests run where a user's would run: it finds the mesh from
TWINKLE_CLUSTER (which names only rank 0), trains the cluster tests' schedule, saves, and writes
what it saw as JSON to the path given as its argument.

    python tests/cluster/engine_train.py RESULT.json     # TWINKLE_CLUSTER set by the engine's script
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "distributed"))

from cluster_support import STEPS, train  # noqa: E402
from dist_reference import SEED, make_windows, tiny_config  # noqa: E402

from twinkle_client.model import TransformersModel  # noqa: E402
from twinkle_protocol.mesh import DeviceMesh  # noqa: E402


def main(result_path: str) -> None:
    model = TransformersModel(
        config=tiny_config(),
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        mixed_precision="no",
        seed=SEED,
        rendezvous_timeout=120.0,
    )
    try:
        losses = train(model, make_windows(SEED, STEPS, 1, 5))
        checkpoint = model.save("engine-checkpoint")
        statuses = model.status()
        result = {
            "addresses": model.coordinator.addresses,
            "losses": losses,
            "checkpoint": checkpoint,
            "pids": [status.pid for status in statuses],
        }
    finally:
        model.close()
    pathlib.Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
