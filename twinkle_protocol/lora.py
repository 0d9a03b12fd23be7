"""A peft LoraConfig (or a dict of its fields) as the wire's LoraConfig message, field by field.

Used by twinkle_client.model (add_adapter_to_model) and, for its allow-list, by the worker's
validation. Every field of peft's LoraConfig that is plain data travels (the message's own
fields, or `extra`); a field left at peft's default is not sent, so the worker's peft applies
its own default. A field that cannot travel (an object, a callable, a module path to import)
is refused here, naming it, instead of being dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument

# Fields with a field of their own in the LoraConfig message.
MESSAGE_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "modules_to_save")
# Plain-data fields of peft.LoraConfig that travel in `extra` (JSON values: bool, number, string, list, dict).
EXTRA_FIELDS = (
    "init_lora_weights",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "use_dora",
    "lora_bias",
    "trainable_token_indices",
    "use_qalora",
    "qalora_group_size",
    "layer_replication",
    "target_parameters",
    "ensure_weight_tying",
    "alora_invocation_tokens",
)
# init_lora_weights values that need nothing but the config and the base weights; eva, corda and
# loftq need data or objects of their own, which do not travel.
INIT_LORA_WEIGHTS = ("gaussian", "olora", "pissa", "orthogonal")
# Bookkeeping of PeftConfig, not part of the adapter: the worker sets them itself.
_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
# peft's default r; the message's r has no "unset" (0 is refused), so a dict without r gets it here.
DEFAULT_R = 8


def fill_lora_config(message: worker_pb2.LoraConfig, config: Any) -> None:
    """Fills `message` from a peft.LoraConfig or a dict of LoraConfig fields (peft's defaults for the rest)."""
    values = _given_fields(config)
    _check_task_type(values.pop("task_type", None))
    for name in _BOOKKEEPING:
        values.pop(name, None)
    message.r = int(values.pop("r", DEFAULT_R))
    if values.get("lora_alpha") is not None:  # 0 on the wire: peft's default
        message.lora_alpha = float(values.pop("lora_alpha"))
    message.lora_dropout = float(values.pop("lora_dropout", 0.0) or 0.0)
    targets = values.pop("target_modules", None)
    extra: dict[str, Any] = {}
    if targets is None:
        extra["target_modules"] = None  # peft's default: the architecture's own target list
    else:
        message.target_modules.extend([targets] if isinstance(targets, str) else sorted(targets))
    message.bias = values.pop("bias", None) or "none"
    message.use_rslora = bool(values.pop("use_rslora", False))
    message.modules_to_save.extend(values.pop("modules_to_save", None) or [])
    for name, value in values.items():
        if name not in EXTRA_FIELDS:
            raise InvalidArgument(
                f"lora_config.{name} cannot travel to a worker (not one of peft's plain-data LoraConfig fields "
                f"{list(MESSAGE_FIELDS + EXTRA_FIELDS)}); leave it at peft's default"
            )
        extra[name] = _plain(value, f"lora_config.{name}")
    message.extra.update(extra)


def _given_fields(config: Any) -> dict[str, Any]:
    """The fields a caller set: a dict's keys, or a LoraConfig's fields that differ from peft's defaults."""
    if isinstance(config, Mapping):
        return dict(config)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InvalidArgument(f"lora_config must be a peft.LoraConfig or a dict of its fields, got {type(config)}")
    defaults = type(config)()
    given = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "target_modules" or value != getattr(defaults, field.name):
            given[field.name] = value
    return given


def _check_task_type(task_type: Any) -> None:
    name = getattr(task_type, "value", task_type)
    if name not in (None, "CAUSAL_LM"):
        raise InvalidArgument(f"lora_config.task_type {name!r}: the worker trains causal LMs only ('CAUSAL_LM')")


def _plain(value: Any, where: str) -> Any:
    """value as JSON data (sets become sorted lists, tuples lists); anything else is refused, naming `where`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{where} must be finite, got {value!r}")
        return value
    if isinstance(value, (set, frozenset)):
        return [_plain(item, where) for item in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    raise InvalidArgument(
        f"{where} is a {type(value).__name__}, which cannot travel to a worker (plain data only: "
        "numbers, strings, booleans, lists, dicts)"
    )
