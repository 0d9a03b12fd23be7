"""Where a worker sits in its mesh (rank, local rank, world size, rank 0's host), read from the engine that started it.

Used by the `twinkle-worker` command. The first source that applies wins, field by field after the flags:

1. the command line (`--rank`, `--local-rank`, `--world-size`, `--master-addr`, `--master-port`); a Ray actor
   started by twinkle_client.ray_workers gets its place this way;
2. torchrun: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` (its `MASTER_PORT` is torchrun's own store,
   so it is not reused for the mesh's rendezvous);
3. Slurm (srun): `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, rank 0's host = the first host of
   `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`), in Slurm's compressed form (`node[01-04,07]`);
4. Kubernetes: a LeaderWorkerSet pod (`LWS_WORKER_INDEX`, `LWS_GROUP_SIZE`, `LWS_LEADER_ADDRESS`, all set by
   LWS); a JobSet pod (`JOB_COMPLETION_INDEX` set by the Job controller, plus `JOBSET_NAME`,
   `REPLICATED_JOB_NAME`, `JOB_INDEX`, `REPLICATED_JOB_REPLICAS` mapped from the jobset.sigs.k8s.io labels by
   the manifest; rank 0 is `<jobset>-<replicated job>-0-0.<subdomain>`); an Indexed Job pod
   (`JOB_COMPLETION_INDEX`); a StatefulSet pod (the ordinal at the end of `POD_NAME`; rank 0 is
   the same name with ordinal 0, under the pod's own DNS subdomain when `POD_FQDN` gives it).
5. nothing: a single rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from twinkle_protocol.errors import InvalidArgument

SOURCES = ("flags", "torchrun", "slurm", "kubernetes", "none")
_ORDINAL = re.compile(r"^(?P<prefix>.+)-(?P<ordinal>\d+)$")


@dataclass(frozen=True)
class Placement:
    """A worker's place in its mesh and who said so."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # Host (or DNS name) at which every rank reaches rank 0; None for a single rank.
    master_addr: str | None = None
    # A rendezvous port fixed by the operator; None: rank 0 offers a free one when the client asks.
    master_port: int | None = None
    # Which engine the rank came from: one of SOURCES.
    source: str = "none"

    def check(self) -> Placement:
        """Raises InvalidArgument naming the field when the placement is impossible."""
        if self.world_size < 1:
            raise InvalidArgument(f"placement ({self.source}): world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"placement ({self.source}): rank {self.rank} outside a world of {self.world_size}")
        if self.local_rank < 0:
            raise InvalidArgument(f"placement ({self.source}): local rank {self.local_rank} must be >= 0")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise InvalidArgument(f"placement ({self.source}): master port {self.master_port} is not a TCP port")
        return self


def resolve(env: Mapping[str, str], flags: Mapping[str, object] | None = None) -> Placement:
    """The placement from the environment, each flag that is not None overriding its field.

    `flags` keys are Placement's field names (rank, local_rank, world_size, master_addr, master_port).
    """
    placement = from_environment(env)
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    if given:
        placement = replace(placement, **given, source="flags" if placement.source == "none" else placement.source)
    return placement.check()


def from_environment(env: Mapping[str, str]) -> Placement:
    """The first engine whose variables are set, in the module's order; a single rank when none is."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return from_torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return from_slurm(env)
    kubernetes = from_kubernetes(env)
    return kubernetes if kubernetes is not None else Placement()


def from_torchrun(env: Mapping[str, str]) -> Placement:
    return Placement(
        rank=_integer(env, "RANK"),
        local_rank=_integer(env, "LOCAL_RANK", 0),
        world_size=_integer(env, "WORLD_SIZE"),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        source="torchrun",
    )


def from_slurm(env: Mapping[str, str]) -> Placement:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return Placement(
        rank=_integer(env, "SLURM_PROCID"),
        local_rank=_integer(env, "SLURM_LOCALID", 0),
        world_size=_integer(env, "SLURM_NTASKS"),
        master_addr=expand_hostlist(nodelist)[0] if nodelist else None,
        source="slurm",
    )


def from_kubernetes(env: Mapping[str, str]) -> Placement | None:
    """A pod's placement, or None when no pod variable is set. The world size of a JobSet, Indexed Job
    or StatefulSet pod is not in its environment: the manifest passes --world-size."""
    if "LWS_WORKER_INDEX" in env:
        return Placement(
            rank=_integer(env, "LWS_WORKER_INDEX"),
            world_size=_integer(env, "LWS_GROUP_SIZE", 1),
            master_addr=env.get("LWS_LEADER_ADDRESS") or None,
            source="kubernetes",
        )
    if "JOB_COMPLETION_INDEX" in env:
        return _from_job(env)
    # POD_NAME only (the manifest maps metadata.name): a Deployment pod's HOSTNAME may end in digits too.
    name = env.get("POD_NAME")
    match = _ORDINAL.match(name or "")
    if match is None:
        return None
    head = f"{match['prefix']}-0"
    fqdn = env.get("POD_FQDN", "")
    if fqdn.startswith(f"{name}."):
        head += fqdn[len(name or "") :]
    return Placement(rank=int(match["ordinal"]), master_addr=head, source="kubernetes")


def _from_job(env: Mapping[str, str]) -> Placement:
    """An Indexed Job's pod; in a JobSet, ranks run across the replicated job's Jobs, JOB_INDEX outermost."""
    index = _integer(env, "JOB_COMPLETION_INDEX")
    jobset = env.get("JOBSET_NAME")
    if not jobset:
        return Placement(rank=index, source="kubernetes")
    job_index = _integer(env, "JOB_INDEX", 0)
    jobs = _integer(env, "REPLICATED_JOB_REPLICAS", 1)
    per_job = _integer(env, "JOB_COMPLETIONS", 1)
    subdomain = env.get("JOBSET_SUBDOMAIN") or jobset
    head = f"{jobset}-{env.get('REPLICATED_JOB_NAME', 'workers')}-0-0.{subdomain}"
    return Placement(rank=job_index * per_job + index, world_size=jobs * per_job, master_addr=head, source="kubernetes")


def _integer(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise InvalidArgument(f"placement: {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"placement: {name}={value!r} is not an integer") from None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: 'node[01-03,07],gpu[1-2]-b' ->
    ['node01', 'node02', 'node03', 'node07', 'gpu1-b', 'gpu2-b']; several bracket groups in one
    name multiply ('r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2); zero padding follows the range's start."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        if item:
            hosts.extend(_expand_item(item, hostlist))
    if not hosts:
        raise InvalidArgument(f"placement: host list {hostlist!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    return items


def _expand_item(item: str, whole: str) -> list[str]:
    opening = item.find("[")
    if opening < 0:
        if "]" in item:
            raise InvalidArgument(f"placement: host list {whole!r} has an unmatched ']'")
        return [item]
    closing = item.find("]", opening)
    if closing < 0:
        raise InvalidArgument(f"placement: host list {whole!r} has an unclosed '['")
    prefix, ranges, rest = item[:opening], item[opening + 1 : closing], item[closing + 1 :]
    tails = _expand_item(rest, whole) if rest else [""]
    return [f"{prefix}{number}{tail}" for number in _expand_ranges(ranges, whole) for tail in tails]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise InvalidArgument(f"placement: host list {whole!r} has a bad range {part!r}")
        if not high:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise InvalidArgument(f"placement: host list {whole!r} has a descending range {part!r}")
        numbers.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return numbers


def local_device(device: str, local_rank: int, visible_gpus: int) -> str:
    """The device a rank uses: `cuda` means the local rank's GPU, or the only GPU this process sees
    (Slurm's --gpus-per-task and Kubernetes' nvidia.com/gpu: 1 leave one visible); explicit ones stay."""
    if device != "cuda":
        return device
    if visible_gpus == 1:
        return "cuda:0"
    if local_rank >= visible_gpus:
        raise InvalidArgument(f"placement: local rank {local_rank} has no GPU: this process sees {visible_gpus}")
    return f"cuda:{local_rank}"


def listen_port(port: int | None, port_base: int | None, local_rank: int) -> int:
    """--port, or --port-base + local rank (one port per rank on a host)."""
    if port is not None and port_base is not None:
        raise InvalidArgument("--port and --port-base exclude each other")
    if port_base is not None:
        return port_base + local_rank
    return port if port is not None else 50051


def rank0_address(placement: Placement, port: int | None, port_base: int | None) -> str | None:
    """Where rank 0's gRPC server listens, as the other ranks reach it (its host; --port, which every rank
    shares, or --port-base, since rank 0 is local rank 0 of its host); None for a single rank."""
    if placement.world_size == 1 or placement.master_addr is None:
        return None
    rank0_port = port_base if port_base is not None else (port if port is not None else 50051)
    host = placement.master_addr
    return f"[{host}]:{rank0_port}" if ":" in host else f"{host}:{rank0_port}"
