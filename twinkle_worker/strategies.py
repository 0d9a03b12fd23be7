"""How a model is spread over the ranks: process group, torch DeviceMesh, DDP or FSDP2/HSDP wrapping.

Used by twinkle_worker.model at its first forward (wrapping is lazy, as in Twinkle, so
adapters and optimizers can be added first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, Unavailable
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.names import PRECISIONS, STRATEGIES

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 300.0


@dataclass
class Rendezvous:
    """Where the ranks meet (rank 0's TCPStore) and how long any collective may wait."""

    master_addr: str = "127.0.0.1"
    master_port: int = 0
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS


@dataclass
class StrategyPlan:
    """What the worker was asked for; `describe` says what it does with it."""

    strategy: str
    mesh: DeviceMesh
    device: torch.device
    mixed_precision: str
    ddp_config: dict[str, Any] = field(default_factory=dict)
    fsdp_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy {self.strategy!r} is unknown; use one of {list(STRATEGIES)}")
        if self.mixed_precision not in PRECISIONS:
            raise InvalidArgument(f"mixed_precision {self.mixed_precision!r} is unknown; use one of {list(PRECISIONS)}")
        if self.mesh.unsupported_dims:
            raise FailedPrecondition(
                f"mesh {self.mesh} has {self.mesh.unsupported_dims} > 1: tensor, pipeline and context "
                "parallelism are not served yet; use dp and fsdp only"
            )
        if self.mixed_precision == "fp8" and self.device.type != "cuda":
            raise FailedPrecondition(
                f"mixed_precision 'fp8' needs a CUDA device (this worker runs on {self.device}); use 'bf16' or 'no'"
            )
        if self.mixed_precision == "fp16" and self.uses_fsdp:
            raise FailedPrecondition(
                "mixed_precision 'fp16' with FSDP2/HSDP is not supported: its loss scaler would check each rank's "
                "gradient shard for inf/NaN alone, so ranks could disagree on skipping a step; use fp16 with DDP "
                "(a mesh of dp only) or 'bf16' with FSDP2"
            )
        if self.mixed_precision == "fp8":
            raise FailedPrecondition("mixed_precision 'fp8' is not supported yet; use 'bf16'")
        unknown = set(self.fsdp_config) - {"reshard_after_forward"}
        if unknown:
            raise InvalidArgument(f"fsdp_config: unknown keys {sorted(unknown)}; known: ['reshard_after_forward']")

    @property
    def uses_fsdp(self) -> bool:
        return self.mesh.world_size > 1 and (self.strategy == "native_fsdp" or self.mesh.size("fsdp") > 1)

    def describe(self) -> str:
        world = self.mesh.world_size
        if world == 1:
            return f"single process on {self.device}"
        if not self.uses_fsdp:
            return f"DDP over {world} ranks (accelerate DistributedDataParallelKwargs {self.ddp_config or {}})"
        dp, fsdp = self.mesh.size("dp"), self.mesh.size("fsdp")
        kind = "HSDP" if dp > 1 and fsdp > 1 else "FSDP2"
        text = f"{kind} (fully_shard per decoder layer + root) over mesh dp={dp} x fsdp={fsdp}"
        if self.strategy == "accelerate" and self.device.type == "cpu":
            text += "; accelerate's FSDP plugin would silently fall back to DDP on CPU, so fully_shard is used directly"
        return text


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(plan: StrategyPlan, rank: int, rendezvous: Rendezvous) -> None:
    """Joins the mesh's process group; every collective then times out after rendezvous.timeout_seconds."""
    world = plan.mesh.world_size
    if world == 1:
        return
    if dist.is_initialized():
        raise FailedPrecondition(
            "this worker already belongs to a process group; call Reset first", reason="ALREADY_INITIALIZED"
        )
    if not rendezvous.master_port:
        raise InvalidArgument("rendezvous.master_port must be set for a mesh of more than one rank")
    timeout = timedelta(seconds=rendezvous.timeout_seconds or DEFAULT_TIMEOUT_SECONDS)
    kwargs: dict[str, Any] = {}
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
        kwargs["device_id"] = plan.device
    address = f"{rendezvous.master_addr}:{rendezvous.master_port}"
    try:
        dist.init_process_group(
            backend=backend_for(plan.device),
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=world,
            timeout=timeout,
            **kwargs,
        )
    except (dist.DistStoreError, dist.DistNetworkError) as error:
        raise Unavailable(
            f"rank {rank} could not meet the other {world - 1} rank(s) at {address} within "
            f"{timeout.total_seconds():.0f} s (is every rank's Init in flight?): {str(error).splitlines()[0]}",
            reason="RENDEZVOUS_FAILED",
        ) from None


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_process_group() -> None:
    """Leaves the process group now, while peers may be waiting in a collective for this rank: their
    collectives then fail at once (gloo: "Connection closed by peer") instead of at the timeout."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()  # destroy would wait for the NCCL kernels that are stuck
        else:
            dist.destroy_process_group()
    except Exception as error:  # leaving is best effort: the mesh is broken either way
        log.warning("leaving the process group failed: %s", error)


def torch_mesh(plan: StrategyPlan) -> Any:
    """The (dp, fsdp) torch DeviceMesh, mapping Twinkle's row-major global ranks onto it."""
    from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh

    mesh = plan.mesh
    ranks = torch.arange(mesh.world_size).reshape(mesh.dim_sizes)
    order = [mesh.dim_names.index(dim) for dim in ("dp", "fsdp") if dim in mesh.dim_names]
    ranks = ranks.permute(*order, *[i for i in range(ranks.dim()) if i not in order])
    ranks = ranks.reshape(mesh.size("dp"), mesh.size("fsdp"))
    if mesh.size("dp") == 1:
        return TorchDeviceMesh(plan.device.type, ranks.reshape(-1), mesh_dim_names=("fsdp",))
    return TorchDeviceMesh(plan.device.type, ranks, mesh_dim_names=("dp", "fsdp"))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class the model lists in _no_split_modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise FailedPrecondition(f"cannot find the decoder layers of {type(base).__name__} to shard")
    return layers


def wrap(model: nn.Module, plan: StrategyPlan, several_adapters: bool) -> nn.Module:
    """Returns the module to run forward on: the model itself, a DDP wrapper, or the model sharded in place."""
    if plan.mesh.world_size == 1:
        return model
    if plan.uses_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if plan.mixed_precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mesh = torch_mesh(plan)
        reshard = bool(plan.fsdp_config.get("reshard_after_forward", True))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        log.info("wrapped: %s", plan.describe())
        return model
    from accelerate.utils import DistributedDataParallelKwargs

    try:
        ddp_kwargs = DistributedDataParallelKwargs(**plan.ddp_config).to_kwargs()
    except TypeError as error:
        raise InvalidArgument(f"ddp_config: {error}") from None
    if several_adapters and not ddp_kwargs.get("find_unused_parameters"):
        log.info("several trainable groups share the model: DDP runs with find_unused_parameters=True")
        ddp_kwargs["find_unused_parameters"] = True
    device_ids = [plan.device.index] if plan.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    log.info("wrapped: %s", plan.describe())
    return wrapped


def no_gradient_sync(wrapped: nn.Module, sync: bool) -> Any:
    """Context for one backward: gradients are reduced across ranks only when `sync`."""
    import contextlib

    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not sync:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# Counts a vote carries (a window's loss tokens and sequences): fixed, so that a rank that refuses
# (and has no counts to send) still gathers the same number of values as its peers.
VOTE_COUNTS = 2


def average_gradients(parameters: list[nn.Parameter], bucket_bytes: int = 25 << 20) -> None:
    """What DDP does at the end of a synchronised backward, run by hand after the ranks agreed the
    backward succeeded everywhere: each gradient divided by the world size, then summed over the
    ranks, in buckets of about `bucket_bytes` (DDP's default bucket size). A parameter without a
    gradient gets zeros, so every rank reduces the same tensors."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    bucket: list[torch.Tensor] = []
    size = 0
    for index, param in enumerate(parameters):
        assert param.grad is not None
        bucket.append(param.grad)
        size += param.grad.numel() * param.grad.element_size()
        if size >= bucket_bytes or index == len(parameters) - 1:
            flat = _flatten_dense_tensors(bucket)
            flat.div_(world)
            dist.all_reduce(flat)
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(reduced)
            bucket, size = [], 0


def agree(ok: bool, device: torch.device, *counts: float) -> tuple[list[int], list[float]]:
    """Every rank says whether it can go ahead with the current call; returns the ranks that cannot,
    and the sums over the ranks of each of the VOTE_COUNTS `counts` (missing ones are 0): counts
    the call would otherwise all-reduce separately, a window's loss tokens and sequences.

    One small all_gather of (refused, *counts) per rank. A rank that refused a call (bad input,
    unknown name) still takes part, so its peers learn it at once instead of waiting in the
    call's first collective until the process-group timeout. The counts ride along to save a
    round trip; they are integers, exact in float64, and meaningless if any rank refused.
    """
    if len(counts) > VOTE_COUNTS:
        raise ValueError(f"a vote carries at most {VOTE_COUNTS} counts, got {len(counts)}")
    world = dist.get_world_size()
    width = 1 + VOTE_COUNTS
    padded = [float(count) for count in counts] + [0.0] * (VOTE_COUNTS - len(counts))
    vote = torch.tensor([0.0 if ok else 1.0, *padded], dtype=torch.float64, device=device)
    votes = torch.empty(width * world, dtype=torch.float64, device=device)
    dist.all_gather_single(votes, vote)
    values = votes.tolist()
    refused = [rank for rank in range(world) if values[width * rank]]
    return refused, [sum(values[index::width]) for index in range(1, width)]
