"""Rank 0's record of its mesh (the RegisterRank and GetMesh RPCs) and each rank's registration with rank 0.

Used by the servicer (rank 0 answers both RPCs) and by the `twinkle-worker` command (every other rank
registers). A client that knows only rank 0's address asks GetMesh for the rest (twinkle_client.cluster).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc

from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument
from twinkle_protocol.security import ChannelSecurity

log = logging.getLogger(__name__)

# Chosen once per worker process: a new value at a known address means the worker restarted.
INCARNATION = uuid.uuid4().hex
MAX_WAIT_SECONDS = 600.0
# How often a rank registers again (a restarted rank 0 relearns the mesh within this).
REGISTER_INTERVAL_SECONDS = 5.0


class MeshRegistry:
    """Rank 0's table of the ranks that registered, newest registration of each rank kept."""

    def __init__(self, own: worker_pb2.MeshMember, master_addr: str, master_port: int | None) -> None:
        self.own = own
        self.master_addr, self.master_port = master_addr, master_port or 0
        self._members: dict[int, tuple[worker_pb2.MeshMember, float]] = {0: (own, time.monotonic())}
        self._changed = threading.Condition()

    def register(self, member: worker_pb2.MeshMember) -> worker_pb2.RegisterRankResponse:
        world = self.own.world_size
        if member.world_size != world:
            raise InvalidArgument(
                f"RegisterRank: rank {member.rank} was started with world size {member.world_size}, rank 0 with {world}"
            )
        if not 0 < member.rank < world:
            raise InvalidArgument(f"RegisterRank: member.rank {member.rank} must be in [1, {world}) (rank 0 is this)")
        if ":" not in member.address or not member.incarnation:
            raise InvalidArgument(f"RegisterRank: rank {member.rank} needs an address 'host:port' and an incarnation")
        with self._changed:
            previous = self._members.get(member.rank)
            if previous is None or previous[0].incarnation != member.incarnation:
                log.info("rank %d registered: %s (%s, incarnation %s)", member.rank, member.address, member.device,
                         member.incarnation[:8])  # fmt: skip
            stored = worker_pb2.MeshMember()
            stored.CopyFrom(member)
            stored.ClearField("seconds_since_registered")
            self._members[member.rank] = (stored, time.monotonic())
            self._changed.notify_all()
        return worker_pb2.RegisterRankResponse(incarnation=self.own.incarnation)

    def describe(self, wait_seconds: float) -> worker_pb2.GetMeshResponse:
        """The mesh, once every rank registered or after `wait_seconds`, whichever comes first."""
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            raise InvalidArgument(f"GetMesh: wait_seconds must be in [0, {MAX_WAIT_SECONDS:.0f}], got {wait_seconds}")
        world = self.own.world_size
        with self._changed:
            complete = self._changed.wait_for(lambda: len(self._members) == world, timeout=wait_seconds)
            now = time.monotonic()
            members = []
            for rank in sorted(self._members):
                member, heard = self._members[rank]
                copy = worker_pb2.MeshMember()
                copy.CopyFrom(member)
                copy.seconds_since_registered = 0.0 if rank == 0 else now - heard
                members.append(copy)
        return worker_pb2.GetMeshResponse(
            world_size=world,
            members=members,
            complete=complete,
            master_addr=self.master_addr,
            master_port=self.master_port,
        )


def not_rank0(rank: int, rank0: str | None) -> FailedPrecondition:
    where = f"rank 0 at {rank0}" if rank0 else "rank 0"
    return FailedPrecondition(
        f"this worker is rank {rank}, not rank 0: ask {where} (RegisterRank and GetMesh)", reason="NOT_RANK0"
    )


class Registrar:
    """Registers this rank with rank 0 now, and again every `interval` seconds until stopped."""

    def __init__(
        self,
        rank0_address: str,
        member: worker_pb2.MeshMember,
        security: ChannelSecurity,
        interval: float = REGISTER_INTERVAL_SECONDS,
    ) -> None:
        self.rank0_address, self.member, self.security, self.interval = rank0_address, member, security, interval
        self.registered = threading.Event()  # set after the first success
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="register-with-rank0", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        request = worker_pb2.RegisterRankRequest(member=self.member)
        last_refusal = ""
        with self.security.channel(self.rank0_address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            while not self._stop.is_set():
                try:  # wait_for_ready: while rank 0 is not up yet, the call waits for it (up to the interval)
                    stub.RegisterRank(
                        request, timeout=self.interval, wait_for_ready=True, metadata=self.security.metadata()
                    )
                    if not self.registered.is_set():
                        log.info("registered with rank 0 at %s", self.rank0_address)
                    self.registered.set()
                    pause = self.interval
                except grpc.RpcError as error:
                    # DEADLINE_EXCEEDED: rank 0 was not up for the whole interval; ask again at once.
                    pause = 0.0 if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else self.interval
                    refusal = f"{error.code().name}: {error.details()}"
                    if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED and refusal != last_refusal:
                        log.error("rank 0 at %s refused the registration: %s", self.rank0_address, refusal)
                    last_refusal = refusal
                self._stop.wait(pause)
