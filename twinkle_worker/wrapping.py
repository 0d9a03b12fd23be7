"""Wrapping the model for distribution at its first forward (strategies.wrap: DDP or FSDP2, lazily, as
in Twinkle), with the optimizers pointed at FSDP's sharded parameters. Used by twinkle_worker.model
and twinkle_worker.checkpointing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from twinkle_protocol.errors import FailedPrecondition
from twinkle_worker import strategies

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


def ensure_wrapped(model: TransformersModel) -> nn.Module:
    if model.wrapped is not None:
        return model.wrapped
    trainable_adapters = [n for n in model.adapter_names if model.groups[n].trainable]
    before = {n: [id(p) for _, p in model.group_parameters(g)] for n, g in model.groups.items()}
    if model.mesh.world_size > 1 and not model.plan.uses_fsdp:
        # DDP registers the parameters that require grad when it is built: register every adapter's.
        for name in trainable_adapters:
            for _, param in model.group_parameters(model.groups[name]):
                param.requires_grad_(True)
    with model.mesh_agreement.collective("wrap"):
        model.wrapped = strategies.wrap(model.model, model.plan, several_adapters=len(trainable_adapters) > 1)
    model.forget_parameters()  # DDP made every trainable adapter require grad; FSDP replaced the parameters
    if model.plan.uses_fsdp:
        _rebind_optimizers(model, before)
    return model.wrapped


def _rebind_optimizers(model: TransformersModel, before: dict[str, list[int]]) -> None:
    """fully_shard replaces parameters with sharded ones: point existing optimizers at them."""
    named = dict(model.model.named_parameters())
    for group in model.groups.values():
        if group.optimizer is None:
            continue
        if group.optimizer.state:
            raise FailedPrecondition("cannot shard a model whose optimizer already has state")
        for param_group, names in zip(group.optimizer.param_groups, group.param_names, strict=True):
            param_group["params"] = [named[n] for n in names]
