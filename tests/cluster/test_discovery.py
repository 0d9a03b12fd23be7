"""Rank 0 knows the mesh: two workers placed by torchrun's variables register with rank 0, a client
given only rank 0's address finds both, trains like the embedded default, and is told clearly when
a rank's worker restarted."""

from __future__ import annotations

import grpc
import pytest
from cluster_support import (
    WorkerProcess,
    clean_environment,
    free_port_pair,
    tls_workers_placed_by_flags,
    torchrun_env,
    train,
)
from dist_reference import RTOL, SEED, tiny_config

from twinkle_client import cluster
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import FailedPrecondition
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.security import ChannelSecurity


def stub(address: str) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(address))


def test_rank0_finds_the_mesh_trains_and_names_a_restarted_rank(tmp_path, windows, embedded_losses) -> None:  # type: ignore[no-untyped-def]
    from twinkle_client.model import TransformersModel

    port = free_port_pair()
    args = ["--host", "127.0.0.1", "--port-base", str(port), "--threads", "1", "--output-root", str(tmp_path)]
    addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    # Rank 1 first: it waits for rank 0 to come up, then registers.
    workers = [WorkerProcess(args, torchrun_env(1), tmp_path / "rank1.log")]
    workers.insert(0, WorkerProcess(args, torchrun_env(0), tmp_path / "rank0.log"))
    try:
        assert [worker.address for worker in workers] == addresses  # --port-base + LOCAL_RANK
        mesh = cluster.discover(addresses[0], ChannelSecurity(), timeout=120.0)
        assert mesh.complete and mesh.world_size == 2
        assert [m.address for m in mesh.members] == addresses
        assert [(m.rank, m.local_rank, m.world_size, m.source) for m in mesh.members] == [
            (0, 0, 2, "torchrun"),
            (1, 1, 2, "torchrun"),
        ]
        assert [m.pid for m in mesh.members] == [w.process.pid for w in workers]
        assert [(m.host, m.device) for m in mesh.members] == [("127.0.0.1", "cpu")] * 2
        incarnations = [m.incarnation for m in mesh.members]
        assert all(incarnations) and incarnations[0] != incarnations[1]
        assert (mesh.master_addr, mesh.master_port) == ("127.0.0.1", 0)  # not torchrun's MASTER_PORT

        # Rank 1 serves no registry, and says where rank 0 is.
        with pytest.raises(grpc.RpcError) as refused:
            stub(addresses[1]).GetMesh(worker_pb2.GetMeshRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rank 1" in refused.value.details() and f"rank 0 at {addresses[0]}" in refused.value.details()
        # A registration that does not fit is refused, naming the field; the mesh is unchanged.
        bad = worker_pb2.MeshMember(rank=1, world_size=3, address="127.0.0.1:1", incarnation="x")
        with pytest.raises(grpc.RpcError) as refused:
            stub(addresses[0]).RegisterRank(worker_pb2.RegisterRankRequest(member=bad), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "world size 3" in refused.value.details() and "rank 0" in refused.value.details()
        # A placed worker refuses an Init for another rank before building anything.
        wrong = worker_pb2.InitRequest(rank=0, mesh=worker_pb2.DeviceMesh(dim_names=["dp"], dim_sizes=[2]))
        with pytest.raises(grpc.RpcError) as refused:
            stub(addresses[1]).Init(wrong, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "placed as rank 1, Init asks for rank 0" in refused.value.details()
        again = cluster.discover(addresses[0], ChannelSecurity(), timeout=10.0)
        assert [m.address for m in again.members] == addresses
        assert not stub(addresses[1]).GetStatus(worker_pb2.GetStatusRequest(), timeout=30).initialized

        model = TransformersModel(
            rank0_address=addresses[0],
            config=tiny_config(),
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
            mixed_precision="no",
            seed=SEED,
        )
        try:
            assert model.coordinator.addresses == addresses
            assert train(model, windows) == pytest.approx(embedded_losses, rel=RTOL)

            workers[1].kill()  # the engine restarts rank 1: same place, new process
            workers[1] = WorkerProcess(args, torchrun_env(1), tmp_path / "rank1-again.log")
            with pytest.raises(FailedPrecondition, match=rf"rank 1 \({addresses[1]}, incarnation .*\) restarted"):
                model.forward_backward(windows[0][0])
            assert list(model.coordinator.explain_failure.restarted()) == [1]  # rank 0 is the same process
        finally:
            model.close()
    finally:
        for worker in workers:
            worker.stop()


def test_ranks_register_with_rank0_over_tls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 checks rank 0's certificate with --tls-root-cert when it registers; a client that trusts
    the same CA finds both ranks."""
    pki, port, workers = tls_workers_placed_by_flags(tmp_path, clean_environment())
    try:
        mesh = cluster.discover(f"127.0.0.1:{port}", ChannelSecurity.from_files(root_cert=str(pki.ca)), timeout=120.0)
        assert [m.address for m in mesh.members] == [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        assert [m.source for m in mesh.members] == ["flags", "flags"]
        with pytest.raises(grpc.RpcError):  # plaintext is refused: the registration did travel over TLS
            stub(f"127.0.0.1:{port}").GetMesh(worker_pb2.GetMeshRequest(), timeout=10)
    finally:
        for worker in workers:
            worker.stop()
