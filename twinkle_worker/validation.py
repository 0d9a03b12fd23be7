"""Checks of a request's fields before anything touches the model: numbers, names, sizes.

Used by twinkle_worker.servicer (on the model thread, inside the call's sequence turn, so a
refused call still consumes its sequence number). Semantic checks that need the model
(token ids against the vocabulary, adapter names, paths) live in twinkle_worker.model and
twinkle_worker.checkpoint. Every failure names the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from twinkle_protocol import lora, optim_params
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

# Extra keyword arguments Init passes to from_pretrained / from_config. An allow-list: keys
# like trust_remote_code, token, cache_dir or device_map must not reach transformers.
MODEL_KWARGS = (
    "attn_implementation",
    "dtype",
    "torch_dtype",
    "gradient_checkpointing",
    "low_cpu_mem_usage",
    "use_cache",
)
# peft.LoraConfig fields accepted in LoraConfig.extra.
# peft LoraConfig fields that travel in LoraConfig.extra (twinkle_protocol.lora's allow-list), and
# target_modules: null there asks for peft's default targets.
LORA_EXTRA = (*lora.EXTRA_FIELDS, "target_modules")
LORA_BIASES = ("none", "all", "lora_only")
MAX_LORA_RANK = 4096
MAX_INPUT_TENSORS = 32
MAX_SEED = 2**32 - 1
MAX_WORLD_SIZE = 1 << 20
MAX_RENDEZVOUS_SECONDS = 24 * 3600.0
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# A forward holds about this many float32 copies of the logits [B, T, V] at once.
LOGITS_COPIES = 3


def check_fields(request: Any) -> None:
    """The numeric fields many requests share: counts not negative, floats finite where they must be."""
    fields = request.DESCRIPTOR.fields_by_name
    for name in ("gradient_accumulation_steps", "interval"):
        if name in fields and getattr(request, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0: the default), got {getattr(request, name)}")
    if "temperature" in fields and not (math.isfinite(request.temperature) and request.temperature >= 0):
        raise InvalidArgument(f"temperature must be a finite number > 0 (0: 1.0), got {request.temperature}")
    if "max_grad_norm" in fields and math.isnan(request.max_grad_norm):
        raise InvalidArgument("max_grad_norm must be a number (<= 0: no clipping), got NaN")
    if "norm_type" in fields and (math.isnan(request.norm_type) or request.norm_type < 0):
        raise InvalidArgument(f"norm_type must be > 0 or inf (0: 2.0), got {request.norm_type}")
    if "consumed_train_samples" in fields and request.consumed_train_samples < 0:
        raise InvalidArgument(f"consumed_train_samples must be >= 0, got {request.consumed_train_samples}")
    if "optim_params" in fields:
        check_optim_params(request.optim_params)
    if _given(request, "lr") and not (math.isfinite(request.lr) and request.lr > 0):
        raise InvalidArgument(f"lr must be a finite number > 0, got {request.lr}")
    if _given(request, "weight_decay") and not (math.isfinite(request.weight_decay) and request.weight_decay >= 0):
        raise InvalidArgument(f"weight_decay must be a finite number >= 0, got {request.weight_decay}")
    if _given(request, "step"):  # a fused step (ForwardBackwardRequest.step): its fields, named step.<field>
        try:
            check_fields(request.step)
        except InvalidArgument as error:
            raise InvalidArgument(f"step.{error}") from None


def _given(request: Any, name: str) -> bool:
    """Whether an optional field is present (False for fields the message lacks)."""
    field = request.DESCRIPTOR.fields_by_name.get(name)
    return field is not None and field.has_presence and request.HasField(name)


def check_optim_params(message: worker_pb2.OptimParams) -> None:
    """The rule of twinkle_protocol.optim_params, on the message's fields."""
    optim_params.from_message(message)


def bounded_device(worker_device: str, requested: str) -> str:
    """The device an Init may use: the request's, within what the worker's --device allows.

    --device cpu allows cpu only; --device cuda:N allows cuda:N only; --device cuda allows any cuda:N.
    An empty request, or one without an index ("cuda"), means the worker's own device.
    """
    import torch

    try:
        bound = torch.device(worker_device or "cpu")
        asked = torch.device(requested) if requested else bound
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device {requested!r} is not a device; use 'cpu' or 'cuda:N'") from None
    if asked.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {requested!r}: only 'cpu' and 'cuda' are supported")
    if asked.type != bound.type or (bound.index is not None and asked.index not in (None, bound.index)):
        raise FailedPrecondition(
            f"device {requested!r}: this worker was started with --device {worker_device}, which bounds "
            "the devices an Init may ask for (cpu: cpu only; cuda:N: that GPU only; cuda: any GPU)"
        )
    if asked.index is None and bound.index is not None:
        return str(bound)
    return str(asked)


def check_init(request: worker_pb2.InitRequest) -> None:
    """Init's own fields (the model checks the config and the mesh)."""
    if request.strategy not in worker_pb2.Strategy.values():
        raise InvalidArgument(f"strategy {request.strategy} is not a Strategy value")
    if request.mixed_precision not in worker_pb2.MixedPrecision.values():
        raise InvalidArgument(f"mixed_precision {request.mixed_precision} is not a MixedPrecision value")
    if request.rank < 0:
        raise InvalidArgument(f"rank must be >= 0, got {request.rank}")
    if not 0 <= request.seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be in [0, 2**32), got {request.seed}")
    if len(request.mesh.dim_names) != len(request.mesh.dim_sizes):
        raise InvalidArgument(
            f"mesh has {len(request.mesh.dim_names)} dim_names but {len(request.mesh.dim_sizes)} dim_sizes"
        )
    if any(size < 1 for size in request.mesh.dim_sizes) or math.prod(request.mesh.dim_sizes) > MAX_WORLD_SIZE:
        raise InvalidArgument(
            f"mesh.dim_sizes must be >= 1 and make at most {MAX_WORLD_SIZE} ranks, got {list(request.mesh.dim_sizes)}"
        )
    rendezvous = request.rendezvous
    if not 0 <= rendezvous.master_port <= 65535:
        raise InvalidArgument(f"rendezvous.master_port must be in [0, 65535], got {rendezvous.master_port}")
    timeout = rendezvous.timeout_seconds
    if not (math.isfinite(timeout) and 0 <= timeout <= MAX_RENDEZVOUS_SECONDS):
        raise InvalidArgument(
            f"rendezvous.timeout_seconds must be in [0, {MAX_RENDEZVOUS_SECONDS:.0f}] (0: 300), got {timeout}"
        )
    if not (math.isfinite(request.lease_seconds) and request.lease_seconds >= 0):
        raise InvalidArgument(
            f"lease_seconds must be a finite number >= 0 (0: the worker's default), got {request.lease_seconds}"
        )
    unknown = sorted(set(request.model_kwargs.keys()) - set(MODEL_KWARGS))
    if unknown:
        raise InvalidArgument(f"model_kwargs {unknown} are not allowed; allowed: {list(MODEL_KWARGS)}")


def check_lora(message: worker_pb2.LoraConfig) -> None:
    if not 1 <= message.r <= MAX_LORA_RANK:
        raise InvalidArgument(f"lora_config.r must be in [1, {MAX_LORA_RANK}], got {message.r}")
    if not (math.isfinite(message.lora_alpha) and message.lora_alpha >= 0):
        raise InvalidArgument(
            f"lora_config.lora_alpha must be a finite number >= 0 (0: peft's default, 8), got {message.lora_alpha}"
        )
    if not (math.isfinite(message.lora_dropout) and 0 <= message.lora_dropout < 1):
        raise InvalidArgument(f"lora_config.lora_dropout must be in [0, 1), got {message.lora_dropout}")
    if message.bias and message.bias not in LORA_BIASES:
        raise InvalidArgument(f"lora_config.bias must be one of {list(LORA_BIASES)}, got {message.bias!r}")
    for field in ("target_modules", "modules_to_save"):
        names = list(getattr(message, field))
        if len(names) > 256 or not all(_MODULE_NAME.match(name) for name in names):
            raise InvalidArgument(f"lora_config.{field} must be module names ([A-Za-z0-9_.-], at most 256 of them)")
    unknown = sorted(set(message.extra.keys()) - set(LORA_EXTRA))
    if unknown:
        raise InvalidArgument(f"lora_config.extra {unknown} are not allowed; allowed: {list(LORA_EXTRA)}")
    if "target_modules" in message.extra and message.extra["target_modules"] is not None:
        raise InvalidArgument("lora_config.extra.target_modules may only be null (peft's default targets)")
    if "init_lora_weights" in message.extra:
        value = message.extra["init_lora_weights"]
        named = isinstance(value, str) and (
            value in lora.INIT_LORA_WEIGHTS or re.fullmatch(r"pissa_niter_\d+", value) is not None
        )
        if not isinstance(value, bool) and not named:
            raise InvalidArgument(
                f"lora_config.extra.init_lora_weights must be true, false, {list(lora.INIT_LORA_WEIGHTS)} or "
                f"'pissa_niter_N', got {value!r} (eva, corda and loftq need data or objects that do not travel)"
            )


def check_inputs(inputs: Mapping[str, np.ndarray], vocab_size: int, return_logits: bool, available: int | None) -> None:
    """A decoded batch slice: tensor names, and whether its logits can fit in memory at all."""
    if len(inputs) > MAX_INPUT_TENSORS:
        raise InvalidArgument(f"inputs has {len(inputs)} tensors; at most {MAX_INPUT_TENSORS}")
    for name in inputs:
        if not _TENSOR_NAME.match(name):
            raise InvalidArgument(f"inputs: tensor name {name[:64]!r} must be an identifier of at most 64 characters")
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2:
        return  # the model's batch checks say what is wrong
    logits = int(ids.shape[0]) * int(ids.shape[1]) * max(1, vocab_size) * 4
    need = logits * (LOGITS_COPIES + (1 if return_logits else 0))
    if available is not None and need > available:
        raise ResourceExhausted(
            f"inputs.input_ids of shape {list(ids.shape)}: its logits alone need {need / 2**30:.2f} GiB, "
            f"this worker has {available / 2**30:.2f} GiB available; send smaller micro-batches",
            reason="OUT_OF_MEMORY",
        )
