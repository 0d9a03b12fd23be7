"""The per-token float inputs a loss reads from the batch, checked before anything runs.

Used by twinkle_worker.losses: `check_inputs` runs before the call's agreement vote (so a
refused call changes nothing on any rank), `LossInputs.of` builds what the formulas read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from twinkle_protocol.errors import InvalidArgument

# Tinker's names. `advantages` may be per sequence [B] or per token [B, T]; the others are [B, T].
FLOAT_INPUTS = ("weights", "advantages", "logprobs", "ref_logprobs", "mask")
# Twinkle's names for the same tensors.
ALIASES = {"old_logps": "logprobs", "ref_logps": "ref_logprobs"}


@dataclass
class LossInputs:
    """What a formula reads; every tensor is float32 [B, T] (advantages broadcast from [B])."""

    logps: torch.Tensor  # the current policy's log-probabilities, graph-connected
    mask: torch.Tensor  # 1 on loss tokens: labels != -100 and the batch's `mask` (if any) set
    weights: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None  # the sampler's
    ref_logprobs: torch.Tensor | None = None

    @classmethod
    def of(cls, logps: torch.Tensor, label_mask: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossInputs:
        values = {name: _named(batch, name) for name in FLOAT_INPUTS}
        floats = {k: v.to(device=logps.device, dtype=torch.float32) for k, v in values.items() if v is not None}
        mask = label_mask.to(torch.float32)
        if "mask" in floats:
            mask = mask * floats.pop("mask")
        advantages = floats.get("advantages")
        if advantages is not None and advantages.dim() == 1:
            floats["advantages"] = advantages[:, None].expand_as(logps)
        return cls(logps=logps, mask=mask, **floats)

    def sampler_logprobs(self) -> torch.Tensor:
        """q: the sampler's log-probabilities; absent, the current ones detached (on-policy: ratio 1)."""
        return self.logprobs if self.logprobs is not None else self.logps.detach()

    def ratio(self) -> torch.Tensor:
        """exp(logp - q) per token, 1 outside the mask (so clipped or exponentiated padding stays finite)."""
        difference = torch.where(self.mask > 0, self.logps - self.sampler_logprobs(), torch.zeros_like(self.logps))
        return torch.exp(difference)


def _named(batch: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    if name in batch:
        return batch[name]
    for alias, canonical in ALIASES.items():
        if canonical == name and alias in batch:
            return batch[alias]
    return None


def check_inputs(
    batch: Mapping[str, torch.Tensor], needs: tuple[str, ...], loss: str, shape: tuple[int, ...] | None = None
) -> None:
    """Shapes, dtypes and values of the loss inputs present, and presence of those the loss needs.

    shape: the batch's [B, T]; None: that of input_ids."""
    rows, width = shape if shape is not None else tuple(batch["input_ids"].shape)
    for alias, canonical in ALIASES.items():
        if alias in batch and canonical in batch:
            raise InvalidArgument(f"inputs has both {alias!r} and {canonical!r} (the same tensor); send one")
    for name in FLOAT_INPUTS:
        key = name if name in batch else next((a for a, c in ALIASES.items() if c == name and a in batch), None)
        if key is None:
            continue
        value = batch[key]
        allowed = ((rows,), (rows, width)) if name == "advantages" else ((rows, width),)
        if tuple(value.shape) not in allowed:
            shapes = " or ".join(str(list(shape)) for shape in allowed)
            raise InvalidArgument(f"inputs.{key} has shape {list(value.shape)}; {loss} needs {shapes} (as input_ids)")
        if value.dtype == torch.bool or value.is_complex():
            raise InvalidArgument(f"inputs.{key} must hold real numbers, got {value.dtype}")
        if name == "mask" and not ((value == 0) | (value == 1)).all():
            raise InvalidArgument("inputs.mask must hold only 0 and 1 (1: the token counts in the loss)")
    for name in needs:
        if _named(batch, name) is None:
            shape = "[B] or [B, T]" if name == "advantages" else "[B, T]"
            raise InvalidArgument(f"loss {loss} needs inputs.{name} ({shape} float32) in the batch")
