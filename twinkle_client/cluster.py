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
With no TWINKLE_CLUSTER set, a TransformersModel starts local workers itself (embedded default).
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

from twinkle_client.errors import InvalidArgument, NotFound

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
    workers = entry.get("workers") if isinstance(entry, dict) else None
    if not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise InvalidArgument(f"cluster group {name!r} needs 'workers': a list of 'host:port' in rank order")
    port = entry.get("master_port")
    tls = {key: entry.get(key) for key in ("tls_root_cert", "tls_client_cert", "tls_client_key", "tls_server_name")}
    if bool(tls["tls_client_cert"]) != bool(tls["tls_client_key"]):
        raise InvalidArgument(f"cluster group {name!r}: tls_client_cert and tls_client_key go together")
    master_addr = entry.get("master_addr")
    return WorkerGroup(name, tuple(workers), master_addr, int(port) if port else None, entry.get("token_env"), **tls)


def host_of(address: str) -> str:
    """'host:port' -> 'host' ('[::1]:50051' -> '::1')."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host
