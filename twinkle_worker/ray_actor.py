"""One rank's worker inside a Ray actor: the same gRPC WorkerServer the `twinkle-worker` command runs,
in the actor's process, placed (rank, world size) by the launcher in twinkle_client.ray_workers.

The class is plain Python; the launcher wraps it with ray.remote, so this module needs no ray import.
"""

from __future__ import annotations

import logging
import os
import socket

from twinkle_protocol._proto import worker_pb2
from twinkle_worker import mesh_registry, placement
from twinkle_worker.options import WorkerOptions

log = logging.getLogger(__name__)


class WorkerActor:
    """Starts serving in __init__ on `host` (default the node's IP), on a free port; `address()` says where."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str | None,
        device: str,
        output_root: str,
        token: str | None,
        threads: int = 0,
        visible_gpus: int = 0,
    ) -> None:
        import torch

        from twinkle_worker.server import WorkerServer

        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if host is None:  # the node's address as the other Ray nodes (and the client) reach it
            import ray

            host = ray.util.get_node_ip_address()
        if threads > 0:
            torch.set_num_threads(threads)
        device = placement.local_device(device, 0, visible_gpus)  # Ray gives each actor its own GPU(s)
        options = WorkerOptions(host=host, device=device, output_root=output_root)
        self.server = WorkerServer(options, 0, token=token)
        servicer = self.server.servicer
        servicer.rank = servicer.placed_rank = rank
        if rank == 0:  # rank 0 answers GetMesh as under the other engines; the launcher registers the rest
            own = self.member(rank, world_size, host)
            servicer.registry = mesh_registry.MeshRegistry(own, host, None)
        self.rank, self.world_size, self.host = rank, world_size, host
        self.server.start()
        log.info("rank %d of %d serving in Ray actor pid %d on %s", rank, world_size, os.getpid(), self.address())

    def member(self, rank: int, world_size: int, host: str) -> worker_pb2.MeshMember:
        return worker_pb2.MeshMember(
            rank=rank,
            world_size=world_size,
            address=f"{host}:{self.server.port}",
            host=host,
            device=self.server.servicer.options.device,
            incarnation=mesh_registry.INCARNATION,
            pid=os.getpid(),
            source="ray",
            local_rank=0,
        )

    def address(self) -> str:
        return f"{self.host}:{self.server.port}"

    def member_bytes(self) -> bytes:
        """This rank's MeshMember, serialised (protobuf, not pickle, crosses the actor boundary)."""
        return self.member(self.rank, self.world_size, self.host).SerializeToString()

    def register(self, member: bytes) -> None:
        """On rank 0: records another rank (the launcher knows every actor; no registration thread needed)."""
        registry = self.server.servicer.registry
        assert registry is not None, "register() is for rank 0"
        registry.register(worker_pb2.MeshMember.FromString(member))

    def pid(self) -> int:
        return os.getpid()

    def hostname(self) -> str:
        return socket.gethostname()

    def stop(self, grace: float = 10.0) -> None:
        self.server.stop(grace=grace)
