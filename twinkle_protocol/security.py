"""ChannelSecurity: how a caller reaches workers (a bearer token, TLS): the client's channels, and a
worker's own calls to its peers (twinkle_worker.mesh_registry)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass(frozen=True)
class ChannelSecurity:
    """How the client reaches its workers: a bearer token, and TLS (PEM bytes).

    TLS is on when `tls` is set or any certificate is given; `root_certificates` is the CA
    that signed the workers' certificates (None: the system's roots); `certificate_chain` and
    `private_key` are this client's certificate for mutual TLS; `server_name` overrides the
    name checked against the workers' certificates (for workers reached by IP address).
    """

    token: str | None = field(default=None, repr=False)
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None
    tls: bool = False

    @classmethod
    def from_files(
        cls,
        token: str | None = None,
        root_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        tls: bool = False,
    ) -> ChannelSecurity:
        """Reads the PEM files named (paths); None leaves a part out."""

        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return cls(token or None, read(root_cert), read(client_cert), read(client_key), server_name, tls)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to `address`: TLS when configured, plaintext otherwise."""
        if not self.uses_tls:
            return grpc.insecure_channel(address, options=list(options))
        credentials = grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, credentials, options=[*options, *extra])
