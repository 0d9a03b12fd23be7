"""The gRPC metadata keys of the protocol (besides `authorization: Bearer <token>`).

SESSION_METADATA names the client session that owns a worker (docs/protocol.md, "Sessions");
the worker answers every call with the three timing keys in its trailing metadata, in seconds
(twinkle_worker.metrics writes them, twinkle_client.timing reads them).
"""

SESSION_METADATA = "twinkle-session-id"
QUEUE_KEY, COMPUTE_KEY, HANDLER_KEY = "twinkle-queue-seconds", "twinkle-compute-seconds", "twinkle-handler-seconds"
