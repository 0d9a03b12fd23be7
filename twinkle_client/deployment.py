"""Finding or starting the workers of a mesh: embedded local processes, Ray actors, a cluster config's
group, given addresses, or an engine's rank 0; and the channel security to reach them.

Used by twinkle_client.model (before Init: the workers, the coordinator over them; and at close).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

from twinkle_client import cluster, tracing
from twinkle_client.coordinator import Coordinator
from twinkle_client.local import LocalWorkers, wait_serving
from twinkle_client.options import ClientOptions
from twinkle_client.ray_workers import RayWorkers
from twinkle_protocol import shared_memory
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.security import ChannelSecurity


@dataclasses.dataclass
class Deployment:
    """Where a mesh's workers are, how to reach them, and where their collectives meet."""

    addresses: list[str]
    security: ChannelSecurity
    master_addr: str
    master_port: int | None  # None: rank 0 offers a free port (its GetStatus)
    local: LocalWorkers | RayWorkers | None  # embedded workers, stopped at close; None: remote ones
    placed: bool  # remote workers (their device is theirs), not embedded ones


def deploy(mesh: DeviceMesh, remote_group: str | None, options: ClientOptions) -> Deployment:
    """Finds the remote group (given addresses, rank 0, or a cluster config), or starts embedded workers."""
    if options.rank0_address is not None:
        group: cluster.WorkerGroup | None = cluster.WorkerGroup("rank0", (), rank0=options.rank0_address)
    elif options.addresses is not None:
        group = cluster.WorkerGroup("addresses", tuple(options.addresses))
    else:
        group = cluster.resolve(remote_group)
    deployment = _start_embedded(mesh.world_size, options) if group is None else _find_remote(group, options)
    if len(deployment.addresses) != mesh.world_size:
        raise InvalidArgument(
            f"{mesh} has {mesh.world_size} ranks but the remote group has {len(deployment.addresses)} workers"
        )
    return deployment


def _start_embedded(world_size: int, options: ClientOptions) -> Deployment:
    token = options.token or secrets.token_urlsafe(24)  # other local users cannot drive embedded workers
    local: LocalWorkers | RayWorkers
    if options.launcher == "ray":  # actors may land on other nodes: paths stay under output_root
        local = RayWorkers(world_size, device=options.device, output_root=options.output_root, token=token)
    else:
        local = LocalWorkers(
            world_size,
            device=options.device,
            output_root=options.output_root,
            env={"TWINKLE_WORKER_TOKEN": token},
            # Driven by this user only: any path this user can write.
            extra_args=["--allow-any-path", *(["--metrics-port", "0"] if options.metrics else [])],
        )
    return Deployment(local.addresses, ChannelSecurity(token=token), "127.0.0.1", None, local, placed=False)


def channel_security(group: cluster.WorkerGroup, options: ClientOptions) -> ChannelSecurity:
    """The token and TLS files to reach a remote group: the options', else the cluster config's."""
    return ChannelSecurity.from_files(
        token=options.token or group.token(),
        root_cert=options.tls_root_cert or group.tls_root_cert,
        client_cert=options.tls_client_cert or group.tls_client_cert,
        client_key=options.tls_client_key or group.tls_client_key,
        server_name=options.tls_server_name or group.tls_server_name,
    )


def _find_remote(group: cluster.WorkerGroup, options: ClientOptions) -> Deployment:
    security = channel_security(group, options)
    addresses, rendezvous_host, master_port = list(group.workers), group.master_addr, group.master_port
    if group.rank0:  # placed workers: rank 0 knows the others, and where they meet
        found = cluster.discover(group.rank0, security, options.discover_timeout)
        addresses = [member.address for member in found.members]
        rendezvous_host = rendezvous_host or found.master_addr
        master_port = master_port or found.master_port or None  # 0: rank 0 offers a free port
    master_addr = rendezvous_host or cluster.host_of(addresses[0])
    for address in addresses:
        wait_serving(address, timeout=60.0, security=security)
    return Deployment(addresses, security, master_addr, master_port, None, placed=True)


def connect(deployment: Deployment, options: ClientOptions) -> Coordinator:
    """The coordinator over the deployment's workers: their channels (security, tracing), timeout and retries."""
    return Coordinator(
        deployment.addresses,
        (),
        options.timeout,
        security=deployment.security,
        retry_seconds=options.retry_seconds,
        abort_grace_seconds=options.abort_grace_seconds,
        wrap_channel=tracing.channel_wrapper(options.tracer_provider) if options.tracer_provider is not None else None,
        call_stream=options.call_stream and options.tracer_provider is None,
    )


def explain_failures(coordinator: Coordinator, deployment: Deployment, statuses: Sequence[Any]) -> None:
    """From now on a call failing on a rank whose worker restarted (or whose Ray actor died) says so;
    `statuses`: every rank's GetStatus at connection, with its incarnation."""
    restarts = cluster.RestartCheck(deployment.addresses, [s.incarnation for s in statuses], deployment.security)
    local = deployment.local
    coordinator.explain_failure = (
        (lambda rank, error: local.explain(rank, restarts(rank, error))) if isinstance(local, RayWorkers) else restarts
    )


def release(coordinator: Coordinator, local: LocalWorkers | RayWorkers | None, pool: shared_memory.Pool) -> None:
    """Releases a client's workers at close: stops embedded ones, Resets remote ones (for the next client)."""
    pool.close()
    if local is not None:
        local.close()
    else:
        try:
            resets = coordinator.all("Reset", worker_pb2.ResetRequest(), sequenced=False, timeout=30.0)
            coordinator.gather("Reset", resets)
        except Exception:  # the workers may be gone already; nothing to release then
            pass
    coordinator.close()
