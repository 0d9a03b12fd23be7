"""The gRPC metadata keys of the protocol (besides `authorization: Bearer <token>`).

SESSION_METADATA names the client session that owns a worker (docs/protocol.md, "Sessions");
the worker answers every call with the three timing keys in its trailing metadata, in seconds
(twinkle_worker.metrics writes them, twinkle_client.timing reads them). The call stream carries
metadata as MetadataEntry messages (pairs_of, add_entries: both of its ends).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SESSION_METADATA = "twinkle-session-id"
QUEUE_KEY, COMPUTE_KEY, HANDLER_KEY = "twinkle-queue-seconds", "twinkle-compute-seconds", "twinkle-handler-seconds"


def pairs_of(entries: Iterable[Any]) -> tuple[tuple[str, Any], ...]:
    """MetadataEntry messages as gRPC hands metadata to code: bytes for "-bin" keys, text otherwise."""
    return tuple(
        (entry.key, entry.value if entry.key.endswith("-bin") else entry.value.decode(errors="replace"))
        for entry in entries
    )


def add_entries(repeated: Any, pairs: Iterable[tuple[str, Any]]) -> None:
    """gRPC metadata pairs appended to a repeated MetadataEntry field (text values as UTF-8)."""
    for key, value in pairs:
        repeated.add(key=key, value=value if isinstance(value, bytes) else str(value).encode())
