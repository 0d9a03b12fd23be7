"""A collective failure shows in the survivor's metrics: kill -9 one rank of a 2-rank mesh, and the
other rank's `twinkle_worker_collective_failures_total` counts the call its collective lost, while
its lease gauges follow the Reset that ends the job.

Dedicated worker processes: this test kills one.
"""

from __future__ import annotations

import pathlib
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from reliability_support import VOCAB, start_workers, tiny_config

from twinkle_client.model import TransformersModel
from twinkle_protocol.errors import TwinkleError
from twinkle_protocol.mesh import DeviceMesh


def samples_of(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        families = text_string_to_metric_families(response.read().decode())
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (key, found), value in samples.items() if key == name and wanted <= found)


def test_a_dead_peer_counts_as_a_collective_failure_on_the_survivor(tmp_path: pathlib.Path) -> None:
    workers = start_workers(2, tmp_path, extra_args=["--metrics-port", "0"])
    try:
        model = TransformersModel(
            addresses=workers.addresses,
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
            mixed_precision="no",
            seed=0,
            rendezvous_timeout=60,
            retry_seconds=2.0,
            abort_grace_seconds=5.0,
        )
        survivor_url = model.metrics_urls()[0]
        rng = np.random.default_rng(0)
        batch = [{"input_ids": rng.integers(0, VOCAB, 10).tolist(), "labels": rng.integers(0, VOCAB, 10).tolist()}]
        model.set_optimizer("AdamW", lr=1e-3)
        model.forward_backward(batch * 2)
        model.clip_grad_and_step(max_grad_norm=1.0)
        before = samples_of(survivor_url)
        assert total(before, "twinkle_worker_collective_failures_total") == 0
        assert total(before, "twinkle_worker_optimizer_steps_total", group="default") == 1

        workers.processes[1].kill()
        workers.processes[1].wait()
        failed = False
        for _ in range(3):  # the first call may still reach rank 1's closing socket
            try:
                model.forward_backward(batch * 2)
            except TwinkleError:
                failed = True
                break
        assert failed, "training went on with a dead rank"
        model.close()  # Reset runs on the survivor after its failed call: the scrape below sees that call

        after = samples_of(survivor_url)
        aborted = total(after, "twinkle_worker_calls_total", code="ABORTED")
        failures = total(after, "twinkle_worker_collective_failures_total")
        assert failures >= 1, f"no collective failure counted; ABORTED calls: {aborted}"
        assert failures == aborted  # a dead peer: every ABORTED call on the survivor lost a collective
        assert total(after, "twinkle_worker_initialized") == 0
        assert total(after, "twinkle_worker_session_owned") == 0
    finally:
        workers.close()
