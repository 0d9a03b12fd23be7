"""wait_ready: a health check refused UNAVAILABLE once (as one sent on a connection that just dropped
is) is tried again within the timeout; a worker that never answers still gives False in time."""

from __future__ import annotations

import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinkle_client.coordinator import wait_ready


class FlakyHealth(health_pb2_grpc.HealthServicer):
    """Refuses the first `refusals` checks with UNAVAILABLE, then answers SERVING."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.checks = 0

    def Check(self, request: Any, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        self.checks += 1
        if self.checks <= self.refusals:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def serve(servicer: FlakyHealth) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_check_refused_unavailable_is_tried_again() -> None:
    health = FlakyHealth(refusals=2)
    server, address = serve(health)
    try:
        with grpc.insecure_channel(address) as channel:
            assert wait_ready(channel, 10.0)
        assert health.checks == 3
    finally:
        server.stop(None)


def test_a_worker_that_never_answers_gives_false_within_the_timeout() -> None:
    health = FlakyHealth(refusals=10**9)
    server, address = serve(health)
    try:
        with grpc.insecure_channel(address) as channel:
            started = time.monotonic()
            assert not wait_ready(channel, 1.0)
            assert time.monotonic() - started < 5.0
    finally:
        server.stop(None)
