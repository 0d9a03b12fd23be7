"""WorkerOptions: how a worker process is started, each default written once; `twinkle-worker`'s flags
(twinkle_worker.cli), `twinkle-launch` (twinkle_worker.launch) and the server read their defaults here."""

from __future__ import annotations

from dataclasses import dataclass

# The environment variable holding the bearer token every call must carry (also read by twinkle-launch).
TOKEN_ENV = "TWINKLE_WORKER_TOKEN"
# Listen addresses that mean "every interface": the address a client dials is then this host's name.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass
class WorkerOptions:
    """How the worker process was started (command-line flags)."""

    host: str = "127.0.0.1"
    device: str = "cpu"
    output_root: str = "outputs"
    allow_remote_code: bool = False
    # An owner silent this long may be replaced by another session's Init (0: never).
    lease_seconds: float = 900.0
    # The largest batch a streamed request may declare (its bytes are allocated once the header passed
    # the session and sequence checks).
    max_stream_bytes: int = 8 << 30
    # A call whose next request message takes longer than this to arrive is cancelled (0: never).
    receive_timeout_seconds: float = 15.0
    # Accept tensors in /dev/shm segments named by a client on this host (docs/protocol.md, "Shared memory").
    shared_memory: bool = True
    # Checkpoint paths must lie under output_root; False (--allow-any-path, embedded workers): any path
    # this user can write.
    confine_paths: bool = True
    # The largest request message accepted, MiB: batches above 1 MiB travel as streams of 1 MiB frames (or
    # through shared memory), so no request of a client of ours comes near it; a caller without the
    # token is refused before its message is read at all.
    max_message_mb: int = 64
