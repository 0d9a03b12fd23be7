"""Building the client's request messages: Init, the strategy / precision names, structs, optim_params.

Used by twinkle_client.model; the worker reads the same fields (docs/protocol.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

from twinkle_protocol import optim_params as optim_params_rule
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh
from twinkle_protocol.names import PRECISIONS, STRATEGIES

_STRUCT_FIELDS = ("ddp_config", "fsdp_config", "grad_scaler_config")


def check_strategy(strategy: str, mixed_precision: str) -> None:
    """Refuses an unknown strategy or precision name before any worker is started."""
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"strategy {strategy!r} is unknown; use one of {sorted(STRATEGIES)}")
    if mixed_precision not in PRECISIONS:
        raise InvalidArgument(f"mixed_precision {mixed_precision!r} is unknown; use one of {sorted(PRECISIONS)}")


def init_requests(
    mesh: DeviceMesh,
    *,
    model_cls: Any,
    model_id: str | None,
    config: Any,
    device: str,
    mixed_precision: str,
    strategy: str,
    structs: tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None],
    rendezvous: worker_pb2.Rendezvous,
    seed: int | None,
    trust_remote_code: bool,
    lease_seconds: float,
    model_kwargs: Mapping[str, Any],
    session_id: str,
) -> list[worker_pb2.InitRequest]:
    """Every rank's InitRequest (the same but for `rank`); structs: ddp, fsdp and grad-scaler configs."""
    request = worker_pb2.InitRequest(
        model_id=model_id or "",
        model_class=_class_name(model_cls),
        config_json=_config_json(config),
        device=device,
        mixed_precision=PRECISIONS[mixed_precision],
        strategy=STRATEGIES[strategy],
        mesh=worker_pb2.DeviceMesh(dim_names=mesh.dim_names, dim_sizes=mesh.dim_sizes),
        rendezvous=rendezvous,
        seed=random.randrange(2**31) if seed is None else int(seed),
        trust_remote_code=trust_remote_code,
        lease_seconds=lease_seconds,
    )
    for name, value in zip(_STRUCT_FIELDS, structs, strict=True):
        if value:
            getattr(request, name).update(value)
    if model_kwargs:
        request.model_kwargs.update(model_kwargs)
    request.context.session_id = session_id
    requests = []
    for rank in range(mesh.world_size):
        copy = worker_pb2.InitRequest()
        copy.CopyFrom(request)
        copy.rank = rank
        requests.append(copy)
    return requests


def class_name(cls: Any) -> str:
    """The name the workers look up: a class's __name__, or the string as given (optimizers, schedulers)."""
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


def _class_name(model_cls: Any) -> str:
    if model_cls is None:
        return ""
    return model_cls if isinstance(model_cls, str) else model_cls.__name__


def _config_json(config: Any) -> str:
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return json.dumps(dict(config))
    if hasattr(config, "to_json_string"):
        return config.to_json_string(use_diff=False)
    raise InvalidArgument(
        f"config must be a transformers PretrainedConfig, a dict or JSON, not {type(config).__name__}"
    )


def fill_struct(struct: Any, values: Mapping[str, Any]) -> None:
    """Fills a google.protobuf.Struct field from keyword arguments (tuples become lists)."""
    if values:
        struct.update({key: list(value) if isinstance(value, tuple) else value for key, value in values.items()})


def step_request(
    max_grad_norm: float,
    norm_type: float,
    adapter_name: str | None,
    gradient_accumulation_steps: int | None,
    optim_params: Mapping[str, Any] | None,
) -> worker_pb2.ClipGradAndStepRequest:
    """A ClipGradAndStep request (sent alone, or fused into a ForwardBackward as its `step`)."""
    request = worker_pb2.ClipGradAndStepRequest(
        adapter_name=adapter_name or "",
        max_grad_norm=max_grad_norm,
        norm_type=norm_type,
        gradient_accumulation_steps=gradient_accumulation_steps or 0,
    )
    optim_params_rule.fill_message(request.optim_params, optim_params)
    return request


def forward_backward_request(
    adapter_name: str | None,
    temperature: float,
    return_logits: bool,
    gradient_accumulation_steps: int | None,
    loss_fn: str | None,
    loss_fn_config: Mapping[str, Any] | None,
) -> worker_pb2.ForwardBackwardRequest:
    """A ForwardBackward's fields but the batch (the template each rank's request is copied from)."""
    request = worker_pb2.ForwardBackwardRequest(
        adapter_name=adapter_name or "",
        temperature=temperature,
        return_logits=return_logits,
        gradient_accumulation_steps=gradient_accumulation_steps or 0,
        loss_fn=loss_fn or "",
    )
    fill_struct(request.loss_fn_config, loss_fn_config or {})
    return request
