"""Placement rules (twinkle_worker.placement) fed each engine's real variable set."""

from __future__ import annotations

import pytest

from twinkle_protocol.errors import InvalidArgument
from twinkle_worker import placement
from twinkle_worker.placement import Placement

# What `torchrun --nnodes 2 --nproc-per-node 2` gives its rank 3 (torch/distributed/elastic/agent).
TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "ROLE_RANK": "3",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_RESTART_COUNT": "0",
}
# What `srun` gives task 3 of `sbatch --nodes 2 --ntasks-per-node 2` (Slurm 22.05).
SLURM = {
    "SLURM_JOB_ID": "17",
    "SLURM_JOB_NAME": "twinkle",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_NODELIST": "gpu-[07-08]",
    "SLURM_STEP_NODELIST": "gpu-[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURMD_NODENAME": "gpu-08",
    "SLURM_STEP_ID": "0",
}
# A LeaderWorkerSet pod: LWS injects these into every container of the group (worker 1 of group 0).
LWS = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "HOSTNAME": "twinkle-0-1",
    "LWS_LEADER_ADDRESS": "twinkle-0.twinkle.default",
    "LWS_GROUP_SIZE": "4",
    "LWS_WORKER_INDEX": "1",
}
# A JobSet pod: JOB_COMPLETION_INDEX from the Job controller, the rest from jobset.sigs.k8s.io labels
# through the downward API (deploy/kubernetes/jobset); 2 Jobs of 2 pods, the second pod of the second Job.
JOBSET = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "HOSTNAME": "train-workers-1-1",
    "JOB_COMPLETION_INDEX": "1",
    "JOBSET_NAME": "train",
    "REPLICATED_JOB_NAME": "workers",
    "JOB_INDEX": "1",
    "REPLICATED_JOB_REPLICAS": "2",
    "JOB_COMPLETIONS": "2",
}
# A StatefulSet pod: the pod name carries the ordinal (POD_NAME from metadata.name).
STATEFULSET = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "HOSTNAME": "twinkle-2",
    "POD_NAME": "twinkle-2",
    "POD_FQDN": "twinkle-2.twinkle.ml.svc.cluster.local",
}


def test_torchrun() -> None:
    got = placement.resolve(TORCHRUN)
    # MASTER_PORT is torchrun's own store: the mesh's rendezvous must not reuse it.
    assert got == Placement(3, 1, 4, "node01", None, "torchrun")


def test_slurm_rank_from_procid_and_head_from_the_step_nodelist() -> None:
    assert placement.resolve(SLURM) == Placement(3, 1, 4, "gpu-07", None, "slurm")
    only_job = {k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_NODELIST")}
    assert placement.resolve(dict(only_job, SLURM_JOB_NODELIST="a[3-4],b1")).master_addr == "a3"


def test_torchrun_inside_slurm_wins() -> None:
    """torchrun started by srun, one per node: the ranks are torchrun's, not Slurm's tasks."""
    assert placement.resolve({**SLURM, **TORCHRUN}).source == "torchrun"


def test_leaderworkerset() -> None:
    assert placement.resolve(LWS) == Placement(1, 0, 4, "twinkle-0.twinkle.default", None, "kubernetes")


def test_jobset_ranks_run_across_jobs() -> None:
    assert placement.resolve(JOBSET) == Placement(3, 0, 4, "train-workers-0-0.train", None, "kubernetes")
    with_subdomain = dict(JOBSET, JOBSET_SUBDOMAIN="mesh", JOB_INDEX="0", JOB_COMPLETION_INDEX="0")
    assert placement.resolve(with_subdomain) == Placement(0, 0, 4, "train-workers-0-0.mesh", None, "kubernetes")


def test_statefulset_ordinal_and_head_dns_name() -> None:
    got = placement.resolve(STATEFULSET, {"world_size": 3})
    assert got == Placement(2, 0, 3, "twinkle-0.twinkle.ml.svc.cluster.local", None, "kubernetes")
    without_fqdn = {k: v for k, v in STATEFULSET.items() if k != "POD_FQDN"}
    assert placement.resolve(without_fqdn, {"world_size": 3}).master_addr == "twinkle-0"


def test_statefulset_without_world_size_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="rank 2 outside a world of 1"):
        placement.resolve(STATEFULSET)


def test_flags_override_field_by_field() -> None:
    got = placement.resolve(SLURM, {"master_addr": "head", "master_port": 29400, "rank": None})
    assert got == Placement(3, 1, 4, "head", 29400, "slurm")
    assert placement.resolve({}, {"rank": 1, "world_size": 2, "master_addr": "h"}) == Placement(
        1, 0, 2, "h", None, "flags"
    )


def test_no_engine_is_one_rank() -> None:
    assert placement.resolve({"HOME": "/root", "HOSTNAME": "laptop-3"}) == Placement()
    # A Deployment pod whose random suffix happens to be all digits is not a StatefulSet's rank.
    assert placement.resolve({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "web-5d4f9-38271"}) == Placement()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "rank 4 outside a world of 4"),
        ({"LWS_WORKER_INDEX": "1", "LWS_GROUP_SIZE": "0"}, "world size 0"),
    ],
)
def test_bad_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        placement.resolve(env)


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("127.0.0.1", ["127.0.0.1"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert placement.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-", "node]", "node[a-b]", "node[5-3]", ""])
def test_bad_hostlist_is_refused(hostlist: str) -> None:
    with pytest.raises(InvalidArgument, match="host list"):
        placement.expand_hostlist(hostlist)


def test_cuda_binds_the_local_ranks_gpu() -> None:
    assert placement.local_device("cuda", 3, 8) == "cuda:3"
    assert placement.local_device("cuda", 3, 1) == "cuda:0"  # --gpus-per-task=1: the only visible GPU
    assert placement.local_device("cuda:5", 3, 8) == "cuda:5"
    assert placement.local_device("cpu", 3, 0) == "cpu"
    with pytest.raises(InvalidArgument, match="local rank 2 has no GPU"):
        placement.local_device("cuda", 2, 2)


def test_ports_and_rank0_address() -> None:
    assert placement.listen_port(None, 50100, 3) == 50103
    assert placement.listen_port(50051, None, 3) == 50051
    with pytest.raises(InvalidArgument, match="exclude"):
        placement.listen_port(1, 2, 0)
    slurm = placement.resolve(SLURM)
    assert placement.rank0_address(slurm, None, 50100) == "gpu-07:50100"
    assert placement.rank0_address(placement.resolve(LWS), 50051, None) == "twinkle-0.twinkle.default:50051"
    assert placement.rank0_address(Placement(), None, 50100) is None
