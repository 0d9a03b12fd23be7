"""How a loss's per-token terms become the objective: token_mean, sum, sequence_mean or a constant divisor.

Used by twinkle_worker.losses (each micro-batch backpropagates the *numerator* of its
normalisation) and twinkle_worker.model (once per accumulation window the gradients are
divided by the *denominator*, computed from counts summed over every micro-batch of the
window and every rank). Because the numerator is a plain sum over sequences and tokens and
the denominator is global, N ranks x M micro-batches give the gradient of one process on
the concatenated batch, for every normalisation:

| normalisation | numerator (per micro-batch and rank) | denominator (whole window, all ranks) |
|---|---|---|
| token_mean | sum of the token terms | number of loss tokens |
| sum | sum of the token terms | 1 |
| sequence_mean | sum over sequences of (term sum / token count) | sequences with a loss token |
| a number C | sum of the token terms | C (Dr. GRPO's constant) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from twinkle_protocol.errors import FailedPrecondition, InvalidArgument

TOKEN_MEAN = "token_mean"
SUM = "sum"
SEQUENCE_MEAN = "sequence_mean"
CONSTANT = "constant"
NAMED = (TOKEN_MEAN, SUM, SEQUENCE_MEAN)


@dataclass(frozen=True)
class Normalization:
    """One of NAMED, or CONSTANT with its divisor."""

    kind: str = TOKEN_MEAN
    divisor: float = 0.0

    @classmethod
    def parse(cls, value: Any, field: str = "normalization") -> Normalization:
        """'token_mean', 'sum', 'sequence_mean', or a positive finite number (a constant divisor)."""
        if isinstance(value, Normalization):
            return value
        if isinstance(value, str) and value in NAMED:
            return cls(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return cls(CONSTANT, float(value))
        raise InvalidArgument(
            f"{field} must be one of {list(NAMED)} or a positive number (a constant divisor), got {value!r}"
        )

    def describe(self) -> str:
        return f"{self.divisor:g}" if self.kind == CONSTANT else self.kind

    def numerator(self, terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What one micro-batch backpropagates: terms [B, T] are already zero outside mask [B, T]."""
        if self.kind == SEQUENCE_MEAN:
            return (terms.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        return terms.sum()

    def denominator(self, tokens: float, sequences: float) -> float:
        """The window's divisor, from its token and sequence counts summed over micro-batches and ranks."""
        if self.kind == TOKEN_MEAN:
            return max(tokens, 1.0)
        if self.kind == SEQUENCE_MEAN:
            return max(sequences, 1.0)
        if self.kind == SUM:
            return 1.0
        return self.divisor


def check_window(current: Normalization | None, incoming: Normalization) -> None:
    """A window's micro-batches share one normalisation: their gradients are summed before the one division."""
    if current is not None and current != incoming:
        raise FailedPrecondition(
            f"normalization {incoming.describe()!r} differs from {current.describe()!r} of the earlier micro-batches "
            "of this accumulation window; step (clip_grad_and_step) first, or use one normalization per window",
            reason="WINDOW_MISMATCH",
        )


def counts(mask: torch.Tensor) -> tuple[int, int]:
    """Loss tokens and sequences with at least one loss token, of a mask [B, T]."""
    per_sequence = mask.sum(-1)
    return int(per_sequence.sum().item()), int((per_sequence > 0).sum().item())
