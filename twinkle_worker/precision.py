"""fp16 training: autocast to float16 and the loss scaler (torch.amp.GradScaler built from grad_scaler_config).

Used by twinkle_worker.model. As in Twinkle, mixed_precision='fp16' keeps fp32 master weights,
runs the forward under autocast(float16) and scales the loss before backward; the window's
gradients are unscaled before clipping, and a step whose gradients hold inf or NaN is skipped
(the scale backs off), reported to the caller, and does not move the lr scheduler.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument

# torch.amp.GradScaler's keyword arguments, all plain numbers (the device is the worker's).
SCALER_KEYS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "enabled")


def check_scaler_config(mixed_precision: str, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The GradScaler kwargs for this model: None unless fp16 (where an empty config means torch's defaults)."""
    config = dict(config or {})
    if mixed_precision != "fp16":
        if config:
            raise FailedPrecondition(
                f"grad_scaler_config applies to mixed_precision 'fp16' only (this model is {mixed_precision!r})"
            )
        return None
    unknown = set(config) - set(SCALER_KEYS)
    if unknown:
        raise InvalidArgument(f"grad_scaler_config: unknown keys {sorted(unknown)}; known: {list(SCALER_KEYS)}")
    try:
        torch.amp.GradScaler("cpu", **config)
    except (AssertionError, TypeError, ValueError) as error:
        raise InvalidArgument(f"grad_scaler_config {config}: {error or 'rejected by torch.amp.GradScaler'}") from None
    return config


def make_scaler(device: torch.device, config: dict[str, Any]) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, **config)


def autocast(mixed_precision: str, device: torch.device, sharded: bool) -> Any:
    """Autocast around the forward: bf16 or fp16 (FSDP2 casts through its MixedPrecisionPolicy instead)."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision in dtypes and not sharded:
        return torch.autocast(device_type=device.type, dtype=dtypes[mixed_precision])
    return contextlib.nullcontext()


def backward(scaler: torch.amp.GradScaler | None, loss: torch.Tensor) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def unscale(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer | None) -> None:
    """Unscales the gradients in place before clipping (once a window: the model's `due` rule)."""
    if scaler is not None and optimizer is not None:
        scaler.unscale_(optimizer)


def step(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """optimizer.step through the scaler; True when the scaler skipped it (inf/NaN gradients).

    GradScaler backs its scale off (backoff_factor < 1, which it enforces) exactly when it skipped
    the step, so a smaller scale after update() is the skip (the test accelerate uses too).
    """
    if scaler is None:
        optimizer.step()
        return False
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.is_enabled() and scaler.get_scale() < before
