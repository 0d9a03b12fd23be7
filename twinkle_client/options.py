"""ClientOptions: the client's own keyword arguments of TransformersModel, each with its default once.

TransformersModel(..., **kwargs) takes them by name (ClientOptions.pop_from) or whole as
`options=ClientOptions(...)`; the other keyword arguments go to the workers' from_pretrained /
from_config. README.md's "Client options" table lists the same fields (a unit test compares them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from twinkle_protocol.errors import InvalidArgument

LAUNCHERS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """The client's options (docs/reliability.md for security and failures).

    Attributes:
        seed: the seed of every rank (the same on each); None: a random one.
        device: the device of embedded workers ("cpu", "cuda", ...).
        output_root: embedded workers' checkpoint root; None: the current directory.
        timeout: seconds per call; None: no limit.
        rendezvous_timeout: seconds any collective may wait.
        trust_remote_code: whether the workers may run a model's own code from the Hub.
        addresses: worker addresses in rank order, instead of a cluster config (for schedulers
            that place workers themselves).
        rank0_address: only rank 0's address, of workers that an engine placed: the others come
            from its GetMesh.
        discover_timeout: seconds for every rank to register with rank 0 (with rank0_address).
        launcher: "local" (embedded worker processes) or "ray" (Ray actors; the `[ray]` extra).
        token: the bearer token; None: the cluster config's token_env (embedded workers get a
            random one).
        tls_root_cert: PEM path of the root certificate; None: the cluster config's.
        tls_client_cert: PEM path of the client certificate (mutual TLS); None: the cluster config's.
        tls_client_key: PEM path of the client key; None: the cluster config's.
        tls_server_name: the name the workers' certificates are checked against; None: the cluster config's.
        retry_seconds: how long an unreachable worker is retried before its error is raised.
        abort_grace_seconds: how long to wait for the other ranks once one rank's collective failed.
        lease_seconds: how long this client may stay silent before another client may take its
            workers over; 0: the workers' --lease-seconds.
        shared_memory: whether batches and outputs may go through /dev/shm to workers on this host.
        metrics: whether embedded workers serve Prometheus metrics on free ports (metrics_urls()).
        tracer_provider: an OpenTelemetry TracerProvider: every call gets a span and carries its
            trace context to the workers (the `[otel]` extra); None: no tracing.
        call_stream: whether the per-step calls go as messages on one stream per worker (about half
            a unary call's cost; twinkle_client.call_stream) instead of unary calls. Off with a
            tracer_provider, so that every call keeps its client span.
    """

    seed: int | None = None
    device: str = "cpu"
    output_root: str | None = None
    timeout: float | None = None
    rendezvous_timeout: float = 300.0
    trust_remote_code: bool = False
    addresses: Sequence[str] | None = None
    rank0_address: str | None = None
    discover_timeout: float = 120.0
    launcher: str = "local"
    token: str | None = None
    tls_root_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_server_name: str | None = None
    retry_seconds: float = 5.0
    abort_grace_seconds: float = 10.0
    lease_seconds: float = 0.0
    shared_memory: bool = True
    metrics: bool = False
    tracer_provider: Any = None
    call_stream: bool = True

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise InvalidArgument(
                f"launcher {self.launcher!r} is unknown; use 'local' (processes) or 'ray' (Ray actors)"
            )
        for name in ("rendezvous_timeout", "discover_timeout", "retry_seconds", "abort_grace_seconds", "lease_seconds"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("trust_remote_code", "shared_memory", "metrics", "call_stream"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any], base: ClientOptions | None = None) -> ClientOptions:
        """The options among `kwargs` (removed from it; the rest are the model's), over `base`'s."""
        given = {field.name: kwargs.pop(field.name) for field in dataclasses.fields(cls) if field.name in kwargs}
        return dataclasses.replace(base or cls(), **given)
