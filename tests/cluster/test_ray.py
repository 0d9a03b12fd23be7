"""Ray, for real: a local Ray cluster (ray.init(num_cpus=2)) in a private network namespace runs
TransformersModel(launcher="ray"): 2 actors in a placement group form a gloo mesh, train like the
embedded default, and rank 0 answers GetMesh; killing one actor gives that rank's error within the
configured bound (retry_seconds + abort_grace_seconds). Skipped, saying why, without ray or namespaces."""

from __future__ import annotations

import json
import pathlib

import pytest
from cluster_support import clean_environment
from dist_reference import RTOL
from namespaces import require_network_namespace, run_driver

DRIVER = pathlib.Path(__file__).resolve().parent / "ray_driver.py"
# Ray's start-up and the kill's detection on a loaded 2-core machine, beyond the configured bound.
SLACK_SECONDS = 30.0


@pytest.mark.slow
def test_ray_actors_train_like_the_embedded_default_and_a_dead_actor_is_its_ranks_failure(
    tmp_path, embedded_losses
) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray", reason="the Ray launcher needs the [ray] extra: pip install -e '.[ray]'")
    require_network_namespace()
    result_path = tmp_path / "result.json"
    env = clean_environment({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    run_driver(["-n"], DRIVER, [str(tmp_path), str(result_path)], env)
    result = json.loads(result_path.read_text())
    assert result["losses"] == pytest.approx(embedded_losses, rel=RTOL)
    assert [rank for rank, *_ in result["mesh"]] == [0, 1]
    assert [address for _, address, *_ in result["mesh"]] == result["addresses"]
    assert [source for *_, source, _ in result["mesh"]] == ["ray", "ray"]
    assert [pid for *_, pid in result["mesh"]] == result["actor_pids"]  # each rank serves in its actor's process

    error = result["error"]
    assert error is not None, "the call after the kill succeeded"
    assert error["type"] == "Unavailable", error
    assert f"rank 1 ({result['addresses'][1]}): its Ray actor died" in error["message"], error
    assert result["error_seconds"] < result["bound_seconds"] + SLACK_SECONDS, result["error_seconds"]
