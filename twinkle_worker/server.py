"""gRPC server of one worker: WorkerService plus the standard health and reflection services.

Used by the `twinkle-worker` command and by tests that start a server in-process.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twinkle_client._proto import worker_pb2, worker_pb2_grpc
from twinkle_worker.servicer import WorkerOptions, WorkerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
DEFAULT_MAX_MESSAGE_MB = 256


class WorkerServer:
    """A started server; `port` is the bound port (ask for port 0 to get a free one)."""

    def __init__(self, options: WorkerOptions, port: int, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> None:
        limit = max_message_mb << 20
        self.servicer = WorkerServicer(options)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{options.host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {options.host}:{port}")
        self.address = f"{options.host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", SERVICE_NAME, self.address)

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuses new calls, lets the one in progress finish (up to `grace` seconds), then stops."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.servicer.close()

    def wait(self) -> None:
        self.server.wait_for_termination()
