"""optim_params, the per-step optimizer overrides of Step and ClipGradAndStep: the one definition of
their names and value checks, for the client, the servicer and the worker's model."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument

NAMES = ("lr", "weight_decay", "eps", "betas")
_SCALARS = ("lr", "weight_decay", "eps")


def check(values: Mapping[str, Any]) -> None:
    """Refuses unknown names and values out of range, naming the field."""
    unknown = set(values) - set(NAMES)
    if unknown:
        raise InvalidArgument(f"optim_params: unknown keys {sorted(unknown)}; allowed: {', '.join(NAMES)}")
    if "lr" in values and not (_finite(values["lr"]) and values["lr"] > 0):
        raise InvalidArgument(f"optim_params.lr must be a finite number > 0, got {values['lr']}")
    if "weight_decay" in values and not (_finite(values["weight_decay"]) and values["weight_decay"] >= 0):
        raise InvalidArgument(f"optim_params.weight_decay must be a finite number >= 0, got {values['weight_decay']}")
    if "eps" in values and not (_finite(values["eps"]) and values["eps"] > 0):
        raise InvalidArgument(f"optim_params.eps must be a finite number > 0, got {values['eps']}")
    betas = values.get("betas")
    if betas is not None and not _betas(betas):
        shown = list(betas) if isinstance(betas, (list, tuple)) else betas
        raise InvalidArgument(f"optim_params.betas must be 2 numbers in [0, 1), got {shown}")


def from_message(message: worker_pb2.OptimParams) -> dict[str, Any] | None:
    """The fields the message sets (betas as a tuple), checked; None when it sets none."""
    values: dict[str, Any] = {name: getattr(message, name) for name in _SCALARS if message.HasField(name)}
    if message.betas:
        values["betas"] = tuple(message.betas)
    check(values)
    return values or None


def fill_message(message: worker_pb2.OptimParams, values: Mapping[str, Any] | None) -> None:
    """Sets the message's fields from `values`, checked first."""
    if not values:
        return
    check(values)
    for name in _SCALARS:
        if name in values:
            setattr(message, name, float(values[name]))
    if "betas" in values:
        message.betas.extend(float(beta) for beta in values["betas"])


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _betas(betas: Any) -> bool:
    return isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)
