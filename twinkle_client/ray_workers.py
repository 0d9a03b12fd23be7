"""Workers as Ray actors: one actor per rank in a placement group, each serving the gRPC worker.

    model = TransformersModel(config=cfg, device_mesh=DeviceMesh.from_sizes(dp_size=4), launcher="ray")

Used by TransformersModel(launcher="ray"). Needs `pip install 'twinkle-grpc[ray]'` where the client
runs and the worker packages (`[worker]`) on every Ray node; connects to the running Ray cluster
(ray.init() is called with no arguments when Ray is not initialised yet). A rank whose actor died
is reported as that rank's failure (`explain`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

from twinkle_protocol.errors import TwinkleError, Unavailable

# Seconds the placement group has to be scheduled and each actor to start serving.
START_TIMEOUT_SECONDS = 300.0


class RayWorkers:
    """`count` WorkerActors, rank i in bundle i of a placement group (`strategy`, default PACK)."""

    def __init__(
        self,
        count: int,
        device: str = "cpu",
        output_root: str | os.PathLike[str] | None = None,
        token: str | None = None,
        cpus_per_rank: float = 1.0,
        gpus_per_rank: float | None = None,
        strategy: str = "PACK",
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # The worker side runs in the actors; the client package does not depend on it otherwise.
        worker_actor = importlib.import_module("twinkle_worker.ray_actor").WorkerActor

        if not ray.is_initialized():
            ray.init()
        gpus = (1.0 if device.startswith("cuda") else 0.0) if gpus_per_rank is None else gpus_per_rank
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        self._ray, self._remove_group = ray, remove_placement_group
        self.group = placement_group([bundle] * count, strategy=strategy)
        self.actors: list[Any] = []
        self.addresses: list[str] = []
        self._closed = False
        try:
            ray.get(self.group.ready(), timeout=start_timeout)
            actor_class = ray.remote(worker_actor)
            root = str(output_root or os.getcwd())
            for rank in range(count):
                options = actor_class.options(
                    num_cpus=cpus_per_rank,
                    num_gpus=gpus,
                    max_restarts=0,  # a restarted actor would be a new, empty worker: report the rank instead
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
                )
                threads = max(1, int(cpus_per_rank))
                self.actors.append(options.remote(rank, count, None, device, root, token, threads, int(gpus)))
            self.addresses = ray.get([actor.address.remote() for actor in self.actors], timeout=start_timeout)
            members = ray.get([actor.member_bytes.remote() for actor in self.actors[1:]], timeout=start_timeout)
            ray.get([self.actors[0].register.remote(member) for member in members], timeout=start_timeout)
        except BaseException:
            self.close()
            raise

    def explain(self, rank: int, error: TwinkleError) -> TwinkleError:
        """`error`, or Unavailable naming every rank whose actor is dead (Ray says why), when any is."""
        dead = []
        for index, actor in enumerate(self.actors):
            try:
                self._ray.get(actor.pid.remote(), timeout=10.0)
            except self._ray.exceptions.RayActorError as cause:
                dead.append(
                    f"rank {index} ({self.addresses[index]}): its Ray actor died ({str(cause).splitlines()[0]})"
                )
            except self._ray.exceptions.GetTimeoutError:
                continue
        if not dead:
            return error
        return Unavailable(f"{'; '.join(dead)}. The call failed with: {error}")

    def close(self) -> None:
        """Stops every actor (each finishes its call in progress), then frees the placement group."""
        if self._closed:
            return
        self._closed = True
        stops = [actor.stop.remote() for actor in self.actors]
        for stop in stops:
            with contextlib.suppress(Exception):  # the actor is dead already
                self._ray.get(stop, timeout=30.0)
        for actor in self.actors:
            self._ray.kill(actor)
        self._remove_group(self.group)
