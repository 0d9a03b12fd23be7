"""A model's LoRA adapters: adding one (from a peft.LoraConfig or a saved adapter directory, with its
own initialisation seed), removing one, and making one the active adapter. TransformersModel
exposes add_adapter_to_model and remove_adapter as its methods."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from twinkle_worker import checkpoint as ckpt
from twinkle_worker.building import check_lora_targets
from twinkle_worker.groups import Group
from twinkle_worker.inputs import positive_int

if TYPE_CHECKING:
    from twinkle_worker.model import TransformersModel


def add_adapter_to_model(
    model: TransformersModel,
    adapter_name: str,
    config_or_dir: Any,
    is_trainable: bool = True,
    gradient_accumulation_steps: int = 1,
) -> int:
    """Adds a LoRA adapter (a peft.LoraConfig, or a saved adapter directory under the output root)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if not adapter_name or not adapter_name.replace("_", "").replace("-", "").isalnum():
        raise InvalidArgument(f"adapter_name {adapter_name!r} must be non-empty letters, digits, '_' or '-'")
    if adapter_name in model.groups:
        raise InvalidArgument(f"adapter {adapter_name!r} already exists")
    if model.wrapped is not None:
        raise FailedPrecondition(
            f"adapter {adapter_name!r} comes after the first forward, when the model is already wrapped "
            "for distribution; add every adapter before the first forward_backward/forward_only"
        )
    positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
    if isinstance(config_or_dir, LoraConfig):
        check_lora_targets(model.model, config_or_dir)
    else:
        path = model.path(str(config_or_dir))
        if not (path / ckpt.ADAPTER_CONFIG).is_file():
            raise NotFound(f"no adapter at {str(path)!r} ({ckpt.ADAPTER_CONFIG} missing)")
        ckpt.verify_manifest(path, required=False)
    torch.manual_seed(adapter_seed(model.seed, adapter_name))
    try:
        if isinstance(config_or_dir, LoraConfig):
            if model.is_peft:
                model.model.add_adapter(adapter_name, config_or_dir)
            else:
                model.model = get_peft_model(model.model, config_or_dir, adapter_name=adapter_name)
        elif model.is_peft:
            model.model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        else:
            model.model = PeftModel.from_pretrained(
                model.model, str(path), adapter_name=adapter_name, is_trainable=is_trainable
            )
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:  # PEFT's verdict on the config
        raise InvalidArgument(f"adapter {adapter_name!r}: {error}") from None
    model.model.to(model.device)
    model.forget_parameters()
    model.adapter_names.append(adapter_name)
    model.groups[adapter_name] = Group(adapter_name, gradient_accumulation_steps, trainable=is_trainable)
    model.group_names = tuple(model.groups)
    params = model.group_parameters(model.groups[adapter_name])
    for _, param in params:
        param.requires_grad_(is_trainable)
    return sum(p.numel() for _, p in params) if is_trainable else 0


def remove_adapter(model: TransformersModel, adapter_name: str) -> None:
    """Removes a LoRA adapter and its group (optimizer, scheduler, loss, counters); the name is free again."""
    if not adapter_name:
        raise InvalidArgument("adapter_name: name the adapter to remove (the full model cannot be removed)")
    model.group(adapter_name)  # NotFound for an unknown name
    if model.wrapped is not None and model.mesh.world_size > 1:
        raise FailedPrecondition(
            f"adapter {adapter_name!r} cannot be removed once the model is wrapped for distribution "
            "(DDP and FSDP2 hold its parameters); remove adapters before the first forward, or Reset"
        )
    if len(model.adapter_names) == 1:
        model.model = model.model.unload()  # PEFT cannot run with no adapter at all: back to the plain model
    else:
        model.model.delete_adapter(adapter_name)
    model.wrapped = None  # one rank: the model is its own wrapper, and it just changed
    del model.groups[adapter_name]
    model.group_names = tuple(model.groups)
    model.adapter_names.remove(adapter_name)
    model.forget_parameters()


def activate(model: TransformersModel, group: Group) -> None:
    """Makes the group's adapter the active one (its parameters trainable, the others frozen)."""
    if model.is_peft and group.name and model._active != group.name:
        model.model.set_adapter(group.name)
        for name in model.adapter_names:
            trainable = name == group.name and model.groups[name].trainable
            for _, param in model.group_parameters(model.groups[name]):
                param.requires_grad_(trainable)
        model._active = group.name


def adapter_seed(seed: int, adapter_name: str) -> int:
    """The LoRA initialisation seed of an adapter: the first 8 bytes (little-endian, top bit cleared) of
    sha256("twinkle-lora:{seed}:{adapter_name}"), from Init's seed and the whole name. The same on every
    rank whatever ran before, so the ranks agree without a broadcast; different for every name."""
    digest = hashlib.sha256(f"twinkle-lora:{int(seed)}:{adapter_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
