"""The optimizers and lr schedulers a group can be given (allow-listed torch names and Twinkle's warmup
schedules), the no-decay parameter groups, and a step's optim_params overrides. Used by twinkle_worker.model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from twinkle_protocol.errors import InvalidArgument, NotFound

OPTIMIZERS = ("AdamW", "Adam", "SGD")
TORCH_SCHEDULERS = (
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "LinearLR",
    "ConstantLR",
    "PolynomialLR",
    "OneCycleLR",
)
WARMUP_SCHEDULERS = ("CosineWarmupScheduler", "LinearWarmupScheduler")


def optimizer_name(optimizer_cls: Any) -> str:
    """The allow-listed torch.optim name of `optimizer_cls` (a name or a class)."""
    name = optimizer_cls if isinstance(optimizer_cls, str) else getattr(optimizer_cls, "__name__", "")
    if name not in OPTIMIZERS:
        raise NotFound(f"unknown optimizer {optimizer_cls!r}; available: {list(OPTIMIZERS)}")
    return name


def make_optimizer(
    name: str, named: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float, kwargs: dict[str, Any]
) -> tuple[torch.optim.Optimizer, list[list[str]]]:
    """The optimizer over the named parameters, in a decay group and a no-decay one (biases and norms);
    returns it and the parameter names of each of its groups."""
    decay = [(n, p) for n, p in named if not no_decay(n)]
    exempt = [(n, p) for n, p in named if no_decay(n)]
    param_groups = [
        {"params": [p for _, p in part], "weight_decay": wd}
        for part, wd in ((decay, weight_decay), (exempt, 0.0))
        if part
    ]
    try:
        optimizer = getattr(torch.optim, name)(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as error:
        raise InvalidArgument(f"optimizer {name}: {error}") from None
    return optimizer, [[n for n, _ in part] for part in (decay, exempt) if part]


def make_scheduler(optimizer: torch.optim.Optimizer, scheduler_cls: str, kwargs: dict[str, Any]) -> Any:
    """A torch.optim.lr_scheduler by name, or one of WARMUP_SCHEDULERS, checked on a stand-in first."""
    try_scheduler(optimizer, scheduler_cls, kwargs)
    if scheduler_cls in WARMUP_SCHEDULERS:
        return warmup_scheduler(optimizer, scheduler_cls, kwargs)
    if scheduler_cls in TORCH_SCHEDULERS:
        try:
            return getattr(torch.optim.lr_scheduler, scheduler_cls)(optimizer, **kwargs)
        except (TypeError, ValueError, KeyError) as error:
            raise InvalidArgument(f"scheduler {scheduler_cls}: {error}") from None
    raise NotFound(f"unknown lr scheduler {scheduler_cls!r}; available: {list(TORCH_SCHEDULERS + WARMUP_SCHEDULERS)}")


def try_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict[str, Any]) -> None:
    """Builds the scheduler on a stand-in optimizer and steps it once, so bad kwargs (which torch may
    only notice at the first step, or never: a NaN factor) are INVALID_ARGUMENT and the real
    optimizer is untouched."""
    if name not in WARMUP_SCHEDULERS and name not in TORCH_SCHEDULERS:
        return  # the caller reports the unknown name
    stand_in = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": group["lr"]} for group in optimizer.param_groups],
        lr=float(optimizer.param_groups[0]["lr"]),
    )
    try:
        if name in WARMUP_SCHEDULERS:
            scheduler = warmup_scheduler(stand_in, name, dict(kwargs))
        else:
            scheduler = getattr(torch.optim.lr_scheduler, name)(stand_in, **kwargs)
        stand_in.step()
        scheduler.step()
    except InvalidArgument:
        raise
    except Exception as error:  # the constructor's or the first step's complaint about the kwargs
        raise InvalidArgument(f"scheduler {name}: {error}".splitlines()[0]) from None
    rates = [float(group["lr"]) for group in stand_in.param_groups]
    if not all(math.isfinite(rate) and rate >= 0 for rate in rates):
        raise InvalidArgument(f"scheduler {name}: kwargs {kwargs} give the learning rate {rates[0]}")


def no_decay(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(".bias") or "norm" in lowered


def override(
    optimizer: torch.optim.Optimizer, optim_params: Mapping[str, Any] | None, param_names: list[list[str]]
) -> list[dict[str, Any]]:
    """Applies optim_params (checked by the caller: twinkle_protocol.optim_params) to the optimizer's
    groups; returns each group's previous values (to restore after the step). weight_decay applies
    to the decay group even when it was built with 0; the no-decay group (biases and norms) keeps 0."""
    if not optim_params:
        return [{} for _ in optimizer.param_groups]
    saved = []
    for index, param_group in enumerate(optimizer.param_groups):
        names = param_names[index] if index < len(param_names) else []
        never_decays = bool(names) and all(no_decay(name) for name in names)
        keys = [k for k in optim_params if k in param_group and not (k == "weight_decay" and never_decays)]
        saved.append({key: param_group[key] for key in keys})
        for key in keys:
            value = optim_params[key]
            param_group[key] = tuple(value) if key == "betas" else float(value)
    return saved


def warmup_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict[str, Any]) -> Any:
    cosine = name == "CosineWarmupScheduler"
    allowed = {"num_warmup_steps", "num_training_steps", "min_lr_ratio"} | ({"num_cycles"} if cosine else set())
    unknown = set(kwargs) - allowed
    if unknown or "num_training_steps" not in kwargs:
        raise InvalidArgument(f"{name} takes {sorted(allowed)} (num_training_steps required); got {sorted(kwargs)}")
    warmup = int(kwargs.get("num_warmup_steps", 0))
    total = int(kwargs["num_training_steps"])
    floor = float(kwargs.get("min_lr_ratio", 0.0))
    if warmup < 0 or total < 1 or warmup > total or not 0 <= floor <= 1:
        raise InvalidArgument(f"{name}: need 0 <= num_warmup_steps <= num_training_steps, num_training_steps >= 1")
    cycles = float(kwargs.get("num_cycles", 0.5))

    # Twinkle's (= transformers') schedules: warmup from 0, then cosine (num_cycles) or linear decay.
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * progress))) if cosine else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
