"""Cluster config: which worker addresses serve a `remote_group`.

The config is JSON, read from the environment variable TWINKLE_CLUSTER, which holds
either a path to a file or the JSON itself:

    {"groups": {"actor": {"workers": ["host-a:50051", "host-a:50052", "host-b:50051", "host-b:50052"],
                          "master_addr": "host-a", "master_port": 29500, "token_env": "TWINKLE_TOKEN"}}}

`workers` are listed in global-rank order. `master_addr`/`master_port` (optional) fix the
torch.distributed rendezvous; by default rank 0's host and a port rank 0 reports free.
`token_env` names the environment variable holding the workers' bearer token. With TLS:
`tls_root_cert` (PEM path of the CA that signed the workers' certificates), and for mutual
TLS `tls_client_cert` + `tls_client_key`; `tls_server_name` overrides the name checked
against the workers' certificates.
Instead of `workers`, a group may name only rank 0: `{"rank0": "host-a:50100"}`, for workers
that Slurm, torchrun, Kubernetes or Ray placed (twinkle_worker.placement); the client then asks
rank 0's GetMesh for every rank's address (`discover`), and remembers each rank's incarnation so
that a call failing on a rank that restarted says so (`RestartCheck`).
With no TWINKLE_CLUSTER set, a TransformersModel starts local workers itself (embedded default).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TwinkleError,
    Unavailable,
    from_status,
)
from twinkle_protocol.security import ChannelSecurity

ENV_VAR = "TWINKLE_CLUSTER"


@dataclass(frozen=True)
class WorkerGroup:
    """Addresses of the workers of one remote group, in global-rank order."""

    name: str
    workers: tuple[str, ...]
    master_addr: str | None = None
    master_port: int | None = None
    token_env: str | None = None
    tls_root_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_server_name: str | None = None
    # Rank 0's address when the group names only rank 0 (workers is then empty until discovered).
    rank0: str | None = None

    def token(self) -> str | None:
        """The bearer token from the variable named by token_env (None when unset or empty)."""
        return (os.environ.get(self.token_env) or None) if self.token_env else None


def load_config(source: str | None = None) -> dict[str, Any] | None:
    """The parsed cluster config, or None when none is configured."""
    text = source if source is not None else os.environ.get(ENV_VAR)
    if not text:
        return None
    text = text.strip()
    if not text.startswith("{"):
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise NotFound(f"{ENV_VAR}={text!r}: no such cluster config file")
        text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"cluster config is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("groups"), dict):
        raise InvalidArgument('cluster config must be {"groups": {"<name>": {"workers": [...]}}}')
    return config


def resolve(remote_group: str | None, source: str | None = None) -> WorkerGroup | None:
    """The group named `remote_group`, or None when no cluster is configured (start local workers)."""
    config = load_config(source)
    if config is None:
        return None
    groups = config["groups"]
    name = remote_group or (next(iter(groups)) if len(groups) == 1 else None)
    if name is None:
        raise InvalidArgument(f"the cluster config has groups {sorted(groups)}: pass remote_group=<one of them>")
    if name not in groups:
        raise NotFound(f"remote_group {name!r} is not in the cluster config; groups: {sorted(groups)}")
    entry = groups[name]
    rank0 = entry.get("rank0") if isinstance(entry, dict) else None
    workers = entry.get("workers", []) if isinstance(entry, dict) else None
    if rank0 is not None and (not isinstance(rank0, str) or ":" not in rank0 or workers):
        raise InvalidArgument(f"cluster group {name!r}: 'rank0' is one 'host:port', and excludes 'workers'")
    if rank0 is None and (not workers or not all(isinstance(w, str) and ":" in w for w in workers)):
        raise InvalidArgument(
            f"cluster group {name!r} needs 'workers' (a list of 'host:port' in rank order) or 'rank0' ('host:port')"
        )
    port = entry.get("master_port")
    tls = {key: entry.get(key) for key in ("tls_root_cert", "tls_client_cert", "tls_client_key", "tls_server_name")}
    if bool(tls["tls_client_cert"]) != bool(tls["tls_client_key"]):
        raise InvalidArgument(f"cluster group {name!r}: tls_client_cert and tls_client_key go together")
    master_addr = entry.get("master_addr")
    return WorkerGroup(
        name, tuple(workers or ()), master_addr, int(port) if port else None, entry.get("token_env"), **tls, rank0=rank0
    )


def host_of(address: str) -> str:
    """'host:port' -> 'host' ('[::1]:50051' -> '::1')."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def discover(rank0: str, security: ChannelSecurity, timeout: float = 60.0) -> worker_pb2.GetMeshResponse:
    """Rank 0's view of its mesh, once every rank has registered (raises Unavailable after `timeout` s,
    naming the ranks still missing)."""
    with security.channel(rank0) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        try:
            mesh = stub.GetMesh(
                worker_pb2.GetMeshRequest(wait_seconds=timeout),
                timeout=timeout + 30.0,
                wait_for_ready=True,
                metadata=security.metadata(),
            )
        except grpc.RpcError as error:
            raise from_status(error.code(), f"GetMesh on rank 0 ({rank0}): {error.details()}", error) from None
    if not mesh.complete:
        present = {member.rank for member in mesh.members}
        missing = [rank for rank in range(mesh.world_size) if rank not in present]
        raise Unavailable(
            f"rank 0 ({rank0}) expects {mesh.world_size} ranks but rank(s) {missing} did not register within "
            f"{timeout:.0f} s: are they running, and can they reach rank 0?"
        )
    return mesh


class RestartCheck:
    """Turns a failed call into a FailedPrecondition naming the ranks whose worker restarted (whose
    incarnation differs from the one seen when the client connected); other failures pass as they are.
    A failure on one rank often shows first on another (its collective partner), so every rank is asked."""

    def __init__(
        self, addresses: Sequence[str], incarnations: Sequence[str], security: ChannelSecurity, timeout: float = 5.0
    ) -> None:
        self.addresses, self.incarnations, self.security = list(addresses), list(incarnations), security
        self.timeout = timeout

    def current(self) -> list[str | None]:
        """Every rank's incarnation now (asked concurrently); None for a rank that does not answer in time."""
        channels = [self.security.channel(address) for address in self.addresses]
        try:
            calls = [
                worker_pb2_grpc.WorkerServiceStub(channel).GetStatus.future(
                    worker_pb2.GetStatusRequest(), timeout=self.timeout, metadata=self.security.metadata()
                )
                for channel in channels
            ]
            return [None if call.exception() is not None else call.result().incarnation for call in calls]
        finally:
            for channel in channels:
                channel.close()

    def restarted(self) -> dict[int, str]:
        """{rank: its new incarnation} for the ranks that answer as another process than at connection time."""
        now = self.current()
        return {
            rank: new
            for rank, (seen, new) in enumerate(zip(self.incarnations, now, strict=True))
            if seen and new is not None and new != seen
        }

    def __call__(self, rank: int, error: TwinkleError) -> TwinkleError:
        restarted = self.restarted()
        if not restarted:
            return error
        names = ", ".join(
            f"rank {r} ({self.addresses[r]}, incarnation {self.incarnations[r][:8]} -> {new[:8]})"
            for r, new in sorted(restarted.items())
        )
        return FailedPrecondition(
            f"{names} restarted: a new worker process whose model, adapters and optimizer state are gone; close "
            f"this model and build it again (resume from a checkpoint). The call failed with: {error}"
        )
