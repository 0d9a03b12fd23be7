"""Losses a group can train with, chosen by name from an allow-list (SetLoss).

A loss returns the *sum* of its per-token terms and the number of tokens it covers;
the model divides the accumulated gradient by the global token count of the whole
accumulation window at step time, so N ranks x M micro-batches equal one big batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from twinkle_client.errors import InvalidArgument, NotFound

IGNORE_INDEX = -100


@dataclass
class LossResult:
    """Sum of token losses (a graph-connected scalar) and the tokens it covers."""

    loss_sum: torch.Tensor
    num_tokens: int


class Loss(Protocol):
    def check(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Refuses a batch the loss cannot use (InvalidArgument), before anything runs."""

    def __call__(self, logps: torch.Tensor, mask: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> LossResult: ...


class CrossEntropyLoss:
    """Causal-LM cross entropy: -sum of log p(label) over tokens whose label is not -100."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if label_smoothing != 0.0:
            raise InvalidArgument("CrossEntropyLoss: label_smoothing is not supported (it needs the full logits)")

    def check(self, inputs: Mapping[str, torch.Tensor]) -> None:
        pass

    def __call__(self, logps: torch.Tensor, mask: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> LossResult:
        return LossResult(loss_sum=-(logps * mask).sum(), num_tokens=int(mask.sum().item()))


class ImportanceSamplingLoss:
    """Policy-gradient loss -sum(exp(logp - old_logp) * advantage) over label tokens.

    Inputs: `advantages` [B] or [B, T] and optionally `old_logps` [B, T] (absent: ratio 1).
    """

    def check(self, inputs: Mapping[str, torch.Tensor]) -> None:
        rows, width = inputs["labels"].shape
        advantages = inputs.get("advantages")
        if advantages is None:
            raise InvalidArgument("ImportanceSamplingLoss: the batch needs an 'advantages' tensor ([B] or [B, T])")
        if tuple(advantages.shape) not in ((rows,), (rows, width)):
            raise InvalidArgument(
                f"ImportanceSamplingLoss: inputs.advantages has shape {list(advantages.shape)}; "
                f"it must be [B] = [{rows}] or [B, T] = [{rows}, {width}] like labels"
            )
        old = inputs.get("old_logps")
        if old is not None and tuple(old.shape) != (rows, width):
            raise InvalidArgument(
                f"ImportanceSamplingLoss: inputs.old_logps has shape {list(old.shape)}; "
                f"it must be [B, T] = [{rows}, {width}] like labels"
            )

    def __call__(self, logps: torch.Tensor, mask: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> LossResult:
        if "advantages" not in inputs:  # the model calls check() first; this is for direct use
            raise InvalidArgument("ImportanceSamplingLoss: the batch needs an 'advantages' tensor ([B] or [B, T])")
        advantages = inputs["advantages"].to(logps.dtype)
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        old = inputs.get("old_logps")
        ratio = torch.exp(logps - old.to(logps.dtype)) if old is not None else torch.exp(logps - logps.detach())
        return LossResult(loss_sum=-(ratio * advantages * mask).sum(), num_tokens=int(mask.sum().item()))


LOSSES: dict[str, type] = {
    "CrossEntropyLoss": CrossEntropyLoss,
    "ImportanceSamplingLoss": ImportanceSamplingLoss,
}


def make_loss(name: str, kwargs: Mapping[str, Any]) -> Loss:
    """Builds an allow-listed loss; unknown names are NotFound."""
    cls = LOSSES.get(name)
    if cls is None:
        raise NotFound(f"unknown loss {name!r}; available: {sorted(LOSSES)}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise InvalidArgument(f"loss {name}: {error}") from None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(labels[t]) at each position, in float32; 0 where the label is ignored."""
    vocab = logits.shape[-1]
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    losses = torch.nn.functional.cross_entropy(
        scaled.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -losses.view(labels.shape)
